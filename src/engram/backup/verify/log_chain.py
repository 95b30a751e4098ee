"""The op log and its digest chain (`engram verify`'s checks 5 and 6): every segment's framing,
ids and continuity, and the rolling digest replayed along the log from each segment's
``base_digest`` (O7), which must reach the warm tier's stored digest at ``applied_lsn`` and gives
the digest at the log's end.

Run after the warm tier's snapshot is taken, so the log always reaches ``applied_lsn``; records
past it are not checkpointed yet, checked for framing and continuity and replayed into the
log-end digest. A torn tail of the last segment is a warning (recovery cuts it, O5).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import msgspec

from engram import digest as dg
from engram.backup.verify.report import Findings
from engram.errors import CorruptLog
from engram.format import record as fmt
from engram.model import OpType
from engram.oplog.reader import LogFile, list_segments

HEX64 = re.compile(r"[0-9a-f]{64}")
# Digest-neutral records: markers carry no state; archiving keeps a memory in the logical graph.
_NO_DIGEST = frozenset({OpType.MARKER, OpType.ARCHIVE_MEMORIES, OpType.RESTORE_MEMORIES})
IMAGE_ERRORS = (msgspec.MsgspecError, TypeError, ValueError, AttributeError)


def check_oplog(
    found: Findings,
    oplog_dir: Path,
    applied: int | None,
    stored: dg.Digest | None,
    expected_id: str | None,
) -> None:
    """Check every log segment in ``oplog_dir`` (header, database id, record CRCs, LSN
    continuity, timestamps) and replay the digest chain along it (``_Chain``) against the warm
    tier's ``applied`` LSN and ``stored`` digest; the log end and its digest go into the
    report."""
    segs = list_segments(oplog_dir)
    res = found.report.checks["oplog"]
    if not segs:
        res.detail = "no segments"
        if applied:
            found.warn(
                "oplog",
                "oplog/",
                f"no log segments although the warm tier is at LSN {applied}; records up "
                "to it cannot be replayed from this data dir (start-up opens a new segment)",
            )
        return
    # Replay from the segment holding applied_lsn+1 (or from the first with --check-all), so
    # the log is checked to reproduce the stored digest at applied_lsn and its end is known.
    start = 0
    if not found.report.check_all and applied is not None:
        start = max((i for i, (lsn, _) in enumerate(segs) if lsn <= applied + 1), default=0)
    chain = _Chain(found, applied, stored)
    expect: int | None = None
    last_ts = 0
    log_end: int | None = None
    tail_read = False  # the last segment was read to its end: log_end is the true end
    for i, (first, path) in enumerate(segs):
        name = f"oplog/{path.name}"
        last = i == len(segs) - 1
        try:
            lf = LogFile.open(path)
        except CorruptLog as e:
            # (The writer renames a segment into place whole, so a live log never shows a
            # partial header; a segment can vanish only through pruning.)
            if not path.exists():
                found.warn("oplog", name, "the segment was removed while verify ran")
            else:
                found.problem("oplog", name, e.message.removeprefix(f"{path}: "))
            expect = None
            chain.lost()
            continue
        found.report.segments_checked += 1
        h_first = lf.header.get("first_lsn")
        if lf.database_id != expected_id and expected_id is not None:
            found.problem(
                "oplog",
                name,
                f"belongs to database {lf.database_id}, not {expected_id}; move it out of oplog/",
            )
            expect = None
            chain.lost()
            continue
        if h_first != first:
            found.problem("oplog", name, f"header says first LSN {h_first}, name says {first}")
        if expect is not None and first != expect:
            what = "missing" if first > expect else "overlapping"
            found.problem(
                "oplog",
                name,
                f"starts at LSN {first} but the previous segment ends at {expect - 1}: "
                f"records {min(first, expect)}..{max(first, expect) - 1} are {what}",
            )
        chain.segment_start(i >= start, first, lf.header.get("base_digest"), name)
        damaged = False
        first_ts: int | None = None
        try:
            for rec in lf.records(allow_torn_tail=last):
                if first_ts is None:
                    first_ts = rec.ts_ns
                found.report.records_checked += 1
                chain.record(rec, name)
        except CorruptLog as e:
            damaged = True
            msg = e.message.removeprefix(f"{path.name}: ")
            found.problem("oplog", f"{name}@{e.details.get('offset')}", msg)
            chain.lost()
        if lf.first_lsn is not None:
            if lf.first_lsn != first:
                found.problem("oplog", name, f"first record is LSN {lf.first_lsn}, not {first}")
            if first_ts is not None and first_ts < last_ts:
                found.problem("oplog", name, "timestamps go backwards from the previous segment")
            last_ts = lf.last_ts
            if found.report.log_first_lsn is None:
                found.report.log_first_lsn = lf.first_lsn
        if lf.torn is not None:
            found.warn(
                "oplog",
                f"{name}@{lf.torn.offset}",
                f"torn tail ({lf.torn.reason}); start-up cuts it, nothing acknowledged is lost",
            )
        end = lf.last_lsn if lf.last_lsn is not None else first - 1
        expect = None if damaged else end + 1
        if last or not damaged:
            log_end = end if log_end is None else max(log_end, end)
        tail_read = last and not damaged
    found.report.log_last_lsn = log_end
    found.report.log_end_digest = chain.end_digest(log_end)
    if applied is not None:
        if segs[0][0] > applied + 1:
            found.problem(
                "oplog",
                f"oplog/{segs[0][1].name}",
                f"the warm tier is at LSN {applied} but the log starts at {segs[0][0]}: "
                f"records {applied + 1}..{segs[0][0] - 1} are missing",
            )
        # (Damage in the last segment hides where the log ends: reported above instead.)
        if tail_read and log_end is not None and log_end < applied:
            found.problem(
                "oplog",
                "meta applied_lsn",
                f"applied_lsn {applied} is past the log end {log_end}: the log lost records",
            )
    res.detail = (
        f"{found.report.segments_checked} segments, {found.report.records_checked} records, "
        f"LSN {found.report.log_first_lsn}..{log_end}, applied {applied}"
    )


class _Chain:
    """The rolling digest along the log (O7): each segment's ``base_digest`` is the digest at
    its first LSN - 1, and replaying before/after images moves it record by record. At
    ``applied_lsn`` it must equal the warm tier's stored digest; past it, it gives the log-end
    digest. ``rolling`` is None when unknown (not replaying yet, or after damage): the next
    segment's header is then adopted without a comparison."""

    def __init__(self, found: Findings, applied: int | None, stored: dg.Digest | None) -> None:
        self.found = found
        self.applied = applied
        self.stored = stored
        self.rolling: dg.Digest | None = None
        self.origin = ""
        self.replaying = False
        self.last_lsn: int | None = None  # the LSN ``rolling`` (or the damage) stands at
        self.lost_at: int | None = None
        # The log-end digest is trustworthy only if no record past applied_lsn went unreplayed.
        self.end_unknown = False

    def lost(self) -> None:
        if self.replaying and self.lost_at is None:
            self.lost_at = self.last_lsn if self.last_lsn is not None else 0
        self.rolling = None

    def segment_start(self, replay: bool, first: int, base: Any, name: str) -> None:
        self.replaying = self.replaying or replay
        if not self.replaying:
            return
        if self.lost_at is not None:
            # Records (lost_at, first - 1] were not replayed: past applied_lsn they are missing
            # from the log-end digest.
            if self.applied is None or first - 1 > max(self.lost_at, self.applied):
                self.end_unknown = True
            self.lost_at = None
        self.last_lsn = first - 1
        if not (isinstance(base, str) and HEX64.fullmatch(base)):
            self.found.problem("digest", name, f"header base_digest {base!r} is not a digest")
            self.lost()
            return
        if self.rolling is None:
            self.rolling = dg.Digest.from_hex(base)
            self.origin = f"the base_digest of {name}"
        elif self.rolling.hex != base:
            self.found.problem(
                "digest",
                name,
                f"header base_digest {base} differs from the digest {self.rolling.hex} the log "
                f"gives at LSN {first - 1}",
            )
        self._at(first - 1, name)

    def record(self, rec: fmt.Record, name: str) -> None:
        if self.rolling is None:
            return
        self.last_lsn = rec.lsn
        if rec.op not in _NO_DIGEST:
            t = time.perf_counter()
            try:
                self.rolling.replace(rec.decode_before(), rec.decode_after())
            except IMAGE_ERRORS as e:
                self.found.problem("digest", f"{name} LSN {rec.lsn}", f"undecodable image ({e})")
                self.lost()
                return
            finally:
                self.found.digest_seconds += time.perf_counter() - t
        if rec.txn_end:
            self._at(rec.lsn, name)

    def _at(self, lsn: int, name: str) -> None:
        if lsn != self.applied or self.stored is None or self.rolling is None:
            return
        if self.rolling != self.stored:
            self.found.problem(
                "digest",
                f"{name} LSN {lsn}",
                f"replaying the log from {self.origin} gives {self.rolling.hex} at applied_lsn "
                f"{lsn}, but the warm tier stores {self.stored.hex}",
            )
        # From here on the stored digest is the reference (the committed warm state).
        self.rolling = self.stored.copy()
        self.origin = "the stored digest"

    def end_digest(self, log_end: int | None) -> str | None:
        if self.applied is not None and log_end is not None and log_end <= self.applied:
            return self.stored.hex if self.stored is not None else None
        if self.end_unknown or self.rolling is None or self.last_lsn != log_end:
            return None
        return self.rolling.hex
