"""The engine: owns a data dir's op log and tiers, and the write path between them.

Write path (all under ``self.lock``, microseconds): plan the ops against the current state, give
them LSNs and one timestamp, append the records to the log (O1), apply them to the digest and the
tiers. Then, outside the lock, wait until the flusher has fsynced them (group commit) before the
caller acknowledges. The warm tier's transaction is committed at checkpoints, only after the log
is fsynced up to the same LSN, so ``applied_lsn`` never runs ahead of the durable log (O4).

The engine is also the state view the planner plans against and the queries read
(``engram.query``); the backup cut and the write pause are objects of their own (``engram.cut``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram import digest as dg
from engram.config import EngineConfig
from engram.cut import Cut, Cutter, Quiesce
from engram.datadir import (
    DirLock,
    Layout,
    init_data_dir,
    is_initialized,
    read_identity,
    write_identity,
)
from engram.errors import CorruptLog, LogGap, NotFound, Refused, Unavailable, ValidationError
from engram.format import history as hist
from engram.format import record as fmt
from engram.model import MEMORY_OPS, Edge, Memory, OpType, check_id
from engram.oplog.reader import iter_log_files, list_segments, read_range
from engram.oplog.writer import LogWriter
from engram.planner import Planned, Planner
from engram.recovery import LOG_POSITION, log_position, recover
from engram.replay import ReplayBatch, prepare_replay
from engram.tiers.fast import FastTier
from engram.tiers.warm import WarmTier
from engram.verifying import Verification, at_open

log = logging.getLogger("engram")
# Page size of the engine's own scans (``iter_memories``, ``iter_edges``): the lock is held
# for one page at a time.
SCAN_PAGE = 1000


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
        self._stop = threading.Event()
        self._ckpt_thread: threading.Thread | None = None
        self._ops_since_ckpt = 0
        self.checkpoint_digest = dg.EMPTY
        self.n_memories = 0
        self.n_edges = 0
        self.pause = Quiesce(self.lock)
        self.cuts = Cutter(self)
        # A restore's pending digest check (``engram.verifying``), None when there is none.
        self.verification: Verification | None = None

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
        verify_pending: bool = False,
    ) -> Engine:
        root = Path(root)
        if not is_initialized(root):
            if not create or readonly:
                read_identity(root)  # raises the "not an engram data dir" error
            init_data_dir(root)
        eng = cls(root, config or EngineConfig(), readonly)
        try:
            eng._open(url, progress)
            # Before the engine is handed to anyone, so before its first write: a server
            # (``verify_pending``) pins the state to check; a one-shot command says it waits.
            eng.verification = at_open(root, eng.layout.warm_db, verify_pending and not readonly)
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
            lineage=self.identity.lineage,
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

    def close(self) -> None:
        self._stop.set()
        if self.verification is not None:
            self.verification.stop()
        self.pause.close()
        if self._ckpt_thread is not None:
            self._ckpt_thread.join()
            self._ckpt_thread = None
        with self.lock:
            self.cuts.wait_released()
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
                # Where the next open starts reading the log (recovery.LOG_POSITION).
                mark = log_position(self.last_lsn, self.writer.position())
                if mark is not None:
                    self.warm.begin()
                    self.warm.set_meta(LOG_POSITION, mark)
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
            if self.pause.until is not None:
                # Two pauses would share one resume: the first job's `engram resume` would end
                # the second's pause under it. The second is told instead.
                until = self.pause.state()["until"]
                raise Refused(
                    f"writes are already paused by an earlier `engram quiesce` (until {until}); "
                    "run `engram resume` first, or wait for that pause to end"
                )
            self._check_writable()
            self.pause.pause(timeout_s)
            last = self.last_lsn
        self.wait(last)
        self.checkpoint()
        with self.lock:
            return self._quiesce_state()

    def resume(self) -> dict[str, Any]:
        with self.lock:
            was = self.pause.lift()
            return self._quiesce_state() | {"was_quiesced": was}

    def _quiesce_state(self) -> dict[str, Any]:
        return self.pause.state() | {"checkpoint_lsn": self.checkpoint_lsn, "lsn": self.last_lsn}

    # -- backups -------------------------------------------------------------------------

    def cut(self) -> Cut:
        """Take a consistent cut (``Cutter.cut``); ``release_cut`` it when the backup is done."""
        return self.cuts.cut()

    def release_cut(self, cut: Cut) -> None:
        self.cuts.release(cut)

    def wal_still_valid(self, cut: Cut) -> bool:
        return self.cuts.wal_still_valid(cut)

    def log_range(self, from_lsn: int, to_lsn: int) -> Iterator[tuple[int, int, int, bytes]]:
        """(lsn, ts, txid, framed bytes) of the written records ``from_lsn..to_lsn``, found
        through the writer's sparse index rather than a scan (``oplog.reader.read_range``)."""
        hint = self.writer.offset_hint if self.writer is not None else None
        return read_range(
            self.layout.oplog, self.database_id, from_lsn, to_lsn, hint, lineage=self.lineage
        )

    def lsn_since(self, ts_ns: int) -> int | None:
        """An LSN at or before the first record at or after ``ts_ns``, from the writer's index."""
        return self.writer.lsn_hint_since(ts_ns) if self.writer is not None else None

    def position(self) -> tuple[int, int, str]:
        """(last LSN, its timestamp, digest there), taken together under the lock."""
        with self.lock:
            return self.last_lsn, self.last_ts, self.digest.hex

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
        if self.verification is not None:
            self.verification.check_writable()
        block = self.pause.block
        if block is not None:
            raise Unavailable(block, retry_after=self.pause.retry_after)

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

    # -- histories (docs/DESIGN.md "Histories") ------------------------------------------------

    @property
    def lineage(self) -> hist.Lineage:
        """This data dir's history and its ancestors (the original history first)."""
        return self.identity.lineage

    @property
    def history(self) -> str:
        return self.identity.history

    def _set_lineage(self, lineage: hist.Lineage, recovered: dict[str, Any] | None) -> None:
        """Record the history the next records belong to, durably, before any of them is
        appended; they go into a segment of their own (caller holds the lock)."""
        assert self.writer is not None
        ident = self.identity
        new = type(ident)(
            ident.database_id, ident.created_at, ident.format_version, lineage, recovered
        )
        try:
            write_identity(self.root, new)
        except OSError as e:
            raise Unavailable(
                f"cannot record the new history in {self.layout.identity} ({e.strerror}); "
                "free space or fix the disk, then retry",
                retry_after=5,
            ) from None
        self.identity = new
        self.writer.lineage = lineage
        try:
            self.writer.start_segment(self.last_lsn + 1, self.digest.hex)
        except Unavailable:
            # The identity names the new history but the current segment is the old one's:
            # only a restart (recovery starts the segment) may append again.
            self._fail("a new history could not start its op log segment")
            raise

    def _begin_history(self) -> None:
        """The first write of a recovered data dir: a new history branches after the last
        replayed record (its source may have gone on with other records at the same LSNs)."""
        why = self.identity.recovered or {}
        new = hist.new_history(
            self.history, self.last_lsn, str(why.get("command") or "recovery"), why.get("target")
        )
        self._set_lineage((*self.lineage, new), None)
        log.info("a new history %s begins after LSN %d", new.id, self.last_lsn)

    def follow(self, lineage: hist.Lineage, lsn: int) -> None:
        """Before replayed record ``lsn`` (apply-log, PITR) is appended: take the history that
        owns it on ``lineage`` (a path that holds the same records as this data dir up to its
        LSN, which the caller has checked), so each segment holds records of one history."""
        with self.lock:
            want = hist.upto(lineage, lsn)
            if want[-1].id != self.history:
                self._set_lineage(want, self.identity.recovered)

    def mark_recovered(self, command: str, target: str | None) -> None:
        """Record that ``command`` replayed records into this data dir from elsewhere: its next
        write of its own starts a new history (``Identity.recovered``)."""
        rec = {"command": command, "target": target}
        with self.lock:
            # A restored copy may name histories that began after its last record (its
            # source's): it is on the history that owns that record.
            lineage = hist.upto(self.lineage, self.last_lsn)
            if lineage != self.lineage:
                self._set_lineage(lineage, rec)
            elif self.identity.recovered != rec:
                ident = self.identity
                new = type(ident)(
                    ident.database_id, ident.created_at, ident.format_version, lineage, rec
                )
                write_identity(self.root, new)
                self.identity = new

    def _commit(self, planned: list[Planned], ts: int) -> int:
        assert self.writer is not None
        if self.identity.recovered is not None:
            self._begin_history()
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

    # -- reads: the planner's StateView and the queries' GraphView (``engram.query``) -----

    @property
    def half_life_s(self) -> float:
        return self.config.half_life_s

    def reading(self) -> AbstractContextManager[Any]:
        """Held while a query reads: no write is applied meanwhile, so it reads one state."""
        return self.lock

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

    def edges_out(self, mid: str) -> list[Edge]:
        with self.lock:
            return self.warm.edges_out(mid)

    def edges_in(self, mid: str) -> list[Edge]:
        with self.lock:
            return self.warm.edges_in(mid)

    def edges_out_of(self, ids: list[str]) -> list[Edge]:
        with self.lock:
            return self.warm.edges_out_of(ids)

    def search(self, fts_query: str, limit: int) -> list[tuple[str, float]]:
        with self.lock:
            return self.warm.search(fts_query, limit)

    def memory(self, mid: Any) -> Memory:
        """The memory ``mid`` (checked as an id), or NotFound."""
        mid = check_id(mid)
        m = self.get_memory(mid)
        if m is None:
            raise NotFound(f"memory {mid} not found", field="id")
        return m

    def peek_memories(self, ids: list[str]) -> dict[str, Memory]:
        """The current version of each of ``ids`` that exists, without caching the warm ones
        in the fast tier (a recall's candidates are not a working set)."""
        out: dict[str, Memory] = {}
        missing: list[str] = []
        with self.lock:
            for mid in ids:
                m = self.fast.get(mid)
                if m is None:
                    missing.append(mid)
                else:
                    out[mid] = m
            out.update(self.warm.get_memories(missing))
        return out

    def iter_memories(self) -> Iterator[Memory]:
        """All memories, in id order. Holds the lock per page, not for the whole scan: a write
        between two pages shows in the rest of the scan (``query.export`` reads one state)."""
        last = ""
        while True:
            with self.lock:
                ids = self.warm.memory_ids_after(last, SCAN_PAGE)
                page = [self.get_memory(mid) for mid in ids]
            if not ids:
                return
            yield from (m for m in page if m is not None)
            last = ids[-1]

    def iter_edges(self) -> Iterator[Edge]:
        """All edges, in (src, dst, kind) order; the lock is held per page, as in
        ``iter_memories``."""
        last = ("", "", "")
        while True:
            with self.lock:
                page = self.warm.edges_after(last, SCAN_PAGE)
            if not page:
                return
            yield from page
            last = page[-1].key()

    def pin_snapshot(self) -> tuple[int, str, WarmTier]:
        """(LSN, digest, reader) of the state after every write applied so far: under the lock
        a checkpoint commits everything applied, and a read transaction is started on a
        connection of its own, which pins that committed state. Reads through ``reader`` then
        need no lock; SQLite's WAL lets writers and checkpoints go on meanwhile (the WAL cannot
        restart while the snapshot is held, so it grows until ``reader`` is closed)."""
        with self.lock:
            if not self.readonly:
                self.checkpoint()
            reader = WarmTier(self.layout.warm_db, readonly=True, cache_mib=8)
            try:
                lsn, digest = reader.pin_snapshot()
            except BaseException:
                reader.close()
                raise
            assert self.readonly or lsn == self.last_lsn, (lsn, self.last_lsn)
        return lsn, digest, reader

    # -- status --------------------------------------------------------------------------

    def health(self) -> tuple[str, str | None]:
        """("ready" | "verifying", None), or ("failed" | "verification_failed" | "blocked",
        why writes are refused). "verifying": a restore's digest check runs while serving."""
        failed, block, v = self.failed, self.pause.block, self.verification
        if failed is not None:
            return "failed", failed
        if v is not None and v.state == "failed":
            return "verification_failed", v.reason
        if block is not None:
            return "blocked", block
        if v is not None and v.state in ("verifying", "pending"):
            return "verifying", None
        return "ready", None

    def status(self) -> dict[str, Any]:
        """One snapshot of the engine, taken under the lock: counts, LSNs, digest, tiers,
        health, the write pause, durability and the data dir (what `engram status` shows)."""
        with self.lock:
            return self._stats() | {
                "ready": self.ready,
                "failed": self.failed,
                "quiesce": self._quiesce_state(),
                "durability": self.config.durability,
                "data_dir": str(self.root),
                "history": self.history,
                "lineage": hist.lineage_to_json(self.lineage),
                "verification": None if self.verification is None else self.verification.to_json(),
            }

    def stats(self) -> dict[str, Any]:
        """The graph's part of ``status`` (``GET /v1/stats``)."""
        with self.lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
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
                "cold": {"stubs": self.warm.cold_stub_count()},
            },
        }

    def recompute_digest(self, committed_sum: Callable[[Path], int] | None = None) -> dg.Digest:
        """The digest recomputed from the stored graph (fast-tier versions the warm tier does
        not have yet take the place of its rows), in this process. ``committed_sum(path)``, when
        given, may sum the memory rows of the committed database file instead (the backup
        layer's row scan across processes): ``WarmTier.digest_sum`` uses it only when the warm
        tier has nothing uncommitted, and the engine lock is held meanwhile, so nothing
        commits while it reads."""
        with self.lock:
            dirty = {m.id: m for m in self.fast.dirty_snapshot()}
            total = self.warm.digest_sum(dirty, committed_sum)
            for e in self.warm.iter_edges():
                total += dg.edge_hash(e)
            return dg.Digest(total)
