"""Issue 10 performance figures: a repository of 1,000 backups, listed and chosen from.

    .venv/bin/python bench/bench_repo.py [--quick] [--backups N] [--every K] [--reps R]

The repository is built through the engine: a full backup every K backups, incrementals of a few
writes between them (real archives and logs, each with its sidecar and catalog entry, then
given a validation verdict as ``validate-backup`` records it; the newest full backup's verdict
is "failed", so that every choice passes over it). Then, timed:

- ``engram backups --repo R --json`` as a process (interpreter start included), beside the
  same process's start alone (``engram --help``), and ``repository.list_backups`` in-process;
- the choice of ``engram restore --repo --latest`` (``list_backups`` + ``choose_fulls``);
- the base selection of ``restore-pitr --repo`` (``pitr.choose_from_repo``) for the newest LSN.

Each reads the catalog: every entry, checked against its file's header (a few KB), its sidecar
and its size; no archive is decompressed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import Report, median
from engram.backup.catalog import PASSED, update_info
from engram.backup.full import full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.pitr import Target, choose_from_repo, choose_path
from engram.backup.repository import choose_fulls, list_backups
from engram.graph import Engine, EngineConfig
from engram.model import ns_to_iso

SUFFIXES = ("", ".sha256", ".info.json")
MARK = "halfway"  # a restore point in an incremental halfway through the repository


def parse_args(argv: list[str] | None) -> Any:
    p = common.base_args(__doc__.split("\n\n")[0])
    p.add_argument("--backups", type=int, help="backups in the repository (default 1,000)")
    p.add_argument("--every", type=int, default=20, help="a full backup every K backups")
    p.add_argument("--reps", type=int, help="repetitions of each timed step (default 5)")
    args = p.parse_args(argv)
    if args.backups is None:
        args.backups = 60 if args.quick else 1000
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    return args


def build(rep: Report, root: Path, n: int, every: int) -> tuple[Path, int, int]:
    """A repository of ``n`` backups of one data dir, with one restore point halfway; returns
    it, its newest LSN and the restore point's LSN. Each backup is written into a scratch
    directory of its own (so that none reads a growing catalog to find where its range starts)
    and its three files are then moved into the repository."""
    repo, scratch = root / "repo", root / "scratch"
    repo.mkdir()
    scratch.mkdir()
    cfg = EngineConfig(**common.NO_CHECKPOINTS)
    t0 = time.perf_counter()
    with Engine.open(root / "data", cfg, create=True) as eng:
        end = mark_lsn = 0
        for i in range(n):
            ops = [
                {"op": "create_memory", "id": f"m{i}-{j}", "content": f"backup {i} write {j}"}
                for j in range(3)
            ]
            eng.submit(ops)
            if i == n // 2:
                mark_lsn = eng.submit([{"op": "mark", "name": MARK}]).lsn
            if i % every == 0:
                name = f"full-{i:05d}.tar.zst"
                full_backup(eng, scratch / name)
            else:
                name = f"incremental-{i:05d}.log"
                incremental_backup(eng, scratch / name, since_lsn=end + 1)
            end = eng.last_lsn
            for suffix in SUFFIXES:
                os.rename(scratch / (name + suffix), repo / (name + suffix))
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    names = sorted(n for n in os.listdir(repo) if not n.endswith(SUFFIXES[1:]))
    fulls = [n for n in names if n.endswith(".tar.zst")]
    for name in names:
        ok = name != fulls[-1]
        verdict = {
            "status": PASSED if ok else "failed",
            "ok": ok,
            "level": 4,
            "reason": None if ok else "restore: the backup is inconsistent",
            "at": ns_to_iso(time.time_ns()),
            "warnings": [],
        }
        update_info(repo / name, validation=verdict)
    rep.figure(
        "repo_build_s",
        round(built, 1),
        f"built {n} backups ({len(fulls)} full) in {built:.1f} s; verdicts recorded in "
        f"{time.perf_counter() - t0:.1f} s",
    )
    return repo, end, mark_lsn


def engram_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "engram.cli", *args]


def run_timed(cmd: list[str]) -> tuple[float, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return took, r.stdout


def bench(rep: Report, args: Any, repo: Path, end: int, mark_lsn: int) -> None:
    n = args.backups
    rep.section(f"listing {n} backups")
    cli, out = [], ""
    for _ in range(args.reps):
        took, out = run_timed(engram_cmd("backups", "--repo", str(repo), "--json"))
        cli.append(took)
    start = [run_timed(engram_cmd("--help"))[0] for _ in range(args.reps)]
    listed = json.loads(out)
    rep.check(listed["count"] == n, f"engram backups listed {listed['count']} of {n} backups")
    rep.figure(
        "backups_cli_s",
        round(median(cli), 3),
        f"engram backups --repo --json: {median(cli):.3f} s (median of {args.reps}); the "
        f"interpreter and CLI start alone (engram --help): {median(start):.3f} s",
    )
    inproc = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        list_backups(repo)
        inproc.append(time.perf_counter() - t0)
    rep.figure(
        "list_backups_s",
        round(median(inproc), 3),
        f"repository.list_backups in-process: {median(inproc):.3f} s "
        f"({median(inproc) / n * 1e6:.0f} µs a backup)",
    )
    rep.goal(f"engram backups --repo over {n:,} backups", "<", 1.0, round(median(cli), 3), " s")

    rep.section(f"choosing over {n} backups")
    latest = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        choice = choose_fulls(list_backups(repo))
        latest.append(time.perf_counter() - t0)
    rep.check(
        bool(choice.candidates) and len(choice.skipped) == 1,
        "restore --latest's choice passes over exactly the newest full backup (failed)",
    )
    rep.figure(
        "restore_latest_choice_s",
        round(median(latest), 3),
        f"restore --repo --latest, the choice: {median(latest):.3f} s -> "
        f"{choice.candidates[0].name if choice.candidates else 'none'}",
    )
    pitr = []
    incs: list[Path] = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        _, incs, _ = choose_from_repo(repo, Target(lsn=end))
        pitr.append(time.perf_counter() - t0)
    rep.check(bool(incs), "restore-pitr --repo's choice found the incrementals to the newest LSN")
    rep.figure(
        "pitr_choice_s",
        round(median(pitr), 3),
        f"restore-pitr --repo base selection: {median(pitr):.3f} s ({len(incs)} incrementals)",
    )
    rep.goal(
        f"base selection for restore-pitr --repo over {n:,} backups",
        "<",
        0.5,
        round(median(pitr), 3),
        " s",
    )
    by_name, by_lsn = [], []
    for _ in range(args.reps):  # the same target by name and by its LSN, alternating
        t0 = time.perf_counter()
        named = choose_path(repo, Target(name=MARK))
        by_name.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        numbered = choose_path(repo, Target(lsn=mark_lsn))
        by_lsn.append(time.perf_counter() - t0)
    rep.check(
        (named.base, named.logs) == (numbered.base, numbered.logs),
        "the mark and its LSN choose the same base and incrementals",
    )
    ratio = median(by_name) / median(by_lsn)
    rep.figure(
        "pitr_choice_by_name_s",
        round(median(by_name), 3),
        f"restore-pitr --repo --target-name base selection: {median(by_name):.3f} s, the same "
        f"target by LSN {median(by_lsn):.3f} s ({ratio:.2f}x)",
    )
    rep.goal("--target-name's base selection vs the same target by LSN", "<=", 1.5,
             round(ratio, 2), "x")
    rep.goal(
        f"restore --repo --latest's choice over {n:,} backups",
        "<",
        0.5,
        round(median(latest), 3),
        " s",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rep = Report("bench_repo")
    print(f"bench_repo on {common.machine()}{' (quick)' if args.quick else ''}")
    with common.workdir(args, "engram-bench-repo-") as work:
        rep.section(f"building a repository of {args.backups} backups")
        repo, end, mark_lsn = build(rep, work, args.backups, args.every)
        bench(rep, args, repo, end, mark_lsn)
    rc = rep.summary()
    rep.write_json(args.json_out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
