"""Checking a data dir without changing it (`engram verify`; docs/DESIGN.md "Validation
levels").

Every check runs and every problem is collected with its location (restic's checker), capped per
check so that a badly damaged store still gives a readable report (``report``). Nothing is
written: SQLite is opened read-only and log segments are only read. Nothing is recovered either.

Safe on a live data dir: the warm tier is read in one SQLite read transaction, so rows,
``applied_lsn`` and the stored digest are one committed state (``warm_checks``), and the log is
read after that snapshot is taken, so it always reaches ``applied_lsn`` (the engine commits the
warm tier only after the log is durable, O4). Records past ``applied_lsn`` are simply not
checkpointed yet: they are checked for framing and continuity and replayed into the log-end
digest (``log_chain``), never counted as warm-tier problems.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from engram.backup.rowcheck import MAX_LISTED
from engram.backup.verify.log_chain import check_oplog
from engram.backup.verify.repair import IndexRebuild, rebuild_index
from engram.backup.verify.report import (
    CHECKS,
    CheckResult,
    Findings,
    Problem,
    VerifyReport,
    render_text,
)
from engram.backup.verify.warm_checks import FTS_LOCATION, WarmChecks
from engram.datadir import read_owner
from engram.procs import Resources

__all__ = [
    "CHECKS",
    "FTS_LOCATION",
    "MAX_LISTED",
    "CheckResult",
    "IndexRebuild",
    "Problem",
    "VerifyReport",
    "rebuild_index",
    "render_text",
    "verify_data_dir",
]


def verify_data_dir(
    root: Path,
    check_all: bool = False,
    resources: Resources | None = None,
    beside: Callable[[], None] | None = None,
) -> VerifyReport:
    """Check the data dir at ``root``; never raises for damage, never writes. ``resources``
    says how many cores the scans may keep busy (default: a command at normal priority).

    ``beside``: the caller's own read-only work on ``root``, run in this thread once this
    thread's scans (rows, log) are done and before SQLite's structure check is waited for —
    which, when it runs in a thread of its own, may still be going then on another core. A
    row-bound task (a read benchmark) so fills the core the row scans leave while the
    structure check finishes. Not run when the data dir does not exist."""
    t0 = time.perf_counter()
    root = Path(root)
    report = VerifyReport(root, check_all)
    report.sqlite_check = "integrity_check" if check_all else "quick_check"
    found = Findings(report)
    warm = WarmChecks(found, root, resources if resources is not None else Resources.normal())
    try:
        _run(found, warm, beside)
    finally:
        warm.close()
        found.finish()
    report.seconds = time.perf_counter() - t0
    return report


def _timed(found: Findings, name: str, fn: Callable[[], None]) -> None:
    t, d = time.perf_counter(), found.digest_seconds
    try:
        fn()
    except sqlite3.DatabaseError as e:
        # Damage met mid-scan (malformed page, unreadable file): the check stops, others run.
        found.problem(name, "warm/engram.db", f"reading for the {name} check failed: {e}")
    # Hashing done during this scan is the digest check's time, not this one's.
    hashing = found.digest_seconds - d
    found.report.checks[name].seconds += time.perf_counter() - t - hashing


def _run(found: Findings, warm: WarmChecks, beside: Callable[[], None] | None) -> None:
    report = found.report
    if not warm.root.is_dir():
        found.problem("identity", str(warm.root), "the data dir does not exist")
        for n in CHECKS[1:]:
            found.skip(n, "no data dir")
        return
    report.live = read_owner(warm.root) is not None
    _timed(found, "identity", warm.check_identity)
    # The warm snapshot must be taken before the log is read (see the module docstring).
    _timed(found, "sqlite", warm.check_sqlite)
    if warm.conn is not None and warm.tables_ok:
        _timed(found, "memories", warm.check_memories)
        _timed(found, "edges", warm.check_edges)
        _timed(found, "cold", warm.check_cold)
    else:
        for n in ("memories", "edges", "cold"):
            found.skip(n, "warm tier unreadable")
    # The log is read in this thread while the structure check (when it runs in a thread of
    # its own: SQLite releases the GIL) may still be going; its findings are collected after.
    _timed(
        found,
        "oplog",
        lambda: check_oplog(found, warm.lay.oplog, warm.applied, warm.stored, warm.database_id),
    )
    if beside is not None:
        beside()
    warm.finish_sqlite()
    _timed(found, "digest", warm.check_digest)
    report.checks["digest"].seconds += found.digest_seconds
    if warm.immutable and read_owner(warm.root) is not None:
        found.warn(
            "sqlite",
            "engram.lock",
            "a process opened the data dir while verify ran; rerun verify for a consistent result",
        )
