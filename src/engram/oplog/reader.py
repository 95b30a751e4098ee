"""Reading log files: verify every record, find a torn tail, check continuity
(docs/DESIGN.md O2, O5).

Records are yielded a whole transaction at a time: a transaction whose end marker is missing is
never yielded. Damage is reported with the file and byte offset. Only the caller knows whether a
file is the last one of a live log (where a torn tail is expected after a crash); it says so with
``allow_torn_tail``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from engram.errors import CorruptLog, ForeignLog, LogGap
from engram.format import history as hist
from engram.format import record as fmt
from engram.format.record import Record

_NONZERO = re.compile(rb"[^\x00]")


@dataclass
class TornTail:
    offset: int
    reason: str


@dataclass
class LogFile:
    """One log file read into memory (from ``base`` on, see ``open_at``). ``records()``
    verifies as it goes. Every offset it reports (``valid_end``, ``torn``, damage) is an offset
    in the file."""

    path: Path
    data: bytes
    kind: int
    header: dict[str, Any]
    header_size: int
    valid_end: int = 0
    torn: TornTail | None = None
    first_lsn: int | None = None
    last_lsn: int | None = None
    last_ts: int = 0
    count: int = 0
    base: int = 0  # the file offset of ``data[0]``
    # Where the last whole transaction read starts (a file offset) and its first LSN: a
    # position recovery can start at next time (docs/FORMAT.md "Reading and recovery").
    last_txn_offset: int | None = None
    last_txn_lsn: int | None = None
    _done: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LogFile:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise CorruptLog(f"{p}: cannot read log file: {e.strerror}", segment=str(p)) from None
        kind, header, hsize = fmt.decode_file_header(data, str(p))
        return cls(p, data, kind, header, hsize, valid_end=hsize)

    @classmethod
    def open_at(cls, path: str | os.PathLike[str], offset: int) -> LogFile:
        """The file's header, and its records from ``offset`` (a frame boundary the caller
        knows) on, without reading the bytes between them. ``starts_with`` checks that a
        record the caller expects is there before it relies on the offset."""
        p = Path(path)
        try:
            with open(p, "rb") as f:
                kind, header, hsize = _read_head(f, p)
                if offset < hsize:
                    raise ValueError(f"offset {offset} is inside the header of {p}")
                f.seek(offset)
                data = f.read()
        except OSError as e:
            raise CorruptLog(f"{p}: cannot read log file: {e.strerror}", segment=str(p)) from None
        return cls(p, data, kind, header, hsize, valid_end=offset, base=offset)

    def starts_with(self, lsn: int) -> bool:
        """Whether ``data`` begins with a whole, checksummed record of LSN ``lsn`` that starts
        a transaction: the proof that an offset given to ``open_at`` is where that record is."""
        data = self.data
        if len(data) < fmt.FRAME_SIZE + fmt.BODY_FIXED:
            return False
        blen, crc = fmt.unpack_frame(data, 0)
        end = fmt.FRAME_SIZE + blen
        if blen < fmt.BODY_FIXED or blen > fmt.MAX_RECORD or end > len(data):
            return False
        body = memoryview(data)[fmt.FRAME_SIZE : end]
        if fmt.crc32c(body) != crc:
            return False
        got, _, txid = fmt.unpack_head(body)
        return got == lsn and txid == lsn

    @property
    def database_id(self) -> str:
        return str(self.header["database_id"])

    @property
    def history(self) -> str:
        """The history whose records the file holds (docs/FORMAT.md "Histories")."""
        return hist.history_of(self.header)

    def _damage(self, off: int, what: str) -> CorruptLog:
        return CorruptLog(
            f"{self.path.name}: {what} at offset {off}; the log is damaged there — restore from "
            "a backup (docs/RUNBOOK.md) or move the damaged file aside",
            segment=str(self.path),
            offset=off,
        )

    def _tail_is_torn(self, off: int, rec_end: int) -> bool:
        # A crash mid-append leaves a prefix of the last write, or zero-filled blocks.
        if rec_end >= len(self.data):
            return True
        return not any(self.data[rec_end:])

    def _record_follows(self, start: int, after_lsn: int) -> bool:
        """True if a whole, checksummed record with an LSN above ``after_lsn`` starts at or
        after ``start``: then the damage before it is not a torn tail but a hole in the log."""
        data = self.data
        mv = memoryview(data)
        last = len(data) - fmt.FRAME_SIZE - fmt.BODY_FIXED
        p = start
        while p <= last:
            if not any(data[p : p + 4]):  # a length of zero: skip the run of zero bytes
                m = _NONZERO.search(data, p)
                if m is None:
                    return False
                p = max(p + 1, m.start() - 3)
                continue
            blen, crc = fmt.unpack_frame(mv, p)
            end = p + fmt.FRAME_SIZE + blen
            if fmt.BODY_FIXED <= blen and end <= len(data):
                body = mv[p + fmt.FRAME_SIZE : end]
                if fmt.crc32c(body) == crc and fmt.unpack_lsn(body) > after_lsn:
                    return True
            p += 1
        return False

    def records(self, allow_torn_tail: bool = False) -> Iterator[Record]:
        """Yield verified records, whole transactions only."""
        # Reset what a previous pass (verify() then records()) left behind.
        base = self.base
        self.valid_end, self.torn = max(self.header_size, base), None
        self.first_lsn = self.last_lsn = None
        self.last_txn_offset = self.last_txn_lsn = None
        self.last_ts = self.count = 0
        data = self.data
        n = len(data)
        # ``off`` indexes ``data``; ``base + off`` is the offset in the file.
        off = max(self.header_size - base, 0)
        pending: list[Record] = []
        pending_start = off
        mv = memoryview(data)
        prev_lsn = None
        while off < n:
            if n - off < fmt.FRAME_SIZE:
                if allow_torn_tail:
                    self.torn = TornTail(base + off, "partial record frame")
                    break
                raise self._damage(base + off, "truncated record frame")
            blen, crc = fmt.unpack_frame(mv, off)
            end = off + fmt.FRAME_SIZE + blen
            if blen < fmt.BODY_FIXED or blen > fmt.MAX_RECORD or end > n:
                # A record running past the end is a torn write, unless its length field is
                # what is damaged: then whole records follow it, and cutting would lose them.
                if allow_torn_tail and (
                    self._tail_is_torn(off, off)
                    or (end > n and not self._record_follows(off + 1, prev_lsn or 0))
                ):
                    self.torn = TornTail(base + off, "record extends past the end of the file")
                    break
                raise self._damage(base + off, f"invalid record length {blen}")
            body = mv[off + fmt.FRAME_SIZE : end]
            if fmt.crc32c(body) != crc:
                if allow_torn_tail and self._tail_is_torn(off, end):
                    self.torn = TornTail(base + off, "checksum mismatch in the last record")
                    break
                raise self._damage(base + off, "record checksum mismatch")
            try:
                rec = fmt.decode_body(body, data[off:end])
            except (ValueError, UnicodeDecodeError) as e:
                raise self._damage(base + off, f"undecodable record ({e})") from None
            if prev_lsn is not None and rec.lsn != prev_lsn + 1:
                raise self._damage(base + off, f"LSN {rec.lsn} follows {prev_lsn}")
            if rec.ts_ns < self.last_ts:
                raise self._damage(base + off, f"timestamp of LSN {rec.lsn} goes backwards")
            if pending and rec.txid != pending[0].txid:
                raise self._damage(base + off, f"transaction {pending[0].txid} has no end marker")
            prev_lsn = rec.lsn
            self.last_ts = rec.ts_ns
            if not pending:
                pending_start = off
            pending.append(rec)
            off = end
            if rec.txn_end:
                if self.first_lsn is None:
                    self.first_lsn = pending[0].lsn
                self.last_lsn = rec.lsn
                self.last_txn_offset, self.last_txn_lsn = base + pending_start, pending[0].lsn
                self.count += len(pending)
                self.valid_end = base + off
                yield from pending
                pending = []
        if pending:
            if not allow_torn_tail:
                raise self._damage(
                    base + pending_start, f"transaction {pending[0].txid} is incomplete"
                )
            if self.torn is None:
                self.torn = TornTail(base + pending_start, "incomplete transaction at the end")
            else:
                self.torn = TornTail(base + pending_start, self.torn.reason)
        self._done = True

    def verify(self, allow_torn_tail: bool = False) -> None:
        for _ in self.records(allow_torn_tail):
            pass


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a log file (a segment or an incremental backup), read without the records;
    CorruptLog when it is not one."""
    with open(path, "rb") as f:
        return _read_head(f, path)[1]


def _read_head(f: BinaryIO, path: str | os.PathLike[str]) -> tuple[int, dict[str, Any], int]:
    """(kind, header, header size) of the log file open as ``f``, read from its start."""
    head = f.read(4096)
    try:
        return fmt.decode_file_header(head, str(path))
    except CorruptLog:
        f.seek(0)
        return fmt.decode_file_header(f.read(fmt.max_header_size()), str(path))


def list_segments(oplog_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    d = Path(oplog_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        first = fmt.parse_segment_name(p.name)
        if first is not None and p.is_file():
            out.append((first, p))
    out.sort()
    return out


def iter_log_files(
    files: Sequence[Path | LogFile],
    database_id: str | None,
    after_lsn: int = 0,
    torn_tail_last: bool = False,
    opened: list[LogFile] | None = None,
    on_skip: Callable[[Record], None] | None = None,
    lineage: hist.Lineage | None = None,
) -> Iterator[Record]:
    """Records of consecutive log files with LSN > after_lsn, checking ids and continuity.

    Files are read one at a time. They may overlap (records already seen are skipped, O3); a gap
    raises LogGap naming the missing range. Each opened file is appended to ``opened``. With a
    ``lineage``, only records of that path are yielded: a file of a history not on it is refused
    naming both histories, and a file of an ancestor gives its records only up to the LSN where
    the path leaves it (its later records belong to another history).
    """
    expect = after_lsn + 1
    caps = hist.caps(lineage) if lineage is not None else None
    for i, f in enumerate(files):
        lf = f if isinstance(f, LogFile) else LogFile.open(cast(Path, f))
        if opened is not None:
            opened.append(lf)
        if database_id is not None and lf.database_id != database_id:
            raise ForeignLog(
                f"{lf.path} belongs to database {lf.database_id}, not {database_id}; "
                "use the log of this database"
            )
        cap: int | None = None
        if caps is not None and lineage is not None:
            if lf.history not in caps:
                raise ForeignLog(
                    f"{lf.path} holds records of history {lf.history}, which is not on the path "
                    f"of history {lineage[-1].id}; use the logs of that history (`engram "
                    "history` shows the tree)"
                )
            cap = caps[lf.history]
        last = torn_tail_last and i == len(files) - 1
        for rec in lf.records(allow_torn_tail=last):
            if cap is not None and rec.lsn > cap:
                break  # the rest belongs to a history that branched off this path
            if rec.lsn < expect:
                if on_skip is not None:
                    on_skip(rec)
                continue
            if rec.lsn > expect:
                raise LogGap(
                    f"records {expect}..{rec.lsn - 1} are missing before {lf.path.name}; "
                    "supply the log files that cover them",
                    missing_from=expect,
                    missing_to=rec.lsn - 1,
                )
            expect = rec.lsn + 1
            yield rec


def read_range(
    oplog_dir: Path,
    database_id: str,
    from_lsn: int,
    to_lsn: int,
    hint: Callable[[Path, int], int | None] | None = None,
    lineage: hist.Lineage | None = None,
) -> Iterator[tuple[int, int, int, bytes]]:
    """(lsn, ts_ns, txid, framed bytes) of records ``from_lsn..to_lsn`` of a live data dir's
    log, each CRC-checked, in order, without decoding or checking the records before the range
    (``hint(path, lsn)`` may give a frame offset to start at). The range must already be written
    (for instance up to a cut's snapshot LSN); a gap or damage inside it raises."""
    if from_lsn > to_lsn:
        return
    segs = list_segments(oplog_dir)
    if not segs or segs[0][0] > from_lsn:
        oldest = segs[0][0] if segs else None
        raise LogGap(
            f"records from LSN {from_lsn} are no longer in the log"
            + (f" (it starts at {oldest})" if oldest else "")
            + "; take a full backup instead",
            missing_from=from_lsn,
            missing_to=(oldest - 1) if oldest else to_lsn,
        )
    start = 0
    for i, (first, _) in enumerate(segs):
        if first <= from_lsn:
            start = i
    caps = hist.caps(lineage) if lineage is not None else None
    expect = from_lsn
    for first, path in segs[start:]:
        if first > to_lsn:
            break
        with open(path, "rb") as f:
            head = f.read(4096)
            _, header, hsize = fmt.decode_file_header(head, str(path))
            if header["database_id"] != database_id:
                raise ForeignLog(f"{path} belongs to database {header['database_id']}")
            if caps is not None:
                h = hist.history_of(header)
                cap = caps.get(h, -1)
                if cap is not None and cap < first:
                    raise ForeignLog(
                        f"{path} holds records of history {h}, not of this data dir's history "
                        f"{lineage[-1].id if lineage else ''}; move that file out of oplog/"
                    )
            off = (hint(path, expect) if hint is not None else None) or hsize
            f.seek(off)
            data = f.read()
        mv = memoryview(data)
        pos, n = 0, len(data)
        while pos + fmt.FRAME_SIZE <= n:
            blen, crc = fmt.unpack_frame(mv, pos)
            end = pos + fmt.FRAME_SIZE + blen
            if blen < fmt.BODY_FIXED or end > n:
                break
            body = mv[pos + fmt.FRAME_SIZE : end]
            lsn, ts, txid = fmt.unpack_head(body)
            if lsn >= expect:
                if lsn > to_lsn:
                    return
                if lsn != expect or fmt.crc32c(body) != crc:
                    what = "record checksum mismatch" if lsn == expect else f"LSN {lsn} follows"
                    raise CorruptLog(
                        f"{path.name}: {what} at offset {off + pos} while reading LSN "
                        f"{expect}; the log is damaged there — restore from a backup",
                        segment=str(path),
                        offset=off + pos,
                    )
                yield lsn, ts, txid, bytes(mv[pos:end])
                expect = lsn + 1
                if lsn == to_lsn:
                    return
            pos = end
    if expect <= to_lsn:
        raise LogGap(
            f"records {expect}..{to_lsn} are not in {oplog_dir}; take a full backup instead",
            missing_from=expect,
            missing_to=to_lsn,
        )
