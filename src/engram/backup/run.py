"""Running a backup request against an engine in this process: into a file, or into a sink.

Whoever owns the engine runs its backups here: the CLI on a data dir no server holds, the server
for its routes (a file inside its --backup-dir, or the backup stream to a client). The request
is checked by its caller, in the caller's names (``request.BackupRequest.validate``), and again
here by the same rules; this module adds only the caller's default priority, the one thing that
depends on where it runs: "normal" (every core)
for a data dir nobody else writes to, "low" (a worker on idle CPU) in a server, so that its
writers keep their latency.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engram.backup.archive import Sink
from engram.backup.full import BackupResult, check_full_request, full_backup, take_full
from engram.backup.incremental import After, incremental_backup, take_incremental
from engram.backup.request import BackupRequest
from engram.graph import Engine
from engram.storage import Ref

Progress = Callable[[int, int], None]


def run_backup(
    engine: Engine,
    req: BackupRequest,
    progress: Progress | None = None,
    default_priority: str = "normal",
    output: Ref | None = None,
) -> dict[str, Any]:
    """Take the backup ``req`` (with an output) of ``engine`` into the new file ``req.output``,
    or into ``output`` when given (the object of a store that ``req.output`` names, e.g. an
    ``s3://`` URL the caller opened), published without replacing anything; its result as
    JSON."""
    req = req.validate()
    if req.output is None:
        raise ValueError("run_backup writes a file: the request needs an output")
    where: Path | Ref = output if output is not None else Path(req.output).absolute()
    if req.kind == "full":
        priority = req.priority_or(default_priority)
        assert priority is not None
        res = full_backup(engine, where, progress, priority=priority, cpu_share=req.cpu_share)
    else:
        res = incremental_backup(engine, where, req.since_s, req.since_lsn, progress)
    return res.to_json()


def take_backup(
    engine: Engine,
    req: BackupRequest,
    sink: Sink,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    default_priority: str = "low",
) -> BackupResult:
    """Write the backup ``req`` (streamed: without an output) of ``engine`` into
    ``sink`` and sync_close it; the result names no file. ``cancel`` stops it (a client that
    went away). An incremental's range starts at or before ``req.start_by_lsn``, the LSN right
    after ``req.parent``, the newest backup of the directory the client writes to."""
    req = req.validate()
    if req.output is not None:
        raise ValueError("take_backup writes a sink: the request must have no output")
    if req.kind == "full":
        priority = req.priority_or(default_priority)
        assert priority is not None
        share = check_full_request(priority, req.cpu_share)
        compression = req.compression or "zstd"
        return take_full(engine, compression, sink, progress, priority, share, cancel=cancel)
    after = None
    if req.start_by_lsn is not None:
        parent = req.parent or "an earlier backup"
        after = After(parent, req.start_by_lsn - 1, "the output directory")
    return take_incremental(engine, sink, req.since_s, req.since_lsn, after, progress, cancel)
