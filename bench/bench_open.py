"""Issue 11 item 1: opening a data dir costs what is unapplied, not the log's size.

    .venv/bin/python bench/bench_open.py [--quick] [--records N] [--unapplied U] [--reps R]

The store: a data dir whose op log holds ``--records`` records (10 million by default) in
64 MiB segments, written straight through the log writer in transactions of 1,000 records
(activations of 1,000 memories, each flipped and flipped back within its transaction, so the
digest at every transaction boundary is the same), and a warm tier holding the graph those
records lead to, applied up to ``--unapplied`` records before the log's end. Then, timed:

- ``Engine.open`` + ``close`` in-process, with the warm tier put back before each run, so that
  every open replays the same ``--unapplied`` records;
- ``engram stats --json`` and ``engram query --id ID --json`` as processes (interpreter start
  included), on the store with nothing unapplied;
- ``engram --help`` and ``engram backups --help`` (the CLI's start alone).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import Report, median
from engram import digest as dg
from engram.datadir import Layout, init_data_dir
from engram.format import record as fmt
from engram.graph import Engine, EngineConfig
from engram.model import Memory, OpType
from engram.oplog.writer import LogWriter
from engram.recovery import LOG_POSITION, log_position
from engram.tiers.warm import WarmTier

MEMORIES = 1000  # memories in the graph; one transaction flips each of half of them twice
TXN = 1000  # records per transaction


def parse_args(argv: list[str] | None) -> Any:
    p = common.base_args(__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, help="records in the op log (default 10,000,000)")
    p.add_argument(
        "--unapplied", type=int, help="records after the warm tier's LSN (default 10,000)"
    )
    p.add_argument("--segment-mb", type=int, help="segment size (default 64)")
    p.add_argument("--reps", type=int, help="repetitions of each timed step (default 5)")
    args = p.parse_args(argv)
    if args.records is None:
        args.records = 20_000 if args.quick else 10_000_000
    if args.unapplied is None:
        args.unapplied = 2_000 if args.quick else 10_000
    if args.segment_mb is None:
        args.segment_mb = 1 if args.quick else 64
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    args.records -= args.records % TXN
    args.unapplied -= args.unapplied % TXN
    return args


def build(root: Path, records: int, unapplied: int, segment_bytes: int) -> tuple[int, float]:
    """The store described above; returns (log bytes, seconds taken)."""
    t0 = time.perf_counter()
    ident = init_data_dir(root)
    lay = Layout(root)
    now = time.time_ns()
    a = [Memory(f"m{i:06d}", f"memory {i}", 0.5, {}, now, now, 0, 0) for i in range(MEMORIES)]
    b = [Memory(m.id, m.content, 0.6, {}, m.created_at, now + 1, now + 1, 1) for m in a]
    enc_a = [fmt.encode_image(m) for m in a]
    enc_b = [fmt.encode_image(m) for m in b]
    digest = dg.Digest()
    for m in a:
        digest.value = (digest.value + dg.item_hash(m)) % dg.MOD

    def tails(ops: list[tuple[OpType, str, bytes | None, bytes | None]]) -> list[bytes]:
        # Each record of a transaction without its frame and its (LSN, time, txid), which are
        # all that differ from one transaction to the next.
        return [
            fmt.encode_record(0, 0, 0, j == len(ops) - 1, op, target, before, after)[8 + 24 :]
            for j, (op, target, before, after) in enumerate(ops)
        ]

    # The first transaction creates the memories; every other one flips half of them to their
    # "b" image and back, so the graph after each transaction is the "a" images.
    create = tails([(OpType.CREATE_MEMORY, m.id, None, enc_a[i]) for i, m in enumerate(a)])
    half = MEMORIES // 2
    flips = []
    for k in range(2):
        ids = range(k * half, (k + 1) * half)
        up = [(OpType.UPDATE_STRENGTH, a[i].id, enc_a[i], enc_b[i]) for i in ids]
        down = [(OpType.UPDATE_STRENGTH, a[i].id, enc_b[i], enc_a[i]) for i in ids]
        flips.append(tails(up + down))
    head, frame, crc = struct.Struct("<QQQ").pack, struct.Struct("<II").pack, fmt.crc32c

    writer = LogWriter(lay.oplog, ident.database_id, durability="none", segment_bytes=segment_bytes)
    writer.start_segment(1, dg.EMPTY)
    applied_at = records - unapplied
    position: str | None = None
    lsn, ts, warm_ts = 0, now, now
    while lsn < records:
        body_tails = create if lsn == 0 else flips[(lsn // TXN) % 2]
        ts += 1000
        txid = lsn + 1
        out = []
        for j, tail in enumerate(body_tails):
            body = head(txid + j, ts, txid) + tail
            out.append(frame(len(body), crc(body)))
            out.append(body)
        lsn += len(body_tails)
        writer.append(b"".join(out), lsn)
        if lsn == applied_at:
            warm_ts = ts
            position = log_position(lsn, writer.position())
        if writer.needs_rotation() and lsn < records:
            writer.start_segment(lsn + 1, digest.hex)
    writer.close()
    warm = WarmTier(lay.warm_db)
    warm.begin()
    warm.put_memories(a)
    warm.set_meta("database_id", ident.database_id)
    if position is not None:  # as the engine's checkpoint at applied_at records it
        warm.set_meta(LOG_POSITION, position)
    warm.commit(applied_at, digest.hex, warm_ts)
    warm.close()
    log_bytes = sum(p.stat().st_size for p in lay.oplog.iterdir())
    return log_bytes, time.perf_counter() - t0


def reset_warm(root: Path, pristine: Path) -> None:
    """Put back the warm tier as built: applied up to ``--unapplied`` records before the end."""
    db = Layout(root).warm_db
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(pristine, db)


def drop_position(root: Path) -> None:
    """Make the warm tier look like one written before log positions were recorded."""
    warm = WarmTier(Layout(root).warm_db)
    warm.begin()
    warm.conn.execute("DELETE FROM meta WHERE key=?", (LOG_POSITION,))
    warm.commit(warm.applied_lsn, warm.get_meta("digest") or dg.EMPTY)
    warm.close()


def open_once(root: Path) -> tuple[float, int, int]:
    """(seconds, records replayed, LSN) of one Engine.open + close."""
    seen = [(0, 0)]
    t0 = time.perf_counter()
    eng = Engine.open(root, EngineConfig(), progress=lambda n, lsn: seen.append((n, lsn)))
    lsn = eng.last_lsn
    eng.close()
    return time.perf_counter() - t0, seen[-1][0], lsn


def engram_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "engram.cli", *args]


def run_timed(cmd: list[str], pycache: Path) -> tuple[float, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    # Bytecode cached as an installed engram has it (pip compiles it), in the work dir: a
    # PYTHONDONTWRITEBYTECODE environment would otherwise compile every module on every run.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return took, r.stdout


def bench(rep: Report, args: Any, root: Path) -> None:
    n, u = args.records, args.unapplied
    rep.section(f"open: a log of {n:,} records, {u:,} of them unapplied")
    pristine = root.parent / "warm-pristine.db"
    shutil.copyfile(Layout(root).warm_db, pristine)
    opens = []
    for _ in range(args.reps):
        reset_warm(root, pristine)
        took, replayed, lsn = open_once(root)
        opens.append(took)
        rep.check(replayed == u, f"the open replayed {replayed:,} records, not the {u:,} unapplied")
        rep.check(lsn == n, f"the open ended at LSN {lsn:,}, not at the log's end {n:,}")
    reset_warm(root, pristine)
    drop_position(root)
    whole, replayed, _ = open_once(root)
    rep.check(replayed == u, f"the open without a position replayed {replayed:,}, not {u:,}")
    rep.figure(
        "open_s",
        round(median(opens), 3),
        f"Engine.open + close, {u:,} records replayed: {median(opens):.3f} s (median of "
        f"{args.reps}); the same open of a warm tier without a log position (written before "
        f"positions were recorded: its segment is read from the start): {whole:.3f} s",
    )
    rep.figures["open_without_position_s"] = round(whole, 3)

    rep.section(f"the CLI on that store (nothing unapplied), {args.reps} runs each, alternating")
    stats, query, start = [], [], []
    pycache = root.parent / "pycache"
    stats_cmd = engram_cmd("stats", "--data-dir", str(root), "--json")
    query_cmd = engram_cmd("query", "--id", "m000001", "--data-dir", str(root), "--json")
    help_cmd = engram_cmd("--help")
    for cmd in (stats_cmd, query_cmd, help_cmd):  # fills the bytecode cache; not timed
        run_timed(cmd, pycache)
    out = qout = ""
    for _ in range(args.reps):
        took, out = run_timed(stats_cmd, pycache)
        stats.append(took)
        took, qout = run_timed(query_cmd, pycache)
        query.append(took)
        start.append(run_timed(help_cmd, pycache)[0])
    s = json.loads(out)
    rep.check(s["lsn"] == n, f"engram stats says LSN {s['lsn']:,}, not {n:,}")
    rep.check(json.loads(qout)["id"] == "m000001", "engram query answered another memory")
    rep.figure(
        "stats_cli_s",
        round(median(stats), 3),
        f"engram stats --json: {median(stats):.3f} s; engram query --json: "
        f"{median(query):.3f} s; the interpreter and CLI start alone (engram --help): "
        f"{median(start):.3f} s (medians)",
    )
    rep.figures["query_cli_s"] = round(median(query), 3)
    rep.figures["help_cli_s"] = round(median(start), 3)
    rep.goal(f"engram stats, log of {n:,} records", "<", 0.5, round(median(stats), 3), " s")
    rep.goal(f"engram query, log of {n:,} records", "<", 1.0, round(median(query), 3), " s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rep = Report("bench_open")
    print(f"bench_open on {common.machine()}{' (quick)' if args.quick else ''}")
    with common.workdir(args, "engram-bench-open-") as work:
        rep.section(f"building a store whose log holds {args.records:,} records")
        root = work / "data"
        log_bytes, took = build(root, args.records, args.unapplied, args.segment_mb << 20)
        segments = len(list(Layout(root).oplog.iterdir()))
        rep.figure(
            "build_s",
            round(took, 1),
            f"{args.records:,} records, {common.mb(log_bytes)} in {segments} segments, "
            f"built in {took:.1f} s",
        )
        bench(rep, args, root)
    rc = rep.summary()
    rep.write_json(args.json_out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
