"""Issue 12 performance figure: what age encryption adds to a full backup and to a restore.

    .venv/bin/python bench/bench_encryption.py [--quick] [--mb N] [--rounds R] [--profile]

One stopped store of about N MB of warm tier (default 300; --quick: 8). Each round, in turn
(alternating, so that a machine whose load changes meanwhile weighs on both alike):

- a full backup (zstd, priority "normal", every core) to a local directory, and the same
  through ``EncryptedStore`` to one X25519 recipient (what ``--encrypt-to`` does);
- a restore of the plain archive, and of the encrypted one as ``restore --from … --identity``
  does it: decrypted into a staging dir (the last chunk authenticated first), then restored.

The goal (issue 12 "Performance"): encryption adds at most 15% to backup and restore time,
each as the median of the rounds. ``--profile`` prints cProfile's top functions of one
encrypted backup and one decrypting restore.
"""

from __future__ import annotations

import cProfile
import pstats
import shutil
from pathlib import Path
from typing import Any

from pyrage import x25519

import common
from common import Report, median
from engram.backup.encrypted import EncryptedStore, decrypt_backup
from engram.backup.full import full_backup
from engram.backup.restore import restore
from engram.graph import Engine, EngineConfig
from engram.storage import LocalBackupStore, Ref

GOAL = 1.15


def parse_args(argv: list[str] | None) -> Any:
    p = common.base_args(__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, help="warm tier of the store, MB (default 300)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 3)")
    p.add_argument("--profile", action="store_true", help="cProfile one encrypted round")
    args = p.parse_args(argv)
    if args.mb is None:
        args.mb = 8 if args.quick else 300
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    return args


def _profile(what: str, fn: Any) -> None:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    print(f"\n  cProfile, {what} (top 8 by cumulative time):")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(8)


def one_round(
    rep: Report,
    args: Any,
    work: Path,
    rnd: Path,
    rcpt: str,
    ident: x25519.Identity,
    times: dict[str, list[float]],
    i: int,
) -> None:
    """Backup plain, backup encrypted, restore plain, decrypt and restore; each timed."""
    cfg = EngineConfig(**common.NO_CHECKPOINTS)
    (rnd / "plain").mkdir(parents=True)
    (rnd / "age").mkdir()
    enc = Ref(EncryptedStore(LocalBackupStore(rnd / "age"), [rcpt]), "f.tar.zst")
    with Engine.open(work / "data", cfg) as eng:
        t, plain = common.timed(lambda: full_backup(eng, rnd / "plain" / "f.tar.zst"))
        times["plain"].append(t)
        t, res = common.timed(lambda: full_backup(eng, enc))
        times["age"].append(t)
    rep.check(res.digest == plain.digest, "both backups hold the same state")
    t, r1 = common.timed(lambda: restore(rnd / "plain" / "f.tar.zst", rnd / "to-plain"))
    times["r-plain"].append(t)

    def decrypt_and_restore() -> Any:
        src = Ref(LocalBackupStore(rnd / "age"), "f.tar.zst")
        copy = decrypt_backup(src, [ident], rnd / ".decrypt")
        try:
            return restore(copy, rnd / "to-age")
        finally:
            shutil.rmtree(rnd / ".decrypt", ignore_errors=True)

    t, r2 = common.timed(decrypt_and_restore)
    times["r-age"].append(t)
    rep.check(
        (r1.snapshot_lsn, r1.digest) == (r2.snapshot_lsn, r2.digest),
        "both restores land on the same state",
    )
    rep.info(
        f"round {i + 1}: backup {times['plain'][-1]:.2f} s / encrypted {times['age'][-1]:.2f} s; "
        f"restore {times['r-plain'][-1]:.2f} s / decrypt + restore {times['r-age'][-1]:.2f} s "
        f"({common.mb(plain.size)} archive)"
    )
    if args.profile and i == 0:
        (rnd / "prof").mkdir()
        penc = Ref(EncryptedStore(LocalBackupStore(rnd / "prof"), [rcpt]), "f.tar.zst")
        with Engine.open(work / "data", cfg) as eng:
            _profile("encrypted full backup", lambda: full_backup(eng, penc))
        shutil.rmtree(rnd / "to-age", ignore_errors=True)
        _profile("decrypt + restore", decrypt_and_restore)
    shutil.rmtree(rnd, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rep = Report("encryption")
    rep.info(f"machine: {common.machine()}; load: {common.load()}")
    ident = x25519.Identity.generate()
    rcpt = str(ident.to_public())
    with common.workdir(args, "engram-bench-crypt-") as work:
        rep.section(f"store of ~{args.mb} MB warm tier")
        store = common.build_store(work / "data", args.mb << 20)
        rep.figure("memories", store.memories, f"{store.memories:,} memories")
        times: dict[str, list[float]] = {k: [] for k in ("plain", "age", "r-plain", "r-age")}
        rep.section("full backup and restore, plain and encrypted, alternating")
        for i in range(args.rounds):
            one_round(rep, args, work, work / f"round{i}", rcpt, ident, times, i)
        med = {k: median(v) for k, v in times.items()}
        rep.figure(
            "medians_s", med, "medians: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items())
        )
        rep.figure("load_after", common.load(), f"load after: {common.load()}")
        rep.goal(
            "full backup with --encrypt-to vs without", "<=", GOAL, med["age"] / med["plain"], "x"
        )
        rep.goal(
            "restore with --identity (decrypt + restore) vs without",
            "<=",
            GOAL,
            med["r-age"] / med["r-plain"],
            "x",
        )
    rc = rep.summary()
    rep.write_json(args.json_out)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
