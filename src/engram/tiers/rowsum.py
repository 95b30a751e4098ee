"""Scans of every memory row split across cores, and the memories' share of the digest (O7).

Recomputing the digest or verifying rows reads every memory: about 2 us each in Python, most of
it building row objects, which holds the GIL, so threads would not help. On more than one core
``split_scan`` divides the rowid range between this process and helper processes
(``python -m <module> DATABASE LO HI``), each on its own read-only connection. That is only
correct when every connection sees the same committed database: callers use it only when the
writing connection has no open transaction and nobody commits meanwhile (the engine holds its
lock), or when no process owns the data dir. A helper that fails or cannot start has its range
redone in this process, with a warning.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec

from engram.digest import MOD, memory_rows_sum
from engram.procs import at_idle_priority, module_argv, module_env

log = logging.getLogger("engram.digest")

T = TypeVar("T")

COLS = (
    "id, content, strength, metadata, created_at, updated_at, last_activated_at, activation_count"
)
# Below this many rows a helper process costs more than it saves (it starts in ~0.1 s).
PARALLEL_MIN_ROWS = 150_000
_dec = msgspec.json.Decoder(dict).decode


def workers() -> int:
    """How many processes a scan may use: one per core (up to 4), or one at idle priority."""
    if at_idle_priority():
        return 1
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


def rows_in(conn: sqlite3.Connection, lo: int | None, hi: int | None) -> sqlite3.Cursor:
    """The memory rows with ``lo <= rowid <= hi`` (all of them if either is None)."""
    if lo is None or hi is None:
        return conn.execute(f"SELECT {COLS} FROM memories")
    return conn.execute(f"SELECT {COLS} FROM memories WHERE rowid BETWEEN ? AND ?", (lo, hi))


def split_scan(
    conn: sqlite3.Connection,
    database: str,
    module: str,
    local: Callable[[int | None, int | None], T],
    parse: Callable[[bytes], T],
) -> list[T]:
    """``local(lo, hi)`` over every memory row, in parts: the first rowid range here through
    ``conn``, the others by ``python -m module database lo hi`` (its stdout goes to ``parse``)
    when there are enough rows and cores; otherwise ``[local(None, None)]``."""
    n = workers()
    lo, hi, count = conn.execute("SELECT min(rowid), max(rowid), count(*) FROM memories").fetchone()
    if n < 2 or count < PARALLEL_MIN_ROWS:
        return [local(None, None)]
    step = (hi - lo + n) // n
    bounds = [(lo + i * step, min(hi, lo + (i + 1) * step - 1)) for i in range(n)]
    procs: list[tuple[subprocess.Popen[bytes] | None, int, int]] = []
    for a, b in bounds[1:]:
        try:
            p: subprocess.Popen[bytes] | None = subprocess.Popen(
                module_argv(module, database, str(a), str(b)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=module_env(),
            )
        except OSError as e:
            log.warning("scan helper could not start (%s); scanning in this process", e)
            p = None
        procs.append((p, a, b))
    try:
        out = [local(*bounds[0])]
        for p, a, b in procs:
            out.append(_collect(p, a, b, local, parse))
        return out
    finally:
        for p, _, _ in procs:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def _collect(
    p: subprocess.Popen[bytes] | None,
    a: int,
    b: int,
    local: Callable[[int | None, int | None], T],
    parse: Callable[[bytes], T],
) -> T:
    if p is not None:
        out, err = p.communicate()
        why = f"exit {p.returncode}"
        if p.returncode == 0:
            try:
                return parse(out)
            except (ValueError, msgspec.MsgspecError) as e:
                why = f"unreadable answer: {e}"
        else:
            why = (err.decode(errors="replace").strip().splitlines() or [why])[-1]
        log.warning("scan helper for rowids %d..%d failed (%s); scanning here", a, b, why)
    return local(a, b)


def helper_main(argv: list[str], scan: Callable[[sqlite3.Connection, int, int], bytes]) -> int:
    """The helper side of ``split_scan``: ``DATABASE LO HI`` in, ``scan``'s bytes out."""
    database, lo, hi = argv[0], int(argv[1]), int(argv[2])
    conn = sqlite3.connect(database, uri=True, isolation_level=None)
    try:
        sys.stdout.buffer.write(scan(conn, lo, hi))
    finally:
        conn.close()
    return 0


# -- the digest --------------------------------------------------------------------------


def range_sum(conn: sqlite3.Connection, lo: int | None = None, hi: int | None = None) -> int:
    """Sum (mod 2^256) of the memory hashes of the rows in the range (all if None)."""
    cur = rows_in(conn, lo, hi)
    total = 0
    while rows := cur.fetchmany(5000):
        total += memory_rows_sum(rows, _dec)
    return total % MOD


def committed_sum(path: Path, conn: sqlite3.Connection) -> int:
    """The memories' digest share of the committed database at ``path``, read through ``conn``
    for this process's part and helper processes for the rest when that pays off."""
    parts = split_scan(
        conn,
        f"file:{path}?mode=ro",
        "engram.tiers.rowsum",
        lambda a, b: range_sum(conn, a, b),
        lambda out: int(out.decode().strip(), 16),
    )
    return sum(parts) % MOD


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:], lambda c, a, b: format(range_sum(c, a, b), "x").encode()))
