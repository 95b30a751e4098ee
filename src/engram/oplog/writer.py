"""Appending to the op log with group commit (docs/DESIGN.md O1).

The engine calls ``append`` under its own lock, so records reach the file in LSN order. A single
flusher thread fsyncs whatever has been written since its last fsync and then wakes every writer
whose LSN is now durable: concurrent writers share one fsync.

Durability modes (``--durability``):
- ``sync`` (default): a write is acknowledged only after its record is fsynced.
- ``batch``: acknowledged once written to the file (survives a process crash); fsynced within
  ``batch_interval`` seconds (a power loss can drop that window).
- ``none``: acknowledged once written; fsynced only at rotation, checkpoints and shutdown.

After a failed write the file is truncated back to the last whole record. After a failed fsync
nothing that was written can be trusted (the kernel may have dropped the pages), so the writer
stops taking writes until engram is restarted and recovery re-reads the log.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from engram.errors import CorruptLog, Unavailable
from engram.format import history as hist
from engram.format import record as fmt
from engram.fsutil import fsync_dir

log = logging.getLogger("engram")

DURABILITY_MODES = ("sync", "batch", "none")
INDEX_EVERY = 256 << 10

DurableCallback = Callable[[BaseException | None], None]


class LogWriter:
    def __init__(
        self,
        oplog_dir: Path,
        database_id: str,
        durability: str = "sync",
        segment_bytes: int = 64 << 20,
        batch_interval: float = 0.01,
        lineage: hist.Lineage | None = None,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY_MODES)}")
        self.dir = oplog_dir
        self.database_id = database_id
        # The history every new segment's header names (with its ancestors): the records of one
        # segment are all of one history (``Engine`` starts a new segment when it branches).
        self.lineage: hist.Lineage = lineage or (hist.original(database_id),)
        self.durability = durability
        self.segment_bytes = segment_bytes
        self.batch_interval = batch_interval
        self._fd = -1
        self._path: Path | None = None
        self._size = 0
        self.marks: list[tuple[int, int, int]] = []
        self._next_mark = 0
        # (first LSN, offset) of the last append to the current segment: where a transaction
        # starts, so that recovery can begin reading there (``position``).
        self._last_append: tuple[int, int] | None = None
        self.written_lsn = 0
        self.durable_lsn = 0
        self.failed: BaseException | None = None
        # Two conditions on one lock: appends wake only the flusher (_work), fsyncs wake the
        # writers waiting for durability (_cond); a write does not wake every waiter.
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._work = threading.Condition(lock)
        self._io_lock = threading.Lock()
        self._callbacks: list[tuple[int, int, DurableCallback]] = []
        self._seq = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.fsyncs = 0

    # -- segment files -------------------------------------------------------------------

    def open_existing(
        self,
        path: Path,
        valid_end: int,
        last_lsn: int,
        last_txn: tuple[int, int] | None = None,
    ) -> None:
        """Continue appending to ``path``, cutting anything after ``valid_end`` (a torn tail).
        ``last_txn``: (first LSN, offset) of the last transaction in it, when known."""
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        if os.fstat(fd).st_size != valid_end:
            os.ftruncate(fd, valid_end)
            os.fsync(fd)
        self._fd, self._path, self._size = fd, path, valid_end
        self.marks, self._next_mark = [], 0
        self._last_append = last_txn
        self.written_lsn = self.durable_lsn = last_lsn

    def start_segment(self, first_lsn: int, base_digest: str) -> None:
        """Create a new segment starting at ``first_lsn`` (caller holds the engine lock).

        The current segment is fsynced before the new one appears: recovery only forgives a torn
        tail in the last segment. The new one is written under a temporary name and renamed
        into place, so a segment never exists with a partial header.
        """
        if self.failed is not None:
            raise self._failed_error()
        header = fmt.encode_file_header(
            fmt.KIND_SEGMENT,
            {
                "database_id": self.database_id,
                "format_version": fmt.FORMAT_VERSION,
                "first_lsn": first_lsn,
                "created_at_ns": time.time_ns(),
                "base_digest": base_digest,
                "history": self.lineage[-1].id,
                "lineage": hist.lineage_to_json(self.lineage),
            },
        )
        path = self.dir / fmt.segment_name(first_lsn)
        if self._fd >= 0:
            with self._cond:
                target = self.written_lsn
            self._fsync_to(target)
            if self.failed is not None:
                raise self._failed_error()
        # A current segment without records that starts at the same LSN (a new history begins
        # before anything was appended to it) is replaced whole, by the rename below.
        empty_current = path == self._path and self._holds_no_records()
        if path.exists() and not empty_current:
            raise Unavailable(
                f"{path} already exists but is not the current segment; restart engram so that "
                "recovery checks the op log",
                retry_after=30,
            )
        tmp = self.dir / f".{path.name}.tmp"
        fd = -1
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            _write_all(fd, header)
            os.fsync(fd)
            os.rename(tmp, path)
            fsync_dir(self.dir)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            if not empty_current:
                path.unlink(missing_ok=True)
            raise Unavailable(
                f"cannot start a new op log segment ({e.strerror}); free space or fix the disk, "
                "then retry",
                retry_after=5,
            ) from None
        with self._io_lock:
            old = self._fd
            self._fd, self._path, self._size = fd, path, len(header)
            self.marks, self._next_mark = [], 0
            self._last_append = None
            if old >= 0:
                os.close(old)

    def _holds_no_records(self) -> bool:
        """Whether the current segment is its header alone."""
        if self._path is None or self._size > fmt.max_header_size():
            return False
        try:
            with open(self._path, "rb") as f:
                head = f.read(self._size + 1)
            return fmt.decode_file_header(head, str(self._path))[2] == len(head)
        except (OSError, CorruptLog):
            return False

    @property
    def current_path(self) -> Path | None:
        return self._path

    def offset_hint(self, path: Path, lsn: int) -> int | None:
        """An offset in ``path`` at or before record ``lsn`` (a frame boundary), if known."""
        marks = self.marks
        if path != self._path or not marks or marks[0][0] > lsn:
            return None
        i = bisect.bisect_right(marks, (lsn, 1 << 64, 0)) - 1
        return marks[i][2]

    def lsn_hint_since(self, ts_ns: int) -> int | None:
        """An LSN of the current segment at or before the first record with a timestamp at or
        after ``ts_ns`` (None when the current segment's marks do not reach back that far)."""
        marks = self.marks
        if not marks or marks[0][1] >= ts_ns:
            return None
        i = bisect.bisect_left([m[1] for m in marks], ts_ns) - 1
        return marks[max(i, 0)][0]

    def position(self) -> tuple[int, int, int] | None:
        """(first LSN of the current segment, offset, LSN) of the start of the last append to
        it: a frame boundary where a transaction starts, at or before ``written_lsn`` (docs/
        FORMAT.md "Reading and recovery"); None when nothing was appended to it yet."""
        if self._path is None or self._last_append is None:
            return None
        first = fmt.parse_segment_name(self._path.name)
        if first is None:
            return None
        lsn, offset = self._last_append
        return first, offset, lsn

    def needs_rotation(self) -> bool:
        return self._size >= self.segment_bytes

    # -- appends -------------------------------------------------------------------------

    def start(self) -> None:
        if self.durability != "none" and self._thread is None:
            self._thread = threading.Thread(
                target=self._flusher, name="engram-flusher", daemon=True
            )
            self._thread.start()

    def append(self, data: bytes, last_lsn: int) -> None:
        """Write whole records; on failure cut the file back and raise (caller holds the lock)."""
        if self.failed is not None:
            raise self._failed_error()
        try:
            _write_all(self._fd, data)
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError as e2:
                self._fail(e2)
            raise Unavailable(
                f"cannot append to the op log ({e.strerror}); free space or fix the disk, then "
                "retry",
                retry_after=5,
            ) from None
        if self._size >= self._next_mark:
            # A sparse index of the current segment: (first LSN, its timestamp, offset) of a
            # write every INDEX_EVERY bytes, so backups find a recent LSN without a scan.
            ts = int.from_bytes(data[16:24], "little")
            self.marks.append((self.written_lsn + 1, ts, self._size))
            self._next_mark = self._size + INDEX_EVERY
        self._last_append = (self.written_lsn + 1, self._size)
        self._size += len(data)
        with self._cond:
            self.written_lsn = last_lsn
            if self.durability == "sync":
                self._work.notify()

    def wait_durable(self, lsn: int, timeout: float | None = None) -> None:
        """Block until ``lsn`` is acknowledged under the configured durability."""
        if self.durability != "sync":
            if self.failed is not None:
                raise self._failed_error()
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.durable_lsn < lsn:
                if self.failed is not None:
                    raise self._failed_error()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Unavailable("timed out waiting for the op log fsync", retry_after=1)
                self._cond.wait(remaining)
            if self.failed is not None and self.durable_lsn < lsn:
                raise self._failed_error()

    def on_durable(self, lsn: int, cb: DurableCallback) -> None:
        """Call ``cb(None)`` once ``lsn`` is durable, or ``cb(error)`` if it never will be."""
        if self.durability != "sync":
            cb(self._failed_error() if self.failed else None)
            return
        with self._cond:
            if self.failed is not None:
                err: BaseException | None = self._failed_error()
            elif self.durable_lsn >= lsn:
                err = None
            else:
                heapq.heappush(self._callbacks, (lsn, next(self._seq), cb))
                return
        cb(err)

    def sync(self) -> None:
        """fsync everything written so far (checkpoints, shutdown, backups)."""
        with self._cond:
            target = self.written_lsn
        if self.durable_lsn >= target and self.durability == "sync":
            return
        self._fsync_to(target)

    # -- the flusher ---------------------------------------------------------------------

    def _flusher(self) -> None:
        while True:
            with self._cond:
                if self.durability == "sync":
                    while self.written_lsn <= self.durable_lsn and not self._closing:
                        self._work.wait()
                else:
                    self._work.wait(self.batch_interval)
                if self._closing and self.written_lsn <= self.durable_lsn:
                    return
                if self.failed is not None:
                    return
                target = self.written_lsn
            if target > self.durable_lsn:
                self._fsync_to(target)

    def _fsync_to(self, target: int) -> None:
        """fsync the current segment, then mark everything up to ``target`` durable."""
        try:
            with self._io_lock:
                if self._fd >= 0:
                    os.fsync(self._fd)
                    self.fsyncs += 1
        except OSError as e:
            self._fail(e)
            return
        ready: list[DurableCallback] = []
        with self._cond:
            if target > self.durable_lsn:
                self.durable_lsn = target
            while self._callbacks and self._callbacks[0][0] <= self.durable_lsn:
                ready.append(heapq.heappop(self._callbacks)[2])
            self._cond.notify_all()
        for cb in ready:
            _notify(cb, None)

    def _fail(self, e: BaseException) -> None:
        with self._cond:
            if self.failed is None:
                self.failed = e
            cbs = [c[2] for c in self._callbacks]
            self._callbacks.clear()
            self._cond.notify_all()
            self._work.notify_all()
        err = self._failed_error()
        for cb in cbs:
            _notify(cb, err)

    def _failed_error(self) -> Unavailable:
        reason = getattr(self.failed, "strerror", None) or str(self.failed)
        return Unavailable(
            f"the op log could not be synced ({reason}); writes are stopped — fix the disk and "
            "restart engram, recovery will re-read the log",
            retry_after=30,
        )

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd >= 0:
            if self.failed is None:
                try:
                    self.sync()
                except OSError:
                    pass
            os.close(self._fd)
            self._fd = -1


def _notify(cb: DurableCallback, err: BaseException | None) -> None:
    # Callbacks run on the flusher thread: one that raises must not stop group commit for all.
    try:
        cb(err)
    except Exception:
        log.exception("a durability callback failed")


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]
