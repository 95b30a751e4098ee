"""Incremental backups: the log records of a range, in the op-log format (docs/FORMAT.md).

A chain never has a gap: when the newest backup in the output's store (its directory) ends
before the requested start, the range starts right after it instead, and the result says so.
The output's store is the writer's: ``incremental_backup`` reads it itself; a client writing a
streamed incremental reads its own and sends the LSN the range must start at or before
(``After``).
Ranges always begin on a transaction boundary (a transaction's id is its first LSN), so every
file can be replayed on its own terms.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.backup.archive import Sink
from engram.backup.catalog import backups_of
from engram.backup.full import BackupResult
from engram.backup.output import BackupOutput
from engram.backup.request import output_compression
from engram.errors import BackupError, UsageError
from engram.format import history as hist
from engram.format import record as fmt
from engram.graph import Engine
from engram.model import ns_to_iso
from engram.oplog.reader import LogFile, list_segments
from engram.storage import BackupStore, Ref, as_ref, as_store


@dataclass(frozen=True)
class After:
    """The newest backup of the directory an incremental goes to: the range starts at or before
    ``to_lsn + 1``. ``name`` is its file name (the header's ``parent``), ``where`` how a note
    names its directory."""

    name: str
    to_lsn: int
    where: str


def chain_of(
    where: Path | BackupStore, database_id: str, lineage: hist.Lineage | None = None
) -> After | None:
    """The backup of ``database_id`` in ``where`` (a directory or a store) that reaches furthest
    on the path of ``lineage`` (default: the original history), if any: a backup of an ancestor
    counts up to the LSN where the path leaves that history, one of another history not at all
    (after a recovery, the next incremental starts at the new history's first record after its
    base, not after the abandoned history's newest backup)."""
    store = as_store(where)
    caps = hist.caps(lineage or (hist.original(database_id),))
    best: tuple[int, str] | None = None
    for e in backups_of(store, database_id):
        if e.history not in caps:
            continue
        cap = caps[e.history]
        end = e.to_lsn if cap is None else min(e.to_lsn, cap)
        if e.kind == "incremental" and e.from_lsn > end + 1:
            continue  # none of its records is on this path
        if best is None or (end, e.name) > best:
            best = (end, e.name)
    if best is None:
        return None
    return After(best[1], best[0], store.describe())


def chain_for(where: Path | BackupStore, status: dict[str, Any]) -> After | None:
    """``chain_of`` for the database a server's ``status`` describes (its id and lineage)."""
    db = str(status["database_id"])
    return chain_of(where, db, hist.lineage_from_json(status.get("lineage"), db))


def check_incremental_name(output: Path) -> None:
    """The request's rule for an incremental's output name: not a full archive's (a
    ValidationError)."""
    output_compression("incremental", output.name)


def nothing_to_continue(directory: Path | str) -> UsageError:
    return UsageError(
        f"no earlier backup in {directory} to continue from; give --since or --since-lsn, "
        "or take a full backup there first"
    )


def _first_lsn_since(engine: Engine, since_ns: int, end: int) -> int:
    """The first LSN whose timestamp is at or after ``since_ns``: from the writer's index when
    it reaches back that far, else by scanning the segments newest first."""
    hint = engine.lsn_since(since_ns)
    if hint is not None:
        for _lsn, ts, txid, _ in engine.log_range(hint, end):
            if ts >= since_ns:
                return txid
        return end + 1
    segs = list_segments(engine.layout.oplog)
    for first, path in reversed(segs):
        lf = LogFile.open(path)
        recs = list(lf.records(allow_torn_tail=path == segs[-1][1]))
        if recs and recs[0].ts_ns < since_ns:
            for r in recs:
                if r.ts_ns >= since_ns:
                    return r.txid
            return recs[-1].lsn + 1
        if not recs and first <= 1:
            break
    return segs[0][0] if segs else 1


def incremental_backup(
    engine: Engine,
    output: Path | Ref,
    since_s: float | None = None,
    since_lsn: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BackupResult:
    """Write the records of a range to the new object ``output`` (a .log: a path, or an object
    of any ``storage.BackupStore``), published without replacing anything; the range continues
    the newest backup in its store."""
    ref = as_ref(output)
    check_incremental_name(Path(ref.name))
    with BackupOutput(ref) as out:
        after = chain_of(ref.store, engine.database_id, engine.lineage)
        if after is None and since_s is None and since_lsn is None:
            raise nothing_to_continue(ref.store.describe())
        sink = out.open()
        result = take_incremental(engine, sink, since_s, since_lsn, after, progress)
        result.path, result.sidecar = out.path, out.sidecar
        out.publish(result.sha256, result.info())
    return result


def take_incremental(
    engine: Engine,
    sink: Sink,
    since_s: float | None,
    since_lsn: int | None,
    after: After | None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> BackupResult:
    """Write an incremental into ``sink`` and sync_close it; the result has no path. The range
    starts at ``since_lsn``, else at the first record of the last ``since_s`` seconds, else
    right after ``after`` — and never after ``after.to_lsn + 1``."""
    t0 = time.monotonic()
    db = engine.database_id
    end, end_ts, end_digest = engine.position()
    note = None
    if since_lsn is not None:
        start = since_lsn
    elif since_s is not None:
        start = _first_lsn_since(engine, time.time_ns() - int(since_s * 1e9), end)
    elif after is not None:
        start = after.to_lsn + 1
    else:
        raise UsageError("an incremental needs a start: since_s, since_lsn or an earlier backup")
    if after is not None and after.to_lsn + 1 < start:
        note = (
            f"the newest backup in {after.where} ({after.name}) ends at LSN {after.to_lsn}; "
            f"starting at LSN {after.to_lsn + 1} instead of {start} so the chain has no gap"
        )
        start = after.to_lsn + 1
    start = max(1, start)
    first_ts = 0
    if start <= end:
        # Start on a transaction boundary: a transaction's id is its first LSN, and all its
        # records share one timestamp.
        head = next(engine.log_range(start, start), None)
        if head is not None:
            first_ts, start = head[1], head[2]
    count = max(0, end - start + 1)  # LSNs have no gaps
    # The history that owns the range's last record, and its ancestors.
    lineage = hist.upto(engine.lineage, end)
    header = {
        "database_id": db,
        "history": lineage[-1].id,
        "lineage": hist.lineage_to_json(lineage),
        "format_version": fmt.FORMAT_VERSION,
        "from_lsn": start,
        "to_lsn": end,
        "from_time_ns": first_ts,
        "to_time_ns": end_ts,
        "digest": end_digest,
        "parent": after.name if after is not None else None,
        "created_at_ns": time.time_ns(),
        "record_count": count,
    }
    sink.write(fmt.encode_file_header(fmt.KIND_INCREMENTAL, header))
    done = 0
    batch: list[bytes] = []
    for _, _, _, raw in engine.log_range(start, end):
        batch.append(raw)
        if len(batch) >= 4096:
            if cancel is not None and cancel.is_set():
                raise BackupError("the backup was cancelled; nothing of it was kept")
            sink.write(b"".join(batch))
            done += len(batch)
            batch.clear()
            if progress:
                progress(done, count)
    if batch:
        sink.write(b"".join(batch))
    sink.sync_close()
    return BackupResult(
        kind="incremental",
        path="",
        sidecar="",
        size=sink.size,
        sha256=sink.sha.hexdigest(),
        duration_s=round(time.monotonic() - t0, 3),
        snapshot_lsn=end,
        snapshot_time=ns_to_iso(end_ts) if end_ts else "",
        digest=end_digest,
        database_id=db,
        from_lsn=start,
        counts={"records": count},
        note=note,
        catalog={
            "snapshot_time_ns": end_ts,
            "from_time_ns": first_ts,
            "parent": header["parent"],
            "history": header["history"],
            "lineage": header["lineage"],
            # The restore points in the range, so a name resolves from the catalog alone.
            "marks": {
                name: at for name, at in engine.marks(end).items() if at["lsn"] >= start
            },
        },
    )
