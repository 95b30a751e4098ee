"""Incremental backups: the log records of a range, in the op-log format (docs/FORMAT.md).

A chain never has a gap: when the newest backup in the output directory ends before the
requested start, the range starts right after it instead, and the result says so. Ranges always
begin on a transaction boundary (a transaction's id is its first LSN), so every file can be
replayed on its own terms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from engram.backup.archive import FileSink
from engram.backup.catalog import newest_end
from engram.backup.full import BackupResult, check_output, publish, writing
from engram.errors import UsageError
from engram.format import record as fmt
from engram.format.manifest import compression_for
from engram.graph import Engine
from engram.model import ns_to_iso
from engram.oplog.reader import LogFile, list_segments


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
    output: Path,
    since_s: float | None = None,
    since_lsn: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    sink_factory: Callable[[Path], FileSink] = FileSink,
) -> BackupResult:
    output = Path(output).absolute()
    if compression_for(output.name):
        raise UsageError(
            f"{output.name} names a full backup archive; an incremental is a .log file"
        )
    check_output(output, ("incremental",))
    t0 = time.monotonic()
    db = engine.database_id
    end, end_ts, end_digest = engine.position()
    newest = newest_end(output.parent, db)
    note = None
    if since_lsn is not None:
        start = since_lsn
    elif since_s is not None:
        start = _first_lsn_since(engine, time.time_ns() - int(since_s * 1e9), end)
    elif newest is not None:
        start = newest.to_lsn + 1
    else:
        raise UsageError(
            f"no earlier backup in {output.parent} to continue from; give --since or --since-lsn, "
            "or take a full backup there first"
        )
    if newest is not None and newest.to_lsn + 1 < start:
        note = (
            f"the newest backup in {output.parent} ({newest.name}) ends at LSN {newest.to_lsn}; "
            f"starting at LSN {newest.to_lsn + 1} instead of {start} so the chain has no gap"
        )
        start = newest.to_lsn + 1
    start = max(1, start)
    first_ts = 0
    if start <= end:
        # Start on a transaction boundary: a transaction's id is its first LSN, and all its
        # records share one timestamp.
        head = next(engine.log_range(start, start), None)
        if head is not None:
            first_ts, start = head[1], head[2]
    count = max(0, end - start + 1)  # LSNs have no gaps
    header = {
        "database_id": db,
        "format_version": fmt.FORMAT_VERSION,
        "from_lsn": start,
        "to_lsn": end,
        "from_time_ns": first_ts,
        "to_time_ns": end_ts,
        "digest": end_digest,
        "parent": newest.name if newest is not None else None,
        "created_at_ns": time.time_ns(),
        "record_count": count,
    }
    with writing(output, sink_factory) as (sink, tmp, tmp_side):
        sink.write(fmt.encode_file_header(fmt.KIND_INCREMENTAL, header))
        done = 0
        batch: list[bytes] = []
        for _, _, _, raw in engine.log_range(start, end):
            batch.append(raw)
            if len(batch) >= 4096:
                sink.write(b"".join(batch))
                done += len(batch)
                batch.clear()
                if progress:
                    progress(done, count)
        if batch:
            sink.write(b"".join(batch))
        sink.sync_close()
        result = BackupResult(
            kind="incremental",
            path=str(output),
            sidecar=str(output) + ".sha256",
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
        )
        info = result.to_json() | {
            "snapshot_time_ns": end_ts,
            "from_time_ns": first_ts,
            "parent": header["parent"],
        }
        publish(tmp, tmp_side, output, result.sha256, info)
    return result
