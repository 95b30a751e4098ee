"""Recovery on open (docs/DESIGN.md O5): warm tier at ``applied_lsn``, then replay the log
after it.

Every segment's header is checked (database id, first LSN, history); only the records after
``applied_lsn`` are read, verified and replayed. The warm tier records, with ``applied_lsn``,
where in its segment the transaction holding that LSN starts (``LOG_POSITION``); recovery
begins reading there once the record found at that offset proves it (a whole, checksummed record
of the LSN named, starting a transaction), and reads the segment from its start otherwise. So an
open costs what is unapplied, not the size of the log; a scan of every record is `engram
verify`'s. A torn tail of the last segment is cut with a warning; any other damage in what is
read stops start-up with the segment and offset named.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engram import digest as dg
from engram.errors import CorruptData, CorruptLog, DataDirError, ForeignLog, LogGap
from engram.format import history as hist
from engram.format.record import Record
from engram.oplog.reader import LogFile, iter_log_files, list_segments, read_header
from engram.oplog.writer import LogWriter
from engram.replay import ReplayBatch
from engram.replay import batches as replay_batches
from engram.tiers.warm import WarmTier

log = logging.getLogger("engram")

REPLAY_BATCH = 10_000
# The warm tier's meta key of the log position that goes with its ``applied_lsn``.
LOG_POSITION = "log_position"


@dataclass(frozen=True)
class LogPosition:
    """The record of LSN ``lsn`` starts a transaction at ``offset`` of the segment whose first
    LSN is ``segment``; valid while the warm tier's ``applied_lsn`` is ``at`` (``lsn <= at``)."""

    at: int
    segment: int
    offset: int
    lsn: int

    def to_meta(self) -> str:
        return json.dumps(
            {"at": self.at, "segment": self.segment, "offset": self.offset, "lsn": self.lsn},
            separators=(",", ":"),
        )

    @classmethod
    def from_meta(cls, text: str | None) -> LogPosition | None:
        """The position ``text`` names, or None when it is absent or not one."""
        if not text:
            return None
        try:
            d = json.loads(text)
            pos = cls(int(d["at"]), int(d["segment"]), int(d["offset"]), int(d["lsn"]))
        except (ValueError, TypeError, KeyError):
            return None
        ok = 0 < pos.segment <= pos.lsn <= pos.at and pos.offset > 0
        return pos if ok else None


def log_position(at: int, pos: tuple[int, int, int] | None) -> str | None:
    """``LOG_POSITION``'s value for ``applied_lsn`` ``at`` and a writer's ``position()``."""
    if pos is None or pos[2] > at:
        return None
    return LogPosition(at, *pos).to_meta()


@dataclass
class Recovered:
    digest: dg.Digest
    last_lsn: int
    last_ts: int
    replayed: int


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise DataDirError(
            f"{path}: cannot sync the op log ({e.strerror}); fix the disk, then start again"
        ) from None


def check_segment_headers(
    segs: list[tuple[int, Path]], database_id: str, lineage: hist.Lineage | None = None
) -> None:
    """Every segment is of this database, named by its first LSN and, with a ``lineage``, of a
    history on that path starting where that history still owns records."""
    caps = hist.caps(lineage) if lineage is not None else None
    for first, path in segs:
        h = read_header(path)
        if h.get("database_id") != database_id:
            raise ForeignLog(
                f"{path} belongs to database {h.get('database_id')}, but this data dir is "
                f"{database_id}; move that file out of oplog/"
            )
        if caps is not None and lineage is not None:
            own = hist.history_of(h)
            cap = caps.get(own, -1)
            if own not in caps or (cap is not None and first > cap + 1):
                raise ForeignLog(
                    f"{path} holds records of history {own} from LSN {first}, which this data "
                    f"dir's history {lineage[-1].id} does not hold; move that file out of oplog/"
                )
        if h.get("first_lsn") != first:
            raise CorruptLog(
                f"{path.name}: header says first LSN {h.get('first_lsn')}, name says {first}",
                segment=str(path),
                offset=0,
            )


def replay(
    warm: WarmTier,
    files: list[Path | LogFile],
    database_id: str,
    digest: dg.Digest,
    after_lsn: int,
    *,
    torn_tail_last: bool,
    opened: list[LogFile] | None = None,
    progress: Callable[[int, int], None] | None = None,
    lineage: hist.Lineage | None = None,
) -> tuple[int, int, int]:
    """Apply records after ``after_lsn`` to ``warm`` in batches, committing on transaction
    boundaries.
    Reading and decoding run in a reader thread beside the SQLite work (``engram.replay``).
    Returns (last_lsn, last_ts, count)."""
    st = {"lsn": after_lsn, "ts": 0, "n": 0, "since": 0}
    t0 = last_report = time.monotonic()

    def txns(_: object) -> Iterator[list[Record]]:
        txn: list[Record] = []
        for rec in iter_log_files(
            files, database_id, after_lsn, torn_tail_last, opened, lineage=lineage
        ):
            txn.append(rec)
            if not rec.txn_end:
                continue
            yield txn
            txn = []

    def apply(batch: ReplayBatch) -> None:
        nonlocal last_report
        warm.begin()
        try:
            warm.apply_batch(batch.records, batch.afters)
        except (ValueError, TypeError, AttributeError) as e:
            raise CorruptLog(
                f"records {batch.records[0].lsn}..{batch.records[-1].lsn} cannot be applied: "
                f"{e}; restore from a backup (docs/RUNBOOK.md)"
            ) from None
        digest.value = (digest.value + batch.digest_delta) % dg.MOD
        last = batch.records[-1]
        st["lsn"], st["ts"] = last.lsn, last.ts_ns
        st["n"] += len(batch.records)
        st["since"] += len(batch.records)
        if st["since"] >= REPLAY_BATCH:
            warm.commit(st["lsn"], digest.hex, st["ts"])
            st["since"] = 0
            if progress is not None:
                progress(st["n"], st["lsn"])
            now = time.monotonic()
            if now - last_report >= 2.0:
                rate = st["n"] / max(now - t0, 1e-9)
                log.info("replayed %d records up to LSN %d (%.0f/s)", st["n"], st["lsn"], rate)
                last_report = now

    warm.begin()
    replay_batches(txns, apply)
    warm.commit(st["lsn"], digest.hex, st["ts"] or None)
    if progress is not None:
        progress(st["n"], st["lsn"])
    return st["lsn"], st["ts"], st["n"]


def recover(
    warm: WarmTier,
    oplog_dir: Path,
    database_id: str,
    writer: LogWriter,
    progress: Callable[[int, int], None] | None = None,
) -> Recovered:
    """Replay the log after the warm tier's LSN; the writer appends to the last segment, or to
    a new one when the last is of another history than the writer's (``writer.lineage``: a new
    history had begun when the process stopped)."""
    lineage = writer.lineage
    stored_id = warm.get_meta("database_id")
    if stored_id is None:
        warm.begin()
        warm.set_meta("database_id", database_id)
        warm.commit(warm.applied_lsn, warm.get_meta("digest", dg.EMPTY) or dg.EMPTY)
    elif stored_id != database_id:
        raise CorruptData(
            f"the warm tier belongs to database {stored_id} but identity.json says {database_id}; "
            "restore the data dir from a backup"
        )
    applied = warm.applied_lsn
    digest = dg.Digest.from_hex(warm.get_meta("digest", dg.EMPTY) or dg.EMPTY)
    last_ts = int(warm.get_meta("last_ts", "0") or 0)
    segs = list_segments(oplog_dir)
    if not segs:
        writer.start_segment(applied + 1, digest.hex)
        writer.written_lsn = writer.durable_lsn = applied
        return Recovered(digest, applied, last_ts, 0)
    check_segment_headers(segs, database_id, lineage)
    if segs[0][0] > applied + 1:
        raise LogGap(
            f"the warm tier is at LSN {applied} but the log starts at {segs[0][0]}: records "
            f"{applied + 1}..{segs[0][0] - 1} are missing; restore from a backup",
        )
    start = max(i for i, (first, _) in enumerate(segs) if first <= applied + 1)
    paths = [p for _, p in segs[start:]]
    # After a process crash the log tail may be in the page cache only. The warm tier must not
    # commit records the disk does not hold yet (O4), or a power cut now would leave it ahead of
    # the log: make them durable before replaying them.
    for p in paths:
        _fsync_file(p)
    files: list[Path | LogFile] = list(paths)
    stored = warm.get_meta(LOG_POSITION)
    first_file = _open_at_position(LogPosition.from_meta(stored), applied, segs[start])
    if first_file is not None:
        files[0] = first_file
    opened: list[LogFile] = []
    t0 = time.monotonic()
    last_lsn, ts, n = replay(
        warm,
        files,
        database_id,
        digest,
        applied,
        torn_tail_last=True,
        opened=opened,
        progress=progress,
        lineage=lineage,
    )
    tail = opened[-1]
    log_end = tail.last_lsn if tail.last_lsn is not None else segs[-1][0] - 1
    if tail.last_lsn is None and max(last_lsn, applied) < log_end:
        # An empty last segment must start right after the records before it; appending to
        # it otherwise would write LSNs that contradict its name and header.
        raise LogGap(
            f"records {max(last_lsn, applied) + 1}..{log_end} are missing before "
            f"{tail.path.name}; restore from a backup (docs/RUNBOOK.md)",
            missing_from=max(last_lsn, applied) + 1,
            missing_to=log_end,
        )
    if log_end < applied:
        raise CorruptData(
            f"the warm tier is at LSN {applied} but the log ends at {log_end}; the log lost "
            "records — restore from a backup (docs/RUNBOOK.md)"
        )
    if tail.torn is not None:
        log.warning(
            "%s: cut a torn tail at offset %d (%s); nothing acknowledged was lost",
            tail.path.name,
            tail.torn.offset,
            tail.torn.reason,
        )
    end = max(last_lsn, log_end)
    last_txn = None
    if tail.last_txn_lsn is not None and tail.last_txn_offset is not None:
        last_txn = (tail.last_txn_lsn, tail.last_txn_offset)
    writer.open_existing(tail.path, tail.valid_end, end, last_txn)
    if tail.history != lineage[-1].id:
        writer.start_segment(end + 1, digest.hex)
    # The next open starts reading where this one ended, when the warm tier is at the log's
    # end (it is unless the log holds records of a history this data dir left).
    mark = log_position(end, writer.position()) if end == max(last_lsn, applied) else None
    if mark is not None and mark != stored:
        warm.begin()
        warm.set_meta(LOG_POSITION, mark)
        warm.commit(end, digest.hex)
    if n:
        dt = time.monotonic() - t0
        log.info("recovery replayed %d records in %.2fs (%.0f/s)", n, dt, n / max(dt, 1e-9))
    return Recovered(digest, max(last_lsn, applied), ts or last_ts, n)


def _open_at_position(
    pos: LogPosition | None, applied: int, seg: tuple[int, Path]
) -> LogFile | None:
    """The segment ``seg`` (the one holding the record after ``applied``) read from the
    position the warm tier recorded, when that position is for ``applied``, lies in ``seg``,
    and the record there is the one it names; else None (the segment is read from its start).
    A position is never trusted without that record: a segment replaced or damaged since it
    was recorded is read whole, and checked as it always was."""
    first, path = seg
    if pos is None or pos.at != applied or pos.segment != first or pos.lsn < first:
        return None
    try:
        lf = LogFile.open_at(path, pos.offset)
    except (ValueError, CorruptLog):
        return None
    if not lf.starts_with(pos.lsn):
        log.warning(
            "%s: the warm tier's log position (offset %d, LSN %d) does not hold that record; "
            "reading the segment from its start",
            path.name,
            pos.offset,
            pos.lsn,
        )
        return None
    return lf
