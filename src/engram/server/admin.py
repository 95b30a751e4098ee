"""Operations over HTTP: backups, quiesce/resume, status.

Only the process that owns the data dir can make a backup's consistent cut, so the server takes
every backup — and streams it to the client, which writes the file with its own rights
(``backup_stream``, docs/FORMAT.md "Backup stream"): the server never creates a file at a path a
client names. Where the server itself writes backups (``output``), it writes only a new plain
file inside a directory it was started with (``--backup-dir``).
A full backup here defaults to priority "low": its archive is written by a worker process on idle
CPU only, and at most ``cpu_share`` of one core while the log grows, so that the writers this
server serves keep their latency.
These routes sit under /v1/admin and need the admin token (or the token) like every /v1 route.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from engram.backup.full import BackupResult
from engram.backup.request import FIELD_NAMES, BackupRequest
from engram.backup.run import run_backup, take_backup
from engram.errors import ValidationError
from engram.graph import Engine
from engram.server.backup_stream import BackupStream, StreamSink

Result = tuple[int, Any]

_STARTED = time.time()
# The longest quiesce: writes stay paused at most this long (24 h) unless resumed earlier.
MAX_QUIESCE_S = 24 * 3600.0


def _field(body: dict[str, Any], name: str, types: tuple[type, ...], required: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        if required:
            raise ValidationError(f"{name} is required", field=name)
        return None
    if isinstance(v, bool) or not isinstance(v, types):
        raise ValidationError(f"{name} has the wrong type", field=name)
    return v


def _only_fields(body: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise ValidationError(f"unknown field {extra[0]!r} for {what}", field=extra[0])


async def backup(
    eng: Engine, body: dict[str, Any], backup_dirs: Sequence[Path] = ()
) -> Result | BackupStream:
    """``POST /v1/admin/backup``: without ``output``, the backup streamed in the response (the
    client writes it); with ``output``, a new file the server writes inside ``backup_dirs``.
    Every rule of the request is ``request.BackupRequest``'s (a 400 naming the field); a full
    backup taken here shares the machine with the writers: priority low unless asked."""
    req = BackupRequest.from_mapping(body, FIELD_NAMES, backup_dirs)
    if req.output is not None:
        loop = asyncio.get_running_loop()
        run = partial(run_backup, eng, req, None, default_priority="low")
        return 200, await loop.run_in_executor(None, run)

    def take(sink: StreamSink) -> BackupResult:
        return take_backup(eng, req, sink, sink.progress, sink.gone, default_priority="low")

    return BackupStream(take, req.kind)


async def quiesce(eng: Engine, body: dict[str, Any]) -> Result:
    _only_fields(body, {"timeout_s"}, "quiesce")
    timeout = _seconds(body, "timeout_s", MAX_QUIESCE_S)
    loop = asyncio.get_running_loop()
    return 200, await loop.run_in_executor(None, eng.quiesce, timeout)


def _seconds(body: dict[str, Any], name: str, most: float) -> float:
    """A required duration in seconds: a number more than 0 and at most ``most``."""
    value = _field(body, name, (int, float), required=True)
    try:
        seconds = float(value)
    except OverflowError:  # an integer too large for a float
        seconds = math.inf
    if not 0 < seconds <= most:  # also refuses NaN
        raise ValidationError(
            f"{name} must be more than 0 and at most {most:g} seconds", field=name
        )
    return seconds


async def resume(eng: Engine, body: dict[str, Any]) -> Result:
    _only_fields(body, set(), "resume")
    return 200, eng.resume()


async def status(eng: Engine, url: str | None) -> Result:
    loop = asyncio.get_running_loop()
    st = await loop.run_in_executor(None, eng.status)
    st["server"] = {"pid": os.getpid(), "url": url, "uptime_s": round(time.time() - _STARTED, 1)}
    return 200, st
