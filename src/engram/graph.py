"""The engine: one facade over the op log and the tiers.

Write path (all under ``self.lock``, microseconds): plan the ops against the current state, give
them LSNs and one timestamp, append the records to the log (O1), apply them to the digest and the
tiers. Then, outside the lock, wait until the flusher has fsynced them (group commit) before the
caller acknowledges. The warm tier's transaction is committed at checkpoints, only after the log
is fsynced up to the same LSN, so ``applied_lsn`` never runs ahead of the durable log (O4).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram import digest as dg
from engram.datadir import DirLock, Layout, init_data_dir, is_initialized, read_identity
from engram.errors import CorruptLog, LogGap, NotFound, Unavailable, ValidationError
from engram.format import record as fmt
from engram.model import (
    MEMORY_OPS,
    Edge,
    ExportStream,
    Memory,
    OpType,
    check_id,
    edge_op,
    effective_strength,
    memory_op,
    ns_to_iso,
)
from engram.oplog.reader import iter_log_files, list_segments, read_range
from engram.oplog.writer import LogWriter
from engram.planner import Planned, Planner
from engram.recovery import recover
from engram.replay import ReplayBatch, prepare_replay
from engram.tiers.fast import FastTier, rank_hot
from engram.tiers.warm import WarmTier

log = logging.getLogger("engram")

_WORD = re.compile(r"\w+", re.UNICODE)
# How many of the best text matches a recall ranks (with their out-neighbours), whatever its
# limit: as many as the largest limit, so any limit is a prefix of one ranking, and strength
# reorders all the matches a recall can return.
RECALL_POOL = 1000


@dataclass(frozen=True)
class EngineConfig:
    durability: str = "sync"
    segment_bytes: int = 64 << 20
    fast_tier_bytes: int = 256 << 20
    half_life_s: float = 7 * 86400.0
    checkpoint_interval: float = 1.0
    checkpoint_ops: int = 50_000
    cache_mib: int = 64
    batch_interval: float = 0.01


@dataclass
class Cut:
    """A consistent cut (DESIGN "Backups"): what a backup needs, pinned until ``release_cut``.

    The warm tier's committed state is at ``warm_lsn`` (W); with checkpoints of the SQLite WAL
    held off, ``warm/engram.db`` plus the first ``wal_size`` bytes of its WAL are exactly that
    state. The log records (W, S] in ``segments`` bring it to ``snapshot_lsn`` (S).
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


@dataclass
class WriteResult:
    lsn: int
    results: list[dict[str, Any]] = field(default_factory=list)


class Engine:
    """Owns a data dir: ``Engine.open(path)`` recovers it, ``close()`` checkpoints and releases."""

    def __init__(self, root: Path, config: EngineConfig, readonly: bool) -> None:
        self.root = Path(root)
        self.layout = Layout(self.root)
        self.config = config
        self.readonly = readonly
        self.lock = threading.RLock()
        self.identity = read_identity(self.root)
        self.database_id = self.identity.database_id
        self.dirlock: DirLock | None = None
        self.warm: WarmTier
        self.writer: LogWriter | None = None
        self.fast = FastTier(0 if readonly else config.fast_tier_bytes, self._write_back)
        self.digest = dg.Digest()
        self.last_lsn = 0
        self.last_ts = 0
        self.checkpoint_lsn = 0
        self.ready = False
        self.failed: str | None = None
        self.write_block: str | None = None  # reason writes are refused (quiesce)
        self.write_block_retry = 1.0
        self._stop = threading.Event()
        self._ckpt_thread: threading.Thread | None = None
        self._ops_since_ckpt = 0
        self.checkpoint_digest = dg.EMPTY
        self.n_memories = 0
        self.n_edges = 0
        self.quiesced_until: float | None = None  # wall-clock seconds
        self._quiesce_timer: threading.Timer | None = None
        self._cuts = 0
        self._cuts_done = threading.Condition(self.lock)

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: str | Path,
        config: EngineConfig | None = None,
        *,
        create: bool = True,
        readonly: bool = False,
        url: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Engine:
        root = Path(root)
        if not is_initialized(root):
            if not create or readonly:
                read_identity(root)  # raises the "not an engram data dir" error
            init_data_dir(root)
        eng = cls(root, config or EngineConfig(), readonly)
        try:
            eng._open(url, progress)
        except BaseException:
            eng._abandon()
            raise
        return eng

    def _open(self, url: str | None, progress: Callable[[int, int], None] | None) -> None:
        if self.readonly:
            self.warm = WarmTier(
                self.layout.warm_db, readonly=True, cache_mib=self.config.cache_mib
            )
            self.last_lsn = self.checkpoint_lsn = self.warm.applied_lsn
            self.n_memories, self.n_edges, _ = self.warm.counts()
            self.digest = dg.Digest.from_hex(self.warm.get_meta("digest", dg.EMPTY) or dg.EMPTY)
            self.ready = True
            return
        self.dirlock = DirLock(self.root)
        self.dirlock.acquire(url)
        self.layout.warm_dir.mkdir(mode=0o700, exist_ok=True)
        self.layout.oplog.mkdir(mode=0o700, exist_ok=True)
        self.layout.cold.mkdir(mode=0o700, exist_ok=True)
        self.warm = WarmTier(self.layout.warm_db, cache_mib=self.config.cache_mib)
        self.writer = LogWriter(
            self.layout.oplog,
            self.database_id,
            durability=self.config.durability,
            segment_bytes=self.config.segment_bytes,
            batch_interval=self.config.batch_interval,
        )
        if not self.warm.marks_kept:
            self._fill_marks()
        state = recover(self.warm, self.layout.oplog, self.database_id, self.writer, progress)
        self.digest = state.digest
        self.checkpoint_digest = state.digest.hex
        self.last_lsn = self.checkpoint_lsn = state.last_lsn
        self.last_ts = state.last_ts
        self.n_memories, self.n_edges, _ = self.warm.counts()
        self._prewarm()
        self.writer.start()
        self._ckpt_thread = threading.Thread(
            target=self._checkpointer, name="engram-checkpoint", daemon=True
        )
        self._ckpt_thread.start()
        self.ready = True

    def _fill_marks(self) -> None:
        """Fill the warm tier's ``marks`` of a data dir written before it was kept, from the
        markers of the log segments up to ``applied_lsn`` (recovery adds the ones after it, as
        it replays them). Segments are never deleted, so for a data dir that has run since it
        was created this is every marker of its history. A data dir restored from a backup
        taken before marks were kept holds only the records after that backup's warm LSN: the
        markers before it cannot be known here (PITR still finds them in the logs it replays).
        Where a name was marked twice (allowed then), the first marker keeps it."""
        applied = self.warm.applied_lsn
        segs = list_segments(self.layout.oplog)
        found: list[tuple[str, int, int]] = []
        if segs and segs[0][0] <= applied:
            files = [p for first, p in segs if first <= applied]
            try:
                for rec in iter_log_files(files, self.database_id, segs[0][0] - 1, True):
                    if rec.lsn > applied:
                        break
                    if rec.op == OpType.MARKER:
                        found.append((rec.target, rec.lsn, rec.ts_ns))
            except (CorruptLog, LogGap) as e:
                # Recovery does not need these records (the warm tier holds them): damage
                # there costs the restore points behind it, not the data dir.
                log.warning("restore points after the damage are not known: %s", e)
        self.warm.fill_marks(found)
        if found:
            log.info("restore points: %d found in the log and recorded", len(found))

    def set_url(self, url: str | None) -> None:
        if self.dirlock is not None:
            self.dirlock.update(url)

    def close(self) -> None:
        self._stop.set()
        if self._quiesce_timer is not None:
            self._quiesce_timer.cancel()
        if self._ckpt_thread is not None:
            self._ckpt_thread.join()
            self._ckpt_thread = None
        with self.lock:
            # A backup streaming the warm files needs them unchanged: let it finish first.
            while self._cuts:
                self._cuts_done.wait()
            if not self.readonly and self.failed is None and self.writer is not None:
                try:
                    self.checkpoint()
                except Exception as e:  # still release the lock and stop the threads
                    log.warning("final checkpoint failed: %s", e)
            self._abandon()

    def _abandon(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if hasattr(self, "warm"):
            self.warm.close()
        if self.dirlock is not None:
            self.dirlock.release()
            self.dirlock = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checkpoints ---------------------------------------------------------------------

    def _write_back(self, ms: Iterable[Memory]) -> None:
        self.warm.begin()
        self.warm.put_memories(ms)

    def checkpoint(self) -> int:
        """Flush the fast tier, fsync the log, commit the warm tier at ``last_lsn``."""
        with self.lock:
            if self.readonly or self.writer is None:
                return self.checkpoint_lsn
            if self.failed is not None:
                raise Unavailable(self.failed, retry_after=30)
            try:
                # A failed write-back must not lose activations: once taken, the dirty set is
                # only in this list, so any failure from here on stops writes (a restart
                # replays them from the log).
                dirty = self.fast.take_dirty()
                if dirty:
                    self._write_back(dirty)
                if self.checkpoint_lsn == self.last_lsn and not self.warm.in_txn:
                    return self.checkpoint_lsn
                self.writer.sync()
                if self.writer.failed is not None:
                    raise self.writer._failed_error()
                self.warm.commit(self.last_lsn, self.digest.hex, self.last_ts)
            except Unavailable:
                raise
            except Exception as e:  # sqlite3 errors: disk full, I/O
                self._fail(f"checkpoint failed ({e})")
                raise Unavailable(self.failed, retry_after=30) from None
            self.checkpoint_lsn = self.last_lsn
            self.checkpoint_digest = self.digest.hex
            self._ops_since_ckpt = 0
            return self.checkpoint_lsn

    def _checkpointer(self) -> None:
        while not self._stop.wait(self.config.checkpoint_interval):
            if self.failed is not None:
                continue
            try:
                self.checkpoint()
            except Exception as e:  # checkpoint() has marked the engine failed; keep running
                log.error("checkpoint failed: %s", e)

    def _fail(self, reason: str) -> None:
        self.failed = (
            f"{reason}; writes are stopped — fix the cause and restart engram, "
            "recovery replays the log"
        )
        log.error("%s", self.failed)

    # -- quiesce -------------------------------------------------------------------------

    def quiesce(self, timeout_s: float) -> dict[str, Any]:
        """Refuse new writes (503 + Retry-After) until ``resume`` or until the timeout lapses;
        writes already accepted finish and a checkpoint runs before this returns."""
        if not timeout_s > 0:
            raise ValidationError("the quiesce timeout must be positive", field="timeout")
        with self.lock:
            self._check_writable()
            until = time.time() + timeout_s
            self.write_block = (
                "writes are paused by `engram quiesce` until "
                f"{time.strftime('%H:%M:%S', time.localtime(until))} or `engram resume`"
            )
            self.write_block_retry = min(timeout_s, 5.0)
            self.quiesced_until = until
            if self._quiesce_timer is not None:
                self._quiesce_timer.cancel()
            self._quiesce_timer = threading.Timer(timeout_s, self._quiesce_lapsed, args=(until,))
            self._quiesce_timer.daemon = True
            self._quiesce_timer.start()
            last = self.last_lsn
        self.wait(last)
        self.checkpoint()
        return self.quiesce_state()

    def _quiesce_lapsed(self, until: float) -> None:
        with self.lock:
            if self.quiesced_until == until:
                log.warning("quiesce timeout lapsed; writes resume without `engram resume`")
                self._lift_quiesce()

    def _lift_quiesce(self) -> None:
        self.write_block = None
        self.quiesced_until = None
        if self._quiesce_timer is not None:
            self._quiesce_timer.cancel()
            self._quiesce_timer = None

    def resume(self) -> dict[str, Any]:
        with self.lock:
            was = self.quiesced_until is not None
            self._lift_quiesce()
        return self.quiesce_state() | {"was_quiesced": was}

    def quiesce_state(self) -> dict[str, Any]:
        until = self.quiesced_until
        return {
            "quiesced": until is not None,
            "until": ns_to_iso(int(until * 1e9)) if until else None,
            "checkpoint_lsn": self.checkpoint_lsn,
            "lsn": self.last_lsn,
        }

    # -- backups -------------------------------------------------------------------------

    def cut(self) -> Cut:
        """Take a consistent cut; holds the lock for two stats and a 12-byte read only."""
        if self.readonly or self.writer is None:
            raise Unavailable("a backup needs the data dir opened for writing", retry_after=0)
        wal = self.layout.warm_db.with_name("engram.db-wal")
        t0 = time.perf_counter_ns()
        with self.lock:
            t_held = time.perf_counter_ns()
            if self.failed is not None:
                raise Unavailable(self.failed, retry_after=30)
            if self._cuts == 0:
                # No WAL checkpoints from here on: the main database file stays as it is now.
                self.warm.conn.execute("PRAGMA wal_autocheckpoint=0")
            self._cuts += 1
            try:
                wal_size, wal_header = _wal_state(wal)
                cut = Cut(
                    database_id=self.database_id,
                    snapshot_lsn=self.last_lsn,
                    snapshot_ts=self.last_ts,
                    digest=self.digest.hex,
                    warm_lsn=self.checkpoint_lsn,
                    warm_digest=self.checkpoint_digest,
                    db_size=self.layout.warm_db.stat().st_size,
                    wal_size=wal_size,
                    wal_header=wal_header,
                    hot_ids=[],
                    taken_ns=time.time_ns(),
                    memories=self.n_memories,
                    edges=self.n_edges,
                )
            except BaseException:
                self._release_locked()
                raise
            held = time.perf_counter_ns() - t_held
        cut.lock_wait_ns = t_held - t0
        with self.lock:  # a cache hint, not part of the cut: copied after it, ranked outside
            t_held = time.perf_counter_ns()
            cached = self.fast.snapshot()
            held += time.perf_counter_ns() - t_held
        cut.stall_ns = held  # what the cut made writers wait: both times it held the lock
        cut.hot_ids = rank_hot(cached, 10_000)
        return cut

    def log_range(self, from_lsn: int, to_lsn: int) -> Iterator[tuple[int, int, int, bytes]]:
        """(lsn, ts, txid, framed bytes) of the written records ``from_lsn..to_lsn``, found
        through the writer's sparse index rather than a scan (``oplog.reader.read_range``)."""
        hint = self.writer.offset_hint if self.writer is not None else None
        return read_range(self.layout.oplog, self.database_id, from_lsn, to_lsn, hint)

    def lsn_since(self, ts_ns: int) -> int | None:
        """An LSN at or before the first record at or after ``ts_ns``, from the writer's index."""
        return self.writer.lsn_hint_since(ts_ns) if self.writer is not None else None

    def position(self) -> tuple[int, int, str]:
        """(last LSN, its timestamp, digest there), taken together under the lock."""
        with self.lock:
            return self.last_lsn, self.last_ts, self.digest.hex

    def release_cut(self, cut: Cut) -> None:
        with self.lock:
            last = self._cuts == 1
        if last:
            # The WAL grew while checkpoints were held off. Copy it into the main file from a
            # connection of its own, outside the engine lock (a passive checkpoint never waits
            # for the writer), so the next commit does not do it while writers wait.
            try:
                conn = sqlite3.connect(str(self.layout.warm_db), timeout=5)
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    conn.close()
            except sqlite3.Error as e:
                log.warning("checkpoint of the WAL after a backup failed: %s", e)
        with self.lock:
            self._release_locked()

    def _release_locked(self) -> None:
        self._cuts -= 1
        if self._cuts == 0:
            self.warm.conn.execute("PRAGMA wal_autocheckpoint=1000")
            self._cuts_done.notify_all()

    def wal_still_valid(self, cut: Cut) -> bool:
        """False when SQLite restarted the WAL since the cut (only possible when every frame
        was already in the main file at the cut, so the main file alone is the W state)."""
        _, header = _wal_state(self.layout.warm_db.with_name("engram.db-wal"))
        return header == cut.wal_header

    def _prewarm(self) -> None:
        """Load the hot set a restored backup brought (fast/hot.json), then forget it."""
        hot = self.root / "fast" / "hot.json"
        if not hot.exists():
            return
        try:
            ids = json.loads(hot.read_text()).get("ids", [])
        except (OSError, ValueError, AttributeError):
            ids = []
        for m in self.warm.get_memories([i for i in ids if isinstance(i, str)]).values():
            self.fast.put(m)
        hot.unlink(missing_ok=True)

    def append_replayed(self, txn: list[fmt.Record]) -> None:
        """Append whole transactions of another log (apply-log, PITR) and apply them: the
        records keep their LSNs and timestamps, so this data dir's log stays the truth (O1)."""
        if txn:
            self.append_prepared(prepare_replay(txn))

    def append_prepared(self, batch: ReplayBatch) -> None:
        """``append_replayed`` with the decoding and hashing done already (possibly in another
        thread, see ``prepare_replay``): under the lock only the append and SQLite remain."""
        recs = batch.records
        with self.lock:
            self._check_writable()
            assert self.writer is not None
            first = recs[0].lsn
            if first != self.last_lsn + 1:
                raise LogGap(
                    f"the next record is LSN {first} but the data dir is at {self.last_lsn}: "
                    f"records {self.last_lsn + 1}..{first - 1} are missing"
                )
            if self.writer.needs_rotation():
                self.writer.start_segment(first, self.digest.hex)
            self.writer.append(b"".join(fmt.record_bytes(r) for r in recs), recs[-1].lsn)
            self.last_lsn = recs[-1].lsn
            self.last_ts = max(self.last_ts, recs[-1].ts_ns)
            try:
                self.warm.begin()
                for r in recs:
                    if r.op in MEMORY_OPS:
                        self.fast.discard(r.target)
                self.warm.apply_batch(recs, batch.afters)
            except Exception as e:
                self._fail(f"applying LSN {first}..{self.last_lsn} failed ({e})")
                raise Unavailable(self.failed, retry_after=30) from None
            self.digest.value = (self.digest.value + batch.digest_delta) % dg.MOD
            self.n_memories += batch.memories_delta
            self.n_edges += batch.edges_delta
            self._ops_since_ckpt += len(recs)
            if self._ops_since_ckpt >= self.config.checkpoint_ops:
                self.checkpoint()

    # -- writes --------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise Unavailable("the data dir is open read-only", retry_after=0)
        if not self.ready:
            raise Unavailable("recovery is still running", retry_after=1)
        if self.failed is not None:
            raise Unavailable(self.failed, retry_after=30)
        if self.write_block is not None:
            raise Unavailable(self.write_block, retry_after=self.write_block_retry)

    def submit(self, ops: list[Any]) -> WriteResult:
        """Log and apply ``ops`` atomically; returns before they are durable (see ``wait``)."""
        if not isinstance(ops, list) or not ops:
            raise ValidationError("ops must be a non-empty list", field="ops")
        with self.lock:
            self._check_writable()
            ts = max(time.time_ns(), self.last_ts)
            planner = Planner(self, ts, self.config.half_life_s)
            single = len(ops) == 1
            for i, op in enumerate(ops):
                planner.add(op, None if single else i)
            lsn = self._commit(planner.out, ts)
            return WriteResult(lsn, planner.results)

    def _commit(self, planned: list[Planned], ts: int) -> int:
        assert self.writer is not None
        first = self.last_lsn + 1
        if self.writer.needs_rotation():
            self.writer.start_segment(first, self.digest.hex)
        chunks = []
        n = len(planned)
        for i, p in enumerate(planned):
            chunks.append(
                fmt.encode_record(
                    first + i,
                    ts,
                    first,
                    i == n - 1,
                    p.op,
                    p.target,
                    fmt.encode_image(p.before),
                    fmt.encode_image(p.after),
                )
            )
        last = first + n - 1
        self.writer.append(b"".join(chunks), last)
        self.last_lsn = last
        self.last_ts = ts
        try:
            self._apply(planned, first, ts)
        except Exception as e:  # the log has it, the tiers do not: only a restart can reconcile
            self._fail(f"applying LSN {first}..{last} failed ({e})")
            raise Unavailable(self.failed, retry_after=30) from None
        self._ops_since_ckpt += n
        if self._ops_since_ckpt >= self.config.checkpoint_ops:
            self.checkpoint()
        return last

    def _apply(self, planned: list[Planned], first: int, ts: int) -> None:
        """Apply records ``first``.. (all at ``ts``) to the digest and the tiers."""
        warm, fast = self.warm, self.fast
        warm.begin()
        for i, p in enumerate(planned):
            if p.op != OpType.MARKER:
                self.digest.replace(p.before, p.after)  # type: ignore[arg-type]
                self._count(p.op, p.before is not None, p.after is not None)
            if p.op == OpType.UPDATE_STRENGTH:
                fast.put(p.after, dirty=True)  # type: ignore[arg-type]
            elif p.op in (OpType.CREATE_MEMORY, OpType.UPDATE_MEMORY):
                warm.put_memory(p.after)  # type: ignore[arg-type]
                fast.put(p.after)  # type: ignore[arg-type]
            elif p.op == OpType.DELETE_MEMORY:
                fast.discard(p.target)
                warm.delete_memory(p.target)
            elif p.op == OpType.CREATE_EDGE:
                warm.put_edge(p.after)  # type: ignore[arg-type]
            elif p.op == OpType.DELETE_EDGE:
                e = p.before
                assert isinstance(e, Edge)
                warm.delete_edge(e.src, e.dst, e.kind)
            elif p.op == OpType.MARKER:  # in the same warm transaction as the records (O4)
                warm.put_mark(p.target, first + i, ts)

    def _count(self, op: OpType, had: bool, has: bool) -> None:
        delta = int(has) - int(had)
        if op in MEMORY_OPS:
            self.n_memories += delta
        elif op in (OpType.CREATE_EDGE, OpType.DELETE_EDGE):
            self.n_edges += delta

    def wait(self, lsn: int, timeout: float | None = None) -> None:
        if self.writer is not None:
            self.writer.wait_durable(lsn, timeout)

    def on_durable(self, lsn: int, cb: Callable[[BaseException | None], None]) -> None:
        assert self.writer is not None
        self.writer.on_durable(lsn, cb)

    def apply(self, ops: list[Any]) -> WriteResult:
        """Submit and wait until durable: the synchronous API used by the CLI and tests."""
        res = self.submit(ops)
        self.wait(res.lsn)
        return res

    # -- reads (the planner's StateView too) ---------------------------------------------

    def get_memory(self, mid: str) -> Memory | None:
        """The memory, or None. The object is shared with the fast tier: treat it as read-only
        (every change goes through ``submit`` so that it is logged)."""
        with self.lock:
            m = self.fast.get(mid)
            if m is None:
                m = self.warm.get_memory(mid)
                if m is not None:
                    self.fast.put(m)
            return m

    def get_edge(self, src: str, dst: str, kind: str) -> Edge | None:
        with self.lock:
            return self.warm.get_edge(src, dst, kind)

    def get_mark(self, name: str) -> tuple[int, int] | None:
        """(LSN, time in ns) of the restore point ``name`` in this history, or None."""
        with self.lock:
            return self.warm.get_mark(name)

    def marks(self, upto_lsn: int) -> dict[str, dict[str, int]]:
        """The restore points at or before ``upto_lsn`` as ``{name: {lsn, time_ns}}`` (what a
        full backup's catalog entry records, so that PITR can find a name without opening it).
        Marks are only ever added, so reading them after a cut, bounded by its LSN, gives
        exactly those of the cut."""
        with self.lock:
            found = self.warm.marks(upto_lsn)
        return {n: {"lsn": lsn, "time_ns": ts} for n, (lsn, ts) in found.items()}

    def edges_of(self, mid: str) -> list[Edge]:
        with self.lock:
            return self.warm.edges_of(mid)

    def memory(self, mid: Any) -> Memory:
        mid = check_id(mid)
        m = self.get_memory(mid)
        if m is None:
            raise NotFound(f"memory {mid} not found", field="id")
        return m

    def memory_json(self, m: Memory) -> dict[str, Any]:
        return m.to_json(time.time_ns(), self.config.half_life_s)

    def neighbors(self, mid: Any, direction: str = "both", depth: int = 1) -> list[dict[str, Any]]:
        if direction not in ("out", "in", "both"):
            raise ValidationError("direction must be out, in or both", field="direction")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 3:
            raise ValidationError("depth must be an integer from 1 to 3", field="depth")
        with self.lock:
            start = self.memory(mid).id
            seen = {start}
            frontier = [start]
            out: list[dict[str, Any]] = []
            for d in range(1, depth + 1):
                nxt = []
                for cur in frontier:
                    edges: list[tuple[Edge, str]] = []
                    if direction in ("out", "both"):
                        edges += [(e, e.dst) for e in self.warm.edges_out(cur)]
                    if direction in ("in", "both"):
                        edges += [(e, e.src) for e in self.warm.edges_in(cur)]
                    for e, other in edges:
                        if other in seen:
                            continue
                        seen.add(other)
                        m = self.get_memory(other)
                        if m is None:
                            continue
                        out.append({"depth": d, "edge": e.to_json(), "memory": self.memory_json(m)})
                        nxt.append(other)
                frontier = nxt
            return out

    def recall(self, query: Any, limit: int = 10) -> list[dict[str, Any]]:
        """Full-text match, ranked by text score x (0.5 + strength), plus one step of spreading
        activation: each match passes half its own score (as matched, before any spreading),
        scaled by edge weight, to its out-neighbours; negative weights pass nothing.

        The ranking does not depend on ``limit``: it covers the ``RECALL_POOL`` best text
        matches (bm25, then id) and their out-neighbours, and ties go by id, so the results of
        any limit are the first ``limit`` of the same list. Addition runs in id order, so the
        scores are the same in every process.
        """
        if not isinstance(query, str) or not query.strip():
            raise ValidationError("query must be a non-empty string", field="query")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValidationError("limit must be an integer from 1 to 1000", field="limit")
        words = _WORD.findall(query)
        if not words:
            raise ValidationError("query has no searchable words", field="query")
        fts = " OR ".join('"' + w.replace('"', "") + '"' for w in words[:32])
        now = time.time_ns()
        hl = self.config.half_life_s
        with self.lock:
            hits = self.warm.search(fts, RECALL_POOL)
            found = self._peek_memories([mid for mid, _ in hits])
            matched: dict[str, float] = {}
            for mid, text_score in hits:
                m = found.get(mid)
                if m is not None:
                    matched[mid] = max(text_score, 1e-6) * (0.5 + effective_strength(m, now, hl))
            spread: dict[str, float] = {}
            for e in self._edges_out_of(sorted(matched)):
                if e.weight > 0:
                    spread[e.dst] = spread.get(e.dst, 0.0) + 0.5 * matched[e.src] * e.weight
            scores = dict(matched)
            for mid, s in spread.items():
                scores[mid] = scores.get(mid, 0.0) + s
            ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
            out = []
            for mid, score in ranked[:limit]:
                m = self.get_memory(mid)
                if m is None:
                    continue
                j = self.memory_json(m)
                j["score"] = round(score, 6)
                j["matched"] = mid in matched
                out.append(j)
            return out

    def _edges_out_of(self, ids: list[str]) -> list[Edge]:
        """The out-edges of ``ids``, in (src, dst, kind) order. Under the lock."""
        out: list[Edge] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = self.warm.conn.execute(
                "SELECT src, dst, kind, weight, created_at FROM edges "
                f"WHERE src IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            out.extend(Edge(*r) for r in rows)
        out.sort(key=Edge.key)
        return out

    def _peek_memories(self, ids: list[str]) -> dict[str, Memory]:
        """The current version of each of ``ids`` that exists, without caching the warm ones
        in the fast tier (a recall's candidates are not a working set). Under the lock."""
        out: dict[str, Memory] = {}
        missing: list[str] = []
        for mid in ids:
            m = self.fast.get(mid)
            if m is None:
                missing.append(mid)
            else:
                out[mid] = m
        out.update(self.warm.get_memories(missing))
        return out

    def stats(self) -> dict[str, Any]:
        with self.lock:
            stubs = self.warm.conn.execute("SELECT count(*) FROM cold_stubs").fetchone()[0]
            return {
                "database_id": self.database_id,
                "memories": self.n_memories,
                "edges": self.n_edges,
                "lsn": self.last_lsn,
                "digest": self.digest.hex,
                "tiers": {
                    "fast": {
                        "memories": len(self.fast),
                        "bytes": self.fast.bytes,
                        "budget_bytes": self.fast.budget,
                        "dirty": self.fast.dirty_count,
                    },
                    "warm": {
                        "applied_lsn": self.checkpoint_lsn,
                        "path": str(self.layout.warm_db),
                    },
                    "cold": {"stubs": stubs},
                },
            }

    def recompute_digest(self) -> dg.Digest:
        """The digest recomputed from the stored graph (fast-tier versions the warm tier does
        not have yet take the place of its rows)."""
        with self.lock:
            dirty = {m.id: m for m in self.fast.dirty_snapshot()}
            total = self.warm.digest_sum(dirty)
            for e in self.warm.iter_edges():
                total += dg.edge_hash(e)
            return dg.Digest(total)

    def iter_memories(self) -> Iterator[Memory]:
        """All memories. Holds the lock per batch, not for the whole scan: a write between two
        batches shows in the rest of the scan (``export_ops`` reads one state instead)."""
        last = ""
        while True:
            with self.lock:
                rows = self.warm.conn.execute(
                    "SELECT id FROM memories WHERE id > ? ORDER BY id LIMIT 1000", (last,)
                ).fetchall()
                batch = [self.get_memory(r[0]) for r in rows]
            if not rows:
                return
            yield from (m for m in batch if m is not None)
            last = rows[-1][0]

    def export_ops(self) -> ExportStream:
        """The graph as ops that rebuild it exactly: every memory, then every edge (so edges
        find both ends), with every field, times included (``model.memory_op``).

        The ops describe one state the log passed through, the one after ``lsn``: under the
        lock a checkpoint commits everything applied, and a read transaction is started on a
        connection of its own, which pins that committed state. The scan then runs outside the
        lock; SQLite's WAL lets writers and checkpoints go on meanwhile (the WAL cannot restart
        while the snapshot is held, so it grows until the export ends). The connection closes
        when the stream is exhausted or closed.
        """
        with self.lock:
            if not self.readonly:
                self.checkpoint()
            reader = WarmTier(self.layout.warm_db, readonly=True, cache_mib=8)
            try:
                reader.conn.execute("BEGIN")
                lsn = reader.applied_lsn  # the first read: from here on the snapshot is fixed
                digest = reader.get_meta("digest", dg.EMPTY) or dg.EMPTY
            except BaseException:
                reader.close()
                raise
            assert self.readonly or lsn == self.last_lsn, (lsn, self.last_lsn)
        return ExportStream(lsn, digest, _snapshot_ops(reader))

    def iter_edges(self) -> Iterator[Edge]:
        last = ("", "", "")
        while True:
            with self.lock:
                rows = self.warm.conn.execute(
                    "SELECT src, dst, kind, weight, created_at FROM edges "
                    "WHERE (src, dst, kind) > (?, ?, ?) ORDER BY src, dst, kind LIMIT 1000",
                    last,
                ).fetchall()
            if not rows:
                return
            yield from (Edge(*r) for r in rows)
            last = (rows[-1][0], rows[-1][1], rows[-1][2])


def _snapshot_ops(reader: WarmTier) -> Generator[dict[str, Any], None, None]:
    """Every memory, then every edge, as ops, from ``reader``'s read transaction; closes it."""
    try:
        for m in reader.iter_memories():
            yield memory_op(m)
        for e in reader.iter_edges():
            yield edge_op(e)
    finally:
        reader.close()


def _wal_state(wal: Path) -> tuple[int, bytes]:
    """(size, checkpoint sequence and salts) of a SQLite WAL file; (0, b"") when absent."""
    try:
        fd = os.open(wal, os.O_RDONLY)
    except FileNotFoundError:
        return 0, b""
    try:
        return os.fstat(fd).st_size, os.pread(fd, 12, 12)
    finally:
        os.close(fd)
