"""Scans of every memory row split across processes: the digest recompute of a restore or a
PITR, and verify's row checks (``rowcheck``).

A row scan is about 2 us per memory in Python, most of it building row objects, which holds the
GIL, so threads would not help. ``split_scan`` divides the rowid range between this process and
``workers - 1`` helper processes (``python -m <module> DATABASE LO HI``), each on its own
read-only connection. That is only correct when every connection sees the same committed
database: callers split only when nobody can commit meanwhile — the engine's lock is held and
its connection has nothing uncommitted (``recompute_digest``), or no process owns the data dir
(verify). How many workers is the caller's ``Resources`` (``procs``), decided where its command
started. A helper that fails or cannot start has its range redone in this process, with a
warning.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import msgspec

from engram import digest as dg
from engram.procs import Resources, module_argv, module_env
from engram.tiers.warm import memory_rowids, memory_rows

if TYPE_CHECKING:
    from engram.graph import Engine

log = logging.getLogger("engram.digest")

T = TypeVar("T")

# Below this many rows a helper process costs more than it saves (starting one is a new
# interpreter importing engram).
PARALLEL_MIN_ROWS = 150_000
MODULE = "engram.backup.rowscan"  # the digest's helper entry point (the end of this file)
_dec = msgspec.json.Decoder(dict).decode


def split_scan(
    conn: sqlite3.Connection,
    database: str,
    module: str,
    local: Callable[[int | None, int | None], T],
    parse: Callable[[bytes], T],
    workers: int,
) -> list[T]:
    """``local(lo, hi)`` over every memory row, in parts: the first rowid range here through
    ``conn``, the others by ``python -m module database lo hi`` (its stdout goes to ``parse``)
    when ``workers`` > 1 and there are enough rows; otherwise ``[local(None, None)]``."""
    lo, hi, count = memory_rowids(conn)
    if workers < 2 or count < PARALLEL_MIN_ROWS or lo is None or hi is None:
        return [local(None, None)]
    step = (hi - lo + workers) // workers
    bounds = [(lo + i * step, min(hi, lo + (i + 1) * step - 1)) for i in range(workers)]
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
    return dg.memory_rows_sum(memory_rows(conn, lo, hi), _dec) % dg.MOD


def committed_sum(path: Path, workers: int) -> int:
    """The memories' digest share of the committed warm tier database at ``path``, scanned by
    this process and up to ``workers - 1`` helper processes."""
    uri = f"file:{path}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        parts = split_scan(
            conn,
            uri,
            MODULE,
            partial(range_sum, conn),
            lambda out: int(out.decode().strip(), 16),
            workers,
        )
    finally:
        conn.close()
    return sum(parts) % dg.MOD


def recompute_digest(engine: Engine, resources: Resources) -> dg.Digest:
    """``engine``'s digest recomputed from its stored graph, the memory rows scanned by as many
    processes as ``resources`` allows when the committed file is what to read."""
    if resources.scan_workers < 2:
        return engine.recompute_digest()
    return engine.recompute_digest(partial(committed_sum, workers=resources.scan_workers))


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:], lambda c, a, b: format(range_sum(c, a, b), "x").encode()))
