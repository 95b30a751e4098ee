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

from engram.backend import _run_backup
from engram.backup.full import (
    PRIORITIES,
    BackupResult,
    check_full_request,
    full_compression,
    take_full,
)
from engram.backup.incremental import After, check_incremental_name, take_incremental
from engram.backup.worker import check_cpu_share
from engram.errors import UsageError, ValidationError
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


# The range of a streamed incremental: at most this far back in time (ten years).
MAX_SINCE_S = 10 * 365.25 * 86400
MAX_LSN = 2**63 - 1
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
_BACKUP_FIELDS = {
    "kind", "output", "compression", "since_s", "since_lsn", "start_by_lsn", "parent",
    "priority", "cpu_share",
}


async def backup(
    eng: Engine, body: dict[str, Any], backup_dirs: Sequence[Path] = ()
) -> Result | BackupStream:
    """``POST /v1/admin/backup``: without ``output``, the backup streamed in the response (the
    client writes it); with ``output``, a new file the server writes inside ``backup_dirs``."""
    _only_fields(body, _BACKUP_FIELDS, "backup")
    kind = _field(body, "kind", (str,), required=True)
    if kind not in ("full", "incremental"):
        raise ValidationError("kind must be full or incremental", field="kind")
    since_s = _since_s(body)
    since_lsn = _lsn(body, "since_lsn")
    start_by = _lsn(body, "start_by_lsn")
    parent = _name(body, "parent")
    compression = _field(body, "compression", (str,))
    if since_s is not None and since_lsn is not None:
        raise ValidationError("give since_s or since_lsn, not both", field="since_lsn")
    if kind == "full":
        for name in ("since_s", "since_lsn", "start_by_lsn", "parent"):
            if body.get(name) is not None:
                raise ValidationError(f"{name} applies to incrementals only", field=name)
        if compression is not None and compression not in ("zstd", "gzip"):
            raise ValidationError("compression must be zstd or gzip", field="compression")
    elif compression is not None:
        raise ValidationError("compression applies to full backups only", field="compression")
    priority, cpu_share = _priority(body, kind)
    loop = asyncio.get_running_loop()
    if body.get("output") is not None:
        if compression is not None or start_by is not None or parent is not None:
            name = next(n for n in ("compression", "start_by_lsn", "parent") if body.get(n))
            raise ValidationError(
                f"{name} applies to a streamed backup only (the server names its own chain)",
                field=name,
            )
        output = _server_output(body["output"], backup_dirs, kind)
        # A full backup taken here shares the machine with the writers: low unless asked.
        run = partial(_run_backup, priority=priority, default_priority="low", cpu_share=cpu_share)
        return 200, await loop.run_in_executor(None, run, eng, kind, output, since_s, since_lsn)
    if kind == "full":
        prio = priority or "low"
        share = check_full_request(prio, cpu_share)
        comp = compression or "zstd"

        def full(sink: StreamSink) -> BackupResult:
            return take_full(eng, comp, sink, sink.progress, prio, share, cancel=sink.gone)

        return BackupStream(full, "full")
    if since_s is None and since_lsn is None and start_by is None:
        raise ValidationError(
            "an incremental needs since_s, since_lsn or start_by_lsn (the LSN right after the "
            "newest backup of the client's directory)",
            field="since_s",
        )
    after = None
    if start_by is not None:
        after = After(parent or "an earlier backup", start_by - 1, "the output directory")

    def incremental(sink: StreamSink) -> BackupResult:
        return take_incremental(eng, sink, since_s, since_lsn, after, sink.progress, sink.gone)

    return BackupStream(incremental, "incremental")


def _priority(body: dict[str, Any], kind: str) -> tuple[str | None, float | None]:
    priority = _field(body, "priority", (str,))
    if priority is not None:
        if priority not in PRIORITIES:
            raise ValidationError("priority must be low or normal", field="priority")
        if kind == "incremental":
            raise ValidationError("priority applies to full backups only", field="priority")
    cpu_share = _field(body, "cpu_share", (int, float))
    if cpu_share is not None:
        if kind == "incremental":
            raise ValidationError("cpu_share applies to full backups only", field="cpu_share")
        if priority == "normal":
            raise ValidationError(
                "cpu_share applies to priority low only (normal uses every core)",
                field="cpu_share",
            )
        try:
            cpu_share = check_cpu_share(cpu_share, "cpu_share")
        except UsageError as e:
            raise ValidationError(e.message, field="cpu_share") from None
    return priority, cpu_share


def _since_s(body: dict[str, Any]) -> float | None:
    value = _field(body, "since_s", (int, float))
    if value is None:
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer too large for a float
        seconds = math.inf
    if not 0 < seconds <= MAX_SINCE_S:  # also refuses NaN
        raise ValidationError(
            f"since_s must be more than 0 and at most {MAX_SINCE_S:g} seconds (ten years)",
            field="since_s",
        )
    return seconds


def _lsn(body: dict[str, Any], name: str) -> int | None:
    value = _field(body, name, (int,))
    if value is not None and not 1 <= value <= MAX_LSN:
        raise ValidationError(f"{name} must be an LSN from 1 to 2^63-1", field=name)
    return value  # type: ignore[no-any-return]


def _name(body: dict[str, Any], name: str) -> str | None:
    value = _field(body, name, (str,))
    if value is not None and (
        not value
        or "/" in value
        or "\0" in value
        or value in (".", "..")
        or len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
    ):
        raise ValidationError(
            f"{name} must be a file name of 1 to {MAX_NAME_BYTES} bytes, without '/' or NUL",
            field=name,
        )
    return value


def _server_output(value: Any, backup_dirs: Sequence[Path], kind: str) -> Path:
    """``output`` as the path of a new plain file inside one of ``backup_dirs``, or a 400
    naming the field. The parent is resolved (realpath) before it is compared, so a symlink
    out of a backup dir is refused; the files are then created with O_EXCL|O_NOFOLLOW and
    published without replacing (``output.BackupOutput``)."""
    if not backup_dirs:
        raise ValidationError(
            "this server writes no backup files (it was started without --backup-dir); "
            "leave out output to have the backup streamed to you",
            field="output",
        )
    if not isinstance(value, str):
        raise ValidationError("output has the wrong type", field="output")
    if "\0" in value:
        raise ValidationError("output holds a NUL byte", field="output")
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_PATH_BYTES:
        raise ValidationError(f"output is longer than {MAX_PATH_BYTES} bytes", field="output")
    if not os.path.isabs(value):
        raise ValidationError("output must be an absolute path on the server", field="output")
    parts = value.split("/")
    if ".." in parts:
        raise ValidationError("output must not hold a '..' component", field="output")
    name = parts[-1]
    if not name or name == "." or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ValidationError(
            f"output must end in a file name of 1 to {MAX_NAME_BYTES} bytes", field="output"
        )
    try:
        if kind == "full":
            full_compression(name)
        else:
            check_incremental_name(Path(name))
    except UsageError as e:
        raise ValidationError(e.message, field="output") from None
    parent = os.path.realpath(os.path.dirname(value))
    dirs = [os.path.realpath(d) for d in backup_dirs]
    if not any(parent == d or parent.startswith(d.rstrip("/") + "/") for d in dirs):
        raise ValidationError(
            "output must be inside a backup directory of this server (--backup-dir: "
            + ", ".join(dirs)
            + ")",
            field="output",
        )
    if not os.path.isdir(parent):
        raise ValidationError(f"output's directory {parent} does not exist", field="output")
    path = Path(parent) / name
    for p in (path, path.with_name(name + ".sha256"), path.with_name(name + ".info.json")):
        if os.path.lexists(p):
            raise ValidationError(
                f"{p} already exists; choose a new name (backups are never overwritten)",
                field="output",
            )
    return path


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
