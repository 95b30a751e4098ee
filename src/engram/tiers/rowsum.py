"""The memories' share of the digest (DESIGN O7), summed over the warm tier's rows.

Recomputing the digest reads and hashes every row: about 2 us per memory in Python, most of it
building row objects, which holds the GIL. On more than one core the rows are split by rowid
range between this process and helper processes (``python -m engram.tiers.rowsum``), each on
its own read-only connection. That is only correct when the committed database is the state to
hash, so callers use it only when the writing connection has no open transaction and nobody
commits meanwhile (the engine holds its lock). Any helper failure falls back to this process.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgspec

from engram.digest import MOD, memory_rows_sum

log = logging.getLogger("engram.digest")

COLS = (
    "id, content, strength, metadata, created_at, updated_at, last_activated_at, activation_count"
)
# Below this many rows a helper process costs more than it saves (it starts in ~0.1 s).
PARALLEL_MIN_ROWS = 150_000
_dec = msgspec.json.Decoder(dict).decode


def range_sum(conn: sqlite3.Connection, lo: int | None = None, hi: int | None = None) -> int:
    """Sum of the memory hashes of the rows with ``lo <= rowid <= hi`` (all rows if None)."""
    if lo is None or hi is None:
        cur = conn.execute(f"SELECT {COLS} FROM memories")
    else:
        cur = conn.execute(f"SELECT {COLS} FROM memories WHERE rowid BETWEEN ? AND ?", (lo, hi))
    total = 0
    while rows := cur.fetchmany(5000):
        total += memory_rows_sum(rows, _dec)
    return total


def _open_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)


def workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


def committed_sum(path: Path, conn: sqlite3.Connection) -> int:
    """The memories' digest share of the committed database at ``path``, read through ``conn``
    for this process's part and helper processes for the rest when that pays off."""
    n_workers = workers()
    lo, hi, count = conn.execute("SELECT min(rowid), max(rowid), count(*) FROM memories").fetchone()
    if n_workers < 2 or count < PARALLEL_MIN_ROWS:
        return range_sum(conn)
    step = (hi - lo + n_workers) // n_workers
    bounds = [(lo + i * step, min(hi, lo + (i + 1) * step - 1)) for i in range(n_workers)]
    procs = []
    for a, b in bounds[1:]:
        try:
            p = subprocess.Popen(
                [sys.executable, "-m", "engram.tiers.rowsum", str(path), str(a), str(b)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as e:
            log.warning("digest helper could not start (%s); summing in this process", e)
            p = None
        procs.append((p, a, b))
    try:
        total = range_sum(conn, *bounds[0])
        for p, a, b in procs:
            total += _collect(p, conn, a, b)
    finally:
        for p, _, _ in procs:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    return total % MOD


def _collect(p: subprocess.Popen[bytes] | None, conn: sqlite3.Connection, a: int, b: int) -> int:
    if p is not None:
        out, err = p.communicate()
        if p.returncode == 0:
            try:
                return int(out.decode().strip(), 16)
            except ValueError:
                pass
        why = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {p.returncode}"]
        log.warning("digest helper for rowids %d..%d failed (%s); summing here", a, b, why[0])
    return range_sum(conn, a, b)


def main(argv: list[str]) -> int:
    path, lo, hi = Path(argv[0]), int(argv[1]), int(argv[2])
    conn = _open_ro(path)
    try:
        print(format(range_sum(conn, lo, hi) % MOD, "x"))
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
