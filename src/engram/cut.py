"""The backup cut and the write pause (quiesce): two small pieces of engine state with rules of
their own, each guarded by the engine lock.

A cut (docs/DESIGN.md "The backup cut") pins what a backup needs: while any cut is held,
SQLite's automatic WAL checkpoints are off, so the warm tier's main database file does not
change and, with the prefix of the WAL recorded at the cut, is exactly the committed state at
the warm LSN W. The engine waits for every cut to be released before it closes.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engram.digest import Digest
from engram.errors import Unavailable
from engram.model import ns_to_iso
from engram.oplog.writer import LogWriter
from engram.tiers.fast import FastTier, rank_hot
from engram.tiers.warm import WarmTier

log = logging.getLogger("engram")

# How many of the fast tier's memories a cut names as its hot set.
HOT_SET = 10_000


@dataclass
class Cut:
    """A consistent cut: what a backup needs, pinned until ``Cutter.release``.

    The warm tier's committed state is at ``warm_lsn`` (W); with checkpoints of the SQLite WAL
    held off, ``warm/engram.db`` plus the first ``wal_size`` bytes of its WAL are exactly that
    state. The log records (W, S] bring it to ``snapshot_lsn`` (S).
    """

    database_id: str
    snapshot_lsn: int
    snapshot_ts: int
    digest: str
    warm_lsn: int
    warm_digest: str
    db_size: int
    wal_size: int
    wal_header: bytes
    hot_ids: list[str]
    taken_ns: int
    memories: int
    edges: int
    stall_ns: int = 0  # how long the cut held the engine lock (writers wait meanwhile)
    lock_wait_ns: int = 0  # how long it waited for the lock first (a checkpoint, a write)


class CutSource(Protocol):
    """What a cut reads of the engine (``engram.graph.Engine``), under its lock."""

    lock: threading.RLock
    readonly: bool
    failed: str | None
    writer: LogWriter | None
    warm: WarmTier
    fast: FastTier
    database_id: str
    last_lsn: int
    last_ts: int
    digest: Digest
    checkpoint_lsn: int
    checkpoint_digest: str
    n_memories: int
    n_edges: int


class Cutter:
    """Takes and releases the cuts of one engine; counts the cuts held."""

    def __init__(self, engine: CutSource) -> None:
        self._eng = engine
        self._held = 0
        self._released = threading.Condition(engine.lock)

    @property
    def held(self) -> int:
        """How many cuts are held now."""
        return self._held

    def cut(self) -> Cut:
        """Take a consistent cut; holds the engine lock for two stats and a 12-byte read only."""
        eng = self._eng
        if eng.readonly or eng.writer is None:
            raise Unavailable("a backup needs the data dir opened for writing", retry_after=0)
        t0 = time.perf_counter_ns()
        with eng.lock:
            t_held = time.perf_counter_ns()
            if eng.failed is not None:
                raise Unavailable(eng.failed, retry_after=30)
            if self._held == 0:
                eng.warm.hold_wal_checkpoints(True)  # the main file stays as it is now
            self._held += 1
            try:
                wal_size, wal_header = wal_state(eng.warm.wal_path)
                cut = Cut(
                    database_id=eng.database_id,
                    snapshot_lsn=eng.last_lsn,
                    snapshot_ts=eng.last_ts,
                    digest=eng.digest.hex,
                    warm_lsn=eng.checkpoint_lsn,
                    warm_digest=eng.checkpoint_digest,
                    db_size=eng.warm.path.stat().st_size,
                    wal_size=wal_size,
                    wal_header=wal_header,
                    hot_ids=[],
                    taken_ns=time.time_ns(),
                    memories=eng.n_memories,
                    edges=eng.n_edges,
                )
            except BaseException:
                self._release_locked()
                raise
            held = time.perf_counter_ns() - t_held
        cut.lock_wait_ns = t_held - t0
        with eng.lock:  # a cache hint, not part of the cut: copied after it, ranked outside
            t_held = time.perf_counter_ns()
            cached = eng.fast.snapshot()
            held += time.perf_counter_ns() - t_held
        cut.stall_ns = held  # what the cut made writers wait: both times it held the lock
        cut.hot_ids = rank_hot(cached, HOT_SET)
        return cut

    def release(self, cut: Cut) -> None:
        eng = self._eng
        with eng.lock:
            last = self._held == 1
        if last:
            # The WAL grew while checkpoints were held off. Copy it into the main file outside
            # the engine lock, so the next commit does not do it while writers wait.
            try:
                eng.warm.checkpoint_wal_passive()
            except sqlite3.Error as e:
                log.warning("checkpoint of the WAL after a backup failed: %s", e)
        with eng.lock:
            self._release_locked()

    def _release_locked(self) -> None:
        self._held -= 1
        if self._held == 0:
            self._eng.warm.hold_wal_checkpoints(False)
            self._released.notify_all()

    def wait_released(self) -> None:
        """Under the engine lock: wait until no cut is held (a backup streaming the warm files
        needs them unchanged until it has finished)."""
        while self._held:
            self._released.wait()

    def wal_still_valid(self, cut: Cut) -> bool:
        """False when SQLite restarted the WAL since the cut (only possible when every frame
        was already in the main file at the cut, so the main file alone is the W state)."""
        _, header = wal_state(self._eng.warm.wal_path)
        return header == cut.wal_header


def wal_state(wal: Path) -> tuple[int, bytes]:
    """(size, checkpoint sequence and salts) of a SQLite WAL file; (0, b"") when absent."""
    try:
        fd = os.open(wal, os.O_RDONLY)
    except FileNotFoundError:
        return 0, b""
    try:
        return os.fstat(fd).st_size, os.pread(fd, 12, 12)
    finally:
        os.close(fd)


class Quiesce:
    """Whether `engram quiesce` pauses writes, until when, and the timer that lifts the pause
    by itself. Every method but ``close`` runs under the engine lock (``lock``); the timer
    takes it."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self.block: str | None = None  # why writes are refused, while paused
        self.retry_after = 1.0
        self.until: float | None = None  # wall-clock seconds
        self._timer: threading.Timer | None = None

    def pause(self, timeout_s: float) -> None:
        """Refuse writes from now until ``lift`` or until ``timeout_s`` seconds have passed."""
        until = time.time() + timeout_s
        self.block = (
            "writes are paused by `engram quiesce` until "
            f"{time.strftime('%H:%M:%S', time.localtime(until))} or `engram resume`"
        )
        self.retry_after = min(timeout_s, 5.0)
        self.until = until
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(timeout_s, self._lapsed, args=(until,))
        self._timer.daemon = True
        self._timer.start()

    def _lapsed(self, until: float) -> None:
        with self._lock:
            if self.until == until:  # not lifted or paused again meanwhile
                log.warning("quiesce timeout lapsed; writes resume without `engram resume`")
                self.lift()

    def lift(self) -> bool:
        """Take writes again; True if they were paused."""
        was = self.until is not None
        self.block = None
        self.until = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return was

    def state(self) -> dict[str, Any]:
        until = self.until
        when = ns_to_iso(int(until * 1e9)) if until is not None else None
        return {"quiesced": until is not None, "until": when}

    def close(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
