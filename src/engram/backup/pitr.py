"""Applying logs and point-in-time recovery (docs/DESIGN.md "What a backup proves").

Every log is scanned completely before anything is applied — CRCs, database id, continuity from
the target's LSN, the covered range, restore points — so a damaged, foreign or gapped log, or a
target outside the covered range, is refused with nothing changed. Then whole transactions are
appended to the data dir's own log and applied, stopping at the target: a time (inclusive),
an LSN or a restore point name, always on a transaction boundary.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engram import digest as dg
from engram.backup.archive import sha256_file
from engram.backup.catalog import FAILED, PENDING, Entry, read_catalog
from engram.backup.history import read_tree
from engram.backup.restore import (
    Archive,
    archive_name,
    check_target,
    describe_archive,
    discard,
    extract_backup,
    fsync_tree,
    local_archive,
    open_and_check,
    place,
    staging_dir,
    staging_for,
)
from engram.backup.rowscan import recompute_digest
from engram.errors import (
    BadArchive,
    CorruptData,
    DataDirLocked,
    ForeignLog,
    RestoreError,
    UsageError,
)
from engram.format import history as hist
from engram.format import record as fmt
from engram.format.manifest import decode_sidecar
from engram.format.record import Record
from engram.graph import Engine
from engram.model import OpType, ns_to_iso
from engram.oplog.reader import iter_log_files, read_header
from engram.procs import Resources
from engram.replay import ReplayBatch, prepare_replay
from engram.replay import batches as replay_batches
from engram.storage import BackupStore, LocalBackupStore, Ref, as_store, sidecar_name

Progress = Callable[[int, int], None]


# -- targets ---------------------------------------------------------------------------------


# Log timestamps are nanoseconds since the Unix epoch; engram keeps them in a signed 64-bit
# integer, so a target outside this range cannot be compared with any record.
TIME_MAX_NS = 2**63 - 1
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_FORMATS = (
    "use 'YYYY-MM-DD HH:MM:SS' (local time) or ISO 8601 with Z or an offset, "
    "e.g. 2025-10-24T14:30:00Z"
)


def _offset(local: dt.datetime, instant: dt.datetime) -> str:
    """The UTC offset that reads the wall time ``local`` as ``instant``, as +HH:MM."""
    secs = int((local.replace(tzinfo=dt.UTC) - instant).total_seconds())
    sign, secs = ("-" if secs < 0 else "+"), abs(secs)
    return f"{sign}{secs // 3600:02d}:{secs % 3600 // 60:02d}"


def _from_local(d: dt.datetime) -> tuple[dt.datetime, str | None]:
    """The instant of the local wall time ``d`` (as ``date`` prints it), and a note when a
    clock change makes it ambiguous or non-existent. Both are read with the UTC offset in force
    before the change: a time that occurs twice (clocks going back) is its first occurrence, the
    earlier instant; a time the clocks skipped (going forward) lands after the gap."""
    a = d.replace(fold=0).astimezone()
    b = d.replace(fold=1).astimezone()
    if a == b:
        return a, None
    first, later = sorted((a, b))
    wall = d.replace(fold=0, microsecond=d.microsecond)
    real = [x for x in (first, later) if x.astimezone().replace(tzinfo=None) == wall]
    text = d.isoformat(" ")
    if len(real) == 2:
        return first, (
            f"local time {text} occurs twice (the clocks went back); read as its first "
            f"occurrence, UTC{_offset(d, first)}: {ns_to_iso(_ns(first))} — give an offset "
            "to choose the other"
        )
    if not real:
        shown = later.astimezone().replace(tzinfo=None).isoformat(" ")
        return later, (
            f"local time {text} does not exist (the clocks went forward); read with the offset "
            f"before the change, UTC{_offset(d, later)}: {ns_to_iso(_ns(later))}, which is "
            f"{shown} local time"
        )
    return real[0], None


def _ns(d: dt.datetime) -> int:
    delta = d - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def read_time(text: str) -> tuple[int, str | None]:
    """UTC ns of ``YYYY-MM-DD HH:MM:SS[.ffffff]`` (local time) or ISO 8601 with Z or an offset,
    and a note saying how a local time that a clock change makes ambiguous or non-existent was
    read (``_from_local``). Every time that is not in engram's range is a usage error."""
    s = text.strip()
    try:
        d = dt.datetime.fromisoformat(s.replace(" ", "T", 1) if " " in s else s)
    except ValueError:
        raise UsageError(f"cannot read the time {text!r}; {_FORMATS}") from None
    note = None
    out_of_range = UsageError(
        f"the time {text!r} cannot be represented: engram's times run from "
        f"{ns_to_iso(0)} to {ns_to_iso(TIME_MAX_NS)} (nanoseconds in a signed 64-bit integer); "
        "give a time in that range"
    )
    try:
        if d.tzinfo is None:
            d, note = _from_local(d)
        ns = _ns(d)
    except (ValueError, OverflowError, OSError):  # beyond datetime's or the C library's range
        raise out_of_range from None
    if not 0 <= ns <= TIME_MAX_NS:
        raise out_of_range
    return ns, note


def parse_time(text: str) -> int:
    """UTC ns of a target time (``read_time`` without its note)."""
    return read_time(text)[0]


@dataclass(frozen=True)
class Target:
    """Where a replay stops. A restore point ``name`` means the LSN of its marker record, and
    the replay stops right after the transaction holding it; once that LSN is known (``lsn``
    set with ``name``) it is found the same way in every base and log that holds it."""

    time_ns: int | None = None
    lsn: int | None = None
    name: str | None = None
    note: str | None = field(default=None, compare=False)  # how a local time was read

    @classmethod
    def from_options(
        cls, time_text: str | None, lsn: int | None, name: str | None, required: bool
    ) -> Target:
        given = [x for x in (time_text, lsn, name) if x is not None]
        if len(given) > 1:
            raise UsageError("give only one of --target-time, --target-lsn, --target-name")
        if not given and required:
            raise UsageError("give a target: --target-time, --target-lsn or --target-name")
        if lsn is not None and lsn < 0:
            raise UsageError("--target-lsn must be a non-negative LSN")
        if time_text is None:
            return cls(None, lsn, name)
        ns, note = read_time(time_text)
        return cls(ns, None, None, note)

    @property
    def given(self) -> bool:
        return self.time_ns is not None or self.lsn is not None or self.name is not None

    @property
    def through_txn(self) -> bool:
        """A resolved restore point: the transaction holding ``lsn`` is replayed whole."""
        return self.name is not None and self.lsn is not None

    def resolved(self, lsn: int) -> Target:
        return Target(lsn=lsn, name=self.name)

    def past(self, rec: Record) -> bool:
        """Whether ``rec`` lies beyond the target (an LSN target stops at the last transaction
        boundary at or before it; a restore point takes the whole transaction holding it)."""
        if self.time_ns is not None:
            return rec.ts_ns > self.time_ns
        if self.lsn is None:
            return False
        return rec.txid > self.lsn if self.through_txn else rec.lsn > self.lsn

    def describe(self) -> str:
        if self.time_ns is not None:
            return f"time {ns_to_iso(self.time_ns)}"
        if self.name is not None:
            at = f" (LSN {self.lsn})" if self.lsn is not None else ""
            return f"restore point {self.name!r}{at}"
        if self.lsn is not None:
            return f"LSN {self.lsn}"
        return "the end of the logs"


# -- log files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogSource:
    path: Path
    kind: int
    database_id: str
    first_lsn: int
    lineage: hist.Lineage = ()  # its history and that history's ancestors

    @property
    def history(self) -> str:
        return self.lineage[-1].id if self.lineage else self.database_id


# What names logs to replay: a file or directory, a log in a store, or a store (every log at
# its top level, as a directory's).
LogArg = Path | Ref | BackupStore


@contextmanager
def local_logs(logs: Sequence[LogArg], beside: Path) -> Iterator[list[Path]]:
    """``logs`` as local paths for the block. A path is used as it is, as is a log or a store
    that is a local directory. A log in an object store is fetched once, with its sidecar,
    into a private dir beside ``beside`` (held by this process like a restore's staging dir,
    removed when the block ends): an incremental is read several times (its range, its
    records, then the replay), and it is small — the records of a range, not an archive. Its
    bytes are checked against the hash recorded with it as they arrive (``ObjectReader``)."""
    paths: list[Path] = []
    remote: list[Ref] = []
    for item in logs:
        if isinstance(item, Ref):
            if isinstance(item.store, LocalBackupStore):
                paths.append(item.store.path(item.name))
            else:
                remote.append(item)
        elif isinstance(item, (str, os.PathLike)):
            paths.append(Path(item))
        elif isinstance(item, LocalBackupStore):
            paths.append(item.root)
        else:
            names = [n for n in item.list() if "/" not in n and n.endswith(".log")]
            if not names:
                raise UsageError(f"no log files found in {item.describe()}")
            remote.extend(Ref(item, n) for n in names)
    if not remote:
        yield paths
        return
    work = staging_dir(beside, "logs")
    try:
        for i, ref in enumerate(remote):
            d = work / str(i)
            d.mkdir(mode=0o700)
            dest = d / archive_name(ref)
            with ref.store.open(ref.name) as src, open(dest, "xb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            try:
                side = ref.store.read(sidecar_name(ref.name))
            except FileNotFoundError:
                continue
            (d / (dest.name + ".sha256")).write_bytes(side)
        yield paths + [work / str(i) / archive_name(r) for i, r in enumerate(remote)]
    finally:
        discard(work)


def collect_logs(paths: list[Path], database_id: str) -> list[LogSource]:
    """Log files named directly or found in the given directories (oplog/ or a backup dir),
    sidecars checked, sorted by first LSN. A foreign database's log is refused."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(q for q in p.iterdir() if q.is_file() and q.suffix == ".log"))
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"{p} does not exist; give a log file or a directory of them")
    out: list[LogSource] = []
    for f in files:
        h = read_header(f)
        kind = fmt.KIND_INCREMENTAL if "from_lsn" in h else fmt.KIND_SEGMENT
        if h.get("database_id") != database_id:
            raise ForeignLog(
                f"{f} belongs to database {h.get('database_id')}, but the target is database "
                f"{database_id}; use logs of the same database"
            )
        side = f.with_name(f.name + ".sha256")
        if side.exists() and decode_sidecar(side.read_bytes(), side.name) != sha256_file(f):
            raise BadArchive(
                f"checksum mismatch: {side.name} does not match {f.name}; the log is damaged"
            )
        first = int(h["from_lsn"] if kind == fmt.KIND_INCREMENTAL else h["first_lsn"])
        try:
            lineage = hist.header_lineage(h)
        except ValueError as e:
            raise BadArchive(
                f"{f}: its header's history is malformed ({e}); the log is damaged"
            ) from None
        out.append(LogSource(f, kind, database_id, first, lineage))
    if not out:
        raise UsageError(f"no log files found in {', '.join(map(str, paths))}")
    out.sort(key=lambda s: (s.first_lsn, s.path.name))
    return out


def replay_path(
    start: hist.Lineage,
    start_lsn: int,
    sources: list[LogSource],
    chosen: hist.Lineage | None = None,
    what: str = "the data dir",
) -> hist.Lineage:
    """The history path a replay follows from ``what`` (on ``start`` at ``start_lsn``) through
    ``sources``: ``chosen`` when given, else the longest lineage among them. Every source must
    lie on it, and ``what`` must hold the same records as the path up to its LSN; otherwise
    ForeignLog names both histories. Nothing ever combines records of two histories."""
    here = hist.upto(start, start_lsn)
    lineages = [here, *(s.lineage for s in sources if s.lineage)]
    path = chosen or max(lineages, key=len)
    ids = [h.id for h in path]
    for src in sources:
        if src.lineage and [h.id for h in src.lineage] != ids[: len(src.lineage)]:
            raise ForeignLog(
                f"{src.path} is of history {src.history}, which is not on the path of history "
                f"{path[-1].id} (the two diverged); give the logs of one history, or choose one "
                "with restore-pitr --repo --history (`engram history` shows the tree)"
            )
    if not hist.agree(start, path, start_lsn):
        mine = hist.owner(start, start_lsn)
        theirs = hist.owner(path, start_lsn)
        raise ForeignLog(
            f"{what} is at LSN {start_lsn} of history {mine.id}, but the logs are of history "
            f"{theirs.id} there: they hold other records at those LSNs — use the logs of history "
            f"{mine.id}, or restore a backup of history {path[-1].id}"
        )
    return path


@dataclass
class Coverage:
    first_lsn: int = 0
    last_lsn: int = 0
    first_ts: int = 0
    last_ts: int = 0
    records: int = 0
    markers: dict[str, int] = field(default_factory=dict)


def _iter(
    sources: list[LogSource],
    database_id: str,
    after: int,
    on_skip: Callable[[Record], None] | None = None,
    lineage: hist.Lineage | None = None,
) -> Any:
    # A data dir's last segment may end in a torn tail; other files must be whole.
    last_is_segment = bool(sources) and sources[-1].kind == fmt.KIND_SEGMENT
    return iter_log_files(
        [s.path for s in sources],
        database_id,
        after,
        last_is_segment,
        on_skip=on_skip,
        lineage=lineage,
    )


def _diverged(lsn: int, theirs: int, ours: int) -> ForeignLog:
    return ForeignLog(
        f"the log's record at LSN {lsn} (time {ns_to_iso(theirs)}) does not continue this data "
        f"dir's history (its last write was at {ns_to_iso(ours)}): the log comes from another "
        "branch of this database's history, e.g. a copy that took writes after a restore — use "
        "the logs of this history"
    )


def _digests_recorded(
    sources: list[LogSource], lineage: hist.Lineage, after: int
) -> dict[int, tuple[str, str]]:
    """LSN -> (digest, file) for every digest the logs' headers record on the path at or after
    ``after``: an incremental's at its end, a segment's before its first record."""
    caps = hist.caps(lineage)
    out: dict[int, tuple[str, str]] = {}
    for src in sources:
        cap = caps.get(src.history)
        h = read_header(src.path)
        if src.kind == fmt.KIND_INCREMENTAL:
            at, d = int(h["to_lsn"]), h.get("digest")
        else:
            at, d = src.first_lsn - 1, h.get("base_digest")
        if isinstance(d, str) and at >= after and (cap is None or at <= cap):
            out.setdefault(at, (d, src.path.name))
    return out


def _digest_differs(lsn: int, ours: str, theirs: str, name: str) -> CorruptData:
    return CorruptData(
        f"replaying up to LSN {lsn} would give digest {ours[:16]}…, but {name} recorded "
        f"{theirs[:16]}… there: the log is of another history of this database or damaged; "
        "nothing was applied — use the logs of this data dir's history"
    )


def scan_logs(
    sources: list[LogSource],
    database_id: str,
    after: int,
    target: Target | None = None,
    after_ts: int = 0,
    lineage: hist.Lineage | None = None,
    digest: str | None = None,
) -> Coverage:
    """Verify every record after ``after`` and measure what the logs cover. With a target, stop
    once it is reached: what lies beyond (even a gap) does not matter for it. With ``after_ts``
    (the timestamp of the data dir's last write), refuse a log of another branch of history:
    its record at ``after`` must carry that timestamp and the next ones may not be older. With
    a ``lineage``, only records of that history path are read (``iter_log_files``). With the
    ``digest`` at ``after``, the digest each record leads to is computed from its images, and
    every digest a log's header records on the path must equal it: a log whose records would
    lead elsewhere is refused before anything is applied."""
    cov = Coverage(first_lsn=after + 1, last_lsn=after)
    recorded = _digests_recorded(sources, lineage, after) if digest and lineage else {}
    running = dg.Digest.from_hex(digest).value if digest else 0
    if after in recorded and digest and recorded[after][0] != digest:
        raise _digest_differs(after, digest, *recorded[after])

    def boundary(rec: Record) -> None:
        if rec.lsn == after and after_ts and rec.ts_ns != after_ts:
            raise _diverged(rec.lsn, rec.ts_ns, after_ts)

    for rec in _iter(sources, database_id, after, boundary, lineage):
        if target is not None and target.past(rec):
            cov.last_lsn, cov.last_ts = rec.lsn, rec.ts_ns
            break
        if not cov.records:
            cov.first_ts = rec.ts_ns
            if after_ts and rec.ts_ns < after_ts:
                raise _diverged(rec.lsn, rec.ts_ns, after_ts)
        cov.records += 1
        cov.last_lsn, cov.last_ts = rec.lsn, rec.ts_ns
        if recorded:
            if rec.op != OpType.MARKER:
                before, after_img = rec.decode_before(), rec.decode_after()
                running = (running + dg.item_hash(after_img) - dg.item_hash(before)) % dg.MOD
            if rec.txn_end and rec.lsn in recorded:
                ours = dg.Digest(running).hex
                if ours != recorded[rec.lsn][0]:
                    raise _digest_differs(rec.lsn, ours, *recorded[rec.lsn])
        if rec.op == OpType.MARKER:  # a name marked twice (allowed once) means the first
            cov.markers.setdefault(rec.target, rec.lsn)
        if (
            target is not None
            and rec.txn_end
            and (
                (target.lsn is not None and rec.lsn >= target.lsn)
                or (target.lsn is None and target.name is not None and target.name in cov.markers)
            )
        ):
            break  # reached exactly: nothing after it is needed
    return cov


def _scan_stop(target: Target, base_lsn: int, base_ts: int) -> Target | None:
    """The target to stop the scan at; None (scan everything) when the target lies before the
    base, so that the refusal can name the whole covered range."""
    if target.lsn is not None and target.lsn < base_lsn:
        return None
    if target.time_ns is not None and base_ts and target.time_ns < base_ts:
        return None
    return target


def named(engine: Engine, target: Target, inside: str) -> Target:
    """A restore point name resolved through the marks of the data dir it will be replayed
    into (a restored base holds those of every record up to its snapshot): the name's LSN at
    the data dir's own LSN means replaying nothing; below it the moment is already behind the
    data dir, which is refused (``inside`` says what to do). A name it does not hold is left
    for the logs (``in_logs``)."""
    if target.name is None or target.lsn is not None:
        return target
    found = engine.get_mark(target.name)
    if found is None:
        return target
    lsn, ts = found
    if lsn < engine.last_lsn:
        raise UsageError(
            f"restore point {target.name!r} is at LSN {lsn} ({ns_to_iso(ts)}), below LSN "
            f"{engine.last_lsn} where {inside}"
        )
    return target.resolved(lsn)


def in_logs(target: Target, cov: Coverage) -> Target:
    """A restore point name resolved through the markers the scan found (unchanged if absent:
    ``check_target_range`` then refuses it)."""
    if target.name is not None and target.lsn is None and target.name in cov.markers:
        return target.resolved(cov.markers[target.name])
    return target


def check_target_range(target: Target, cov: Coverage, base_lsn: int, base_ts: int) -> None:
    covered = f"the base and logs cover LSN {base_lsn}..{cov.last_lsn}" + (
        f", {ns_to_iso(base_ts)} .. {ns_to_iso(cov.last_ts)}" if cov.last_ts else ""
    )
    if target.time_ns is not None:
        if base_ts and target.time_ns < base_ts:
            raise UsageError(
                f"target {target.describe()} is before the base backup's snapshot "
                f"({ns_to_iso(base_ts)}); {covered} — use an older base backup"
            )
        last = cov.last_ts or base_ts
        if target.time_ns > last:
            raise UsageError(
                f"target {target.describe()} is after the last record ({ns_to_iso(last)}); "
                f"{covered} — supply later logs or choose an earlier time"
            )
    elif target.lsn is not None:
        if target.lsn < base_lsn or target.lsn > cov.last_lsn:
            raise UsageError(f"target {target.describe()} is outside the covered range; {covered}")
    elif target.name is not None and target.name not in cov.markers:
        known = ", ".join(sorted(cov.markers)) or "none"
        raise UsageError(
            f"no restore point named {target.name!r} up to LSN {base_lsn} nor in the logs after "
            f"it (restore points there: {known}); {covered}"
        )


@dataclass
class ApplyResult:
    records: int
    from_lsn: int
    to_lsn: int
    to_time: str
    target: str
    duration_s: float
    rate: float
    target_note: str | None = None  # how an ambiguous or skipped local target time was read

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def apply_sources(
    engine: Engine,
    sources: list[LogSource],
    target: Target,
    progress: Progress | None = None,
    expected_total: int = 0,
    lineage: hist.Lineage | None = None,
) -> ApplyResult:
    """Append and apply whole transactions after the engine's LSN, stopping at ``target``; with
    a ``lineage``, only records of that history path, the data dir taking the history of each
    record as it appends it (``Engine.follow``)."""
    t0 = time.monotonic()
    start = engine.last_lsn
    counted = [0, 0]  # records applied, records at the last progress report

    def txns(stop: threading.Event) -> Iterator[list[Record]]:
        txn: list[Record] = []
        for rec in _iter(sources, engine.database_id, start, lineage=lineage):
            txn.append(rec)
            if not rec.txn_end:
                continue
            if target.past(rec):
                return
            hit = (
                target.name is not None
                and target.lsn is None
                and any(r.op == OpType.MARKER and r.target == target.name for r in txn)
            )
            yield txn
            txn = []
            if hit or (target.lsn is not None and rec.lsn >= target.lsn):
                return

    def apply(batch: ReplayBatch) -> None:
        if lineage is not None:
            # A batch may cross the LSN where the path leaves a history: split it there.
            for part in _by_history(batch, lineage):
                engine.follow(lineage, part.records[0].lsn)
                engine.append_prepared(part)
        else:
            engine.append_prepared(batch)
        counted[0] += len(batch.records)
        if progress and counted[0] - counted[1] >= 8192:
            progress(counted[0], expected_total)
            counted[1] = counted[0]

    replay_batches(txns, apply)
    n = counted[0]
    engine.checkpoint()
    _check_header_digests(engine, sources, lineage)
    if progress:
        progress(n, expected_total)
    dur = time.monotonic() - t0
    return ApplyResult(
        records=n,
        from_lsn=start + 1,
        to_lsn=engine.last_lsn,
        to_time=ns_to_iso(engine.last_ts) if engine.last_ts else "",
        target=target.describe(),
        duration_s=round(dur, 3),
        rate=round(n / dur, 1) if dur > 0 else 0.0,
        target_note=target.note,
    )


def _by_history(batch: ReplayBatch, lineage: hist.Lineage) -> list[ReplayBatch]:
    """``batch`` cut where the history owning its records changes on ``lineage`` (always on a
    transaction boundary: a history branches between transactions)."""
    branches = {h.branch_lsn for h in lineage[1:]}
    recs = batch.records
    cuts = [i for i, r in enumerate(recs) if i and r.lsn - 1 in branches]
    if not cuts:
        return [batch]
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(recs)], strict=False):
        out.append(prepare_replay(recs[a:b]))
    return out


def _check_header_digests(
    engine: Engine, sources: list[LogSource], lineage: hist.Lineage | None = None
) -> None:
    """An incremental that ends where the replay ended records the digest there: compare (one
    of another history on the path only when its end is still on the path)."""
    caps = hist.caps(lineage) if lineage is not None else {}
    for src in sources:
        if src.kind != fmt.KIND_INCREMENTAL:
            continue
        cap = caps.get(src.history)
        if cap is not None and engine.last_lsn > cap:
            continue
        h = read_header(src.path)
        if h.get("to_lsn") == engine.last_lsn and h.get("digest") not in (None, engine.digest.hex):
            raise CorruptData(
                f"after replay to LSN {engine.last_lsn} the digest differs from the one "
                f"{src.path.name} recorded there: the data diverged from that history — "
                "restore from a backup of this history"
            )


def check_digest(engine: Engine, resources: Resources | None = None) -> None:
    """The digest recomputed from the replayed graph, with the cores ``resources`` allows
    (default: a command at normal priority), must equal the one maintained along the replay."""
    if recompute_digest(engine, resources or Resources.normal()).hex != engine.digest.hex:
        raise CorruptData(
            "after replay the digest recomputed from the graph differs from the maintained one; "
            "the logs or the base are damaged — use other backups"
        )


def apply_log(
    data_dir: Path,
    logs: Sequence[LogArg],
    target: Target,
    progress: Progress | None = None,
) -> ApplyResult:
    """``engram apply-log``: replay logs (files, directories, logs or stores: ``local_logs``)
    into a data dir that no server holds."""
    try:
        engine = Engine.open(data_dir, create=False)
    except DataDirLocked as e:
        raise RestoreError(
            f"{data_dir} is held by a running engram (pid {e.pid}); stop it before apply-log"
        ) from None
    try:
        with local_logs(logs, Path(data_dir).absolute()) as paths:
            return _apply_log(engine, paths, target, progress)
    finally:
        engine.close()


def _apply_log(
    engine: Engine, logs: list[Path], target: Target, progress: Progress | None
) -> ApplyResult:
    sources = collect_logs(logs, engine.database_id)
    # Everything that can be checked is checked before a record is applied: the history
    # path, continuity and the covered range, and the digests the logs record along it.
    path = replay_path(engine.lineage, engine.last_lsn, sources)
    target = named(engine, target, "the data dir is already; restore an older backup instead")
    early = _scan_stop(target, engine.last_lsn, engine.last_ts)
    cov = scan_logs(
        sources,
        engine.database_id,
        engine.last_lsn,
        early,
        engine.last_ts,
        lineage=path,
        digest=engine.digest.hex,
    )
    target = in_logs(target, cov)
    if target.given:
        check_target_range(target, cov, engine.last_lsn, engine.last_ts)
    result = apply_sources(engine, sources, target, progress, cov.records, path)
    check_digest(engine)
    if result.records:
        engine.mark_recovered("apply-log", target.describe())
    return result


# -- restore-pitr ----------------------------------------------------------------------------


@dataclass
class PitrResult:
    base: str
    logs: list[str]
    output: str
    target: str
    target_utc: str | None
    base_lsn: int
    reached_lsn: int
    reached_time: str
    records: int
    rate: float
    digest: str
    moved_aside: str | None
    duration_s: float
    target_note: str | None = None  # how an ambiguous or skipped local target time was read
    history: str = ""  # the history of the records replayed (the result's own begins later)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RepoChoice:
    """What ``choose_path`` chose: a base, the incrementals after it, the history path the
    replay follows, and a sentence saying so (and what was skipped and why)."""

    base: Path | Ref  # a file of a local directory, else the backup in its store
    logs: list[Path | Ref]
    says: str
    lineage: hist.Lineage


def _where(e: Entry) -> Path | Ref:
    """The backup of entry ``e``: its file when its store is a local directory."""
    return e.path if e.ref is None else local_archive(e.ref)


def choose_from_repo(
    repo: Path | BackupStore, target: Target, history: str | None = None
) -> tuple[Path | Ref, list[Path | Ref], str]:
    """``choose_path`` as (base, incrementals, sentence)."""
    c = choose_path(repo, target, history)
    return c.base, c.logs, c.says


def choose_path(
    repo: Path | BackupStore,
    target: Target,
    history: str | None = None,
    known: hist.Lineage = (),
) -> RepoChoice:
    """The newest full backup before the target on a history's path and the incrementals after
    it in ``repo`` (a directory or a store, read through its catalog and history files only).
    The history is ``history``, else the newest one (the one that began last); its path is its
    own records and its ancestors' up to each branch point, and only backups on that path are
    used (an ancestor's incremental up to the branch point). A backup whose catalog entry is
    damaged or disagrees with its file, whose validation failed, or whose validation is pending
    (never finished, or its verdict could not be recorded) is never chosen. ``known``: histories
    to use where the repository lacks their files (a lineage read from a backup's header)."""
    store = as_store(repo)
    repo_name = store.describe()
    entries, skipped = usable_entries(store)
    if not entries:
        if skipped:  # backups are there, but none can be trusted: a failure, not a usage error
            raise RestoreError(f"no usable backup in {repo_name}; skipped: {'; '.join(skipped)}")
        raise UsageError(
            f"no backups with catalog entries (*.info.json) in {repo_name} — give the directory "
            f"that holds the backups (`engram backups --repo {repo_name}` lists what is there)"
        )
    tree = read_tree(store, {e.database_id for e in entries})
    for h in known:  # a lineage the caller read from a backup's own header
        tree.histories.setdefault(h.id, h)
    skipped += tree.problems
    if history is None:
        chosen = tree.newest({e.history for e in entries} | set(tree.histories))
    elif history in tree.histories:
        chosen = tree.histories[history]
    else:
        there = ", ".join(sorted(tree.histories)) or "none"
        raise UsageError(f"no history {history} in {repo_name} (histories there: {there})")
    lineage = tree.lineage(chosen.id)
    caps = hist.caps(lineage)

    def end_on_path(e: Entry) -> int | None:
        """The last LSN of ``e`` on the path (None: not on it)."""
        if e.history not in caps:
            return None
        cap = caps[e.history]
        if cap is None or e.to_lsn <= cap:
            return e.to_lsn
        return cap if e.kind == "incremental" and e.from_lsn <= cap + 1 else None

    on_path = [e for e in entries if end_on_path(e) is not None]
    fulls = [e for e in on_path if e.kind == "full" and end_on_path(e) == e.to_lsn]
    if target.name is not None and target.lsn is None:
        # The name's LSN first, then the same choice as for that LSN: a base at the mark
        # (replaying nothing) is chosen as readily as for --target-lsn.
        target = target.resolved(_repo_mark(repo_name, on_path, target.name, lineage))

    def before(e: Entry) -> bool:
        if target.time_ns is not None:
            return e.to_time_ns <= target.time_ns
        if target.lsn is not None:
            return e.to_lsn <= target.lsn
        return True

    candidates = [e for e in fulls if before(e)]
    if not candidates:
        raise UsageError(
            f"no full backup in {repo_name} before {target.describe()} on history {chosen.id}"
            + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
        )
    base = max(candidates, key=lambda e: (e.to_lsn, e.name))

    def starts_before(e: Entry) -> bool:  # incrementals wholly past the target are not needed
        if target.time_ns is not None:
            return e.from_time_ns <= target.time_ns
        if target.lsn is not None:
            return e.from_lsn <= target.lsn
        return True

    incs = sorted(
        (
            e
            for e in on_path
            if e.kind == "incremental"
            and e.database_id == base.database_id
            and (end_on_path(e) or 0) > base.to_lsn
            and starts_before(e)
        ),
        key=lambda e: (e.from_lsn, e.name),
    )
    says = f"history {chosen.id}: " if len(lineage) > 1 or history is not None else ""
    says += f"base {base.name} (LSN {base.to_lsn})"
    says += f" + {len(incs)} incremental(s)" + (
        f": {', '.join(e.name for e in incs)}" if incs else ""
    )
    if skipped:
        says += f"; skipped: {'; '.join(skipped)}"
    return RepoChoice(_where(base), [_where(e) for e in incs], says, lineage)


def usable_entries(repo: Path | BackupStore) -> tuple[list[Entry], list[str]]:
    """The catalog entries of ``repo`` that a choice may use, and why each other one is not."""
    cat = read_catalog(repo)
    skipped = [p.message for p in cat.problems]
    entries = []
    for e in cat.entries:
        if e.status == PENDING:
            skipped.append(
                f"{e.name}: its validation is pending (it never finished, or its verdict could "
                f"not be recorded) — run `engram validate-backup {e.where}`"
            )
        elif e.status == FAILED:
            skipped.append(f"{e.name}: it failed validation")
        else:
            entries.append(e)
    return entries, skipped


def _repo_mark(
    repo: str, entries: list[Entry], name: str, lineage: hist.Lineage | None = None
) -> int:
    """The LSN of restore point ``name`` on a history path in a backup directory (``entries``:
    the backups on it), from the catalog entries' ``marks`` (a full backup's: those up to its
    snapshot; an incremental's: those in its range). Only an entry without ``marks`` (written
    before incrementals kept them, or rebuilt from its file by validate-backup) has its records
    scanned. A mark past the point where the path leaves an ancestor's history is not on the
    path. A name marked twice (allowed once) means its first marker."""
    caps = hist.caps(lineage) if lineage else {}
    found: list[int] = []

    def keep(lsn: int, history: str) -> None:
        cap = caps.get(history)
        if cap is None or lsn <= cap:
            found.append(lsn)

    for e in entries:
        marks = (e.info or {}).get("marks")
        if isinstance(marks, dict):
            at = marks.get(name)
            lsn = at.get("lsn") if isinstance(at, dict) else None
            if isinstance(lsn, int) and not isinstance(lsn, bool):
                keep(lsn, e.history)
            continue
        if e.kind != "incremental":
            continue  # a full backup's restore points are known only through its entry
        with local_logs([_where(e)], Path(tempfile.gettempdir()) / "engram") as paths:
            cov = scan_logs(
                collect_logs(paths, e.database_id),
                e.database_id,
                e.from_lsn - 1,
                lineage=lineage,
            )
        if name in cov.markers:
            keep(cov.markers[name], e.history)
    if not found:
        raise UsageError(
            f"no restore point named {name!r} in the catalog entries or the incrementals of {repo}"
        )
    return min(found)


def restore_pitr(
    base: Archive,
    logs: Sequence[LogArg],
    target: Target,
    output: Path,
    force: bool = False,
    progress: Progress | None = None,
    durable: bool = True,
    resources: Resources | None = None,
    lineage: hist.Lineage | None = None,
) -> PitrResult:
    """Restore ``base`` and replay ``logs`` up to ``target`` into ``output``. ``durable=False``
    skips fsyncing the extracted base and the result (a restore test that is thrown away);
    ``resources``: what the digest recompute may use (default: a command at normal priority).
    ``lineage``: the history path to follow (``choose_path``); default the longest lineage of
    the base and the logs, on which all of them must lie (``replay_path``). The result is
    marked recovered: its first write of its own starts a new history."""
    base, output = local_archive(base), Path(output).absolute()
    t0 = time.monotonic()
    check_target(output, force)
    with staging_for(output, "restore-pitr") as staging, local_logs(logs, output) as paths:
        manifest, _ = extract_backup(base, staging, durable=durable)
        engine = open_and_check(staging, manifest, recompute=False, index_repairs=[])
        try:
            base_lsn = engine.last_lsn
            sources = collect_logs(paths, engine.database_id) if paths else []
            path = replay_path(
                engine.lineage,
                base_lsn,
                sources,
                lineage,
                what=f"the base backup {archive_name(base)}",
            )
            target = named(
                engine,
                target,
                "the base backup's snapshot is: the restore point is inside the base backup; "
                "use an older base",
            )
            cov = (
                scan_logs(
                    sources,
                    engine.database_id,
                    base_lsn,
                    _scan_stop(target, base_lsn, manifest["snapshot_time_ns"]),
                    engine.last_ts,
                    lineage=path,
                )
                if sources
                else Coverage(first_lsn=base_lsn + 1, last_lsn=base_lsn)
            )
            target = in_logs(target, cov)
            check_target_range(target, cov, base_lsn, manifest["snapshot_time_ns"])
            res = apply_sources(engine, sources, target, progress, cov.records, path)
            check_digest(engine, resources)
            digest = engine.digest.hex
            history = engine.history
            engine.mark_recovered("restore-pitr", target.describe())
        finally:
            engine.close()
        if durable:
            fsync_tree(staging)
        aside = place(staging, output, force)
    return PitrResult(
        base=describe_archive(base),
        logs=[_describe_log(p) for p in logs],
        output=str(output),
        target=target.describe(),
        target_utc=ns_to_iso(target.time_ns) if target.time_ns is not None else None,
        base_lsn=base_lsn,
        reached_lsn=res.to_lsn,
        reached_time=res.to_time,
        records=res.records,
        rate=res.rate,
        digest=digest,
        moved_aside=aside,
        duration_s=round(time.monotonic() - t0, 3),
        target_note=target.note,
        history=history,
    )


def _describe_log(log: LogArg) -> str:
    if isinstance(log, Ref):
        return log.describe()
    if isinstance(log, (str, os.PathLike)):
        return str(log)
    return log.describe()
