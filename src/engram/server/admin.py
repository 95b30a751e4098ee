"""Operations over HTTP: backups taken by the server, quiesce/resume, status.

The server takes a backup itself because only the process that owns the data dir can make the
consistent cut; the CLI sends the (absolute) output path and validates the result afterwards.
A full backup here defaults to priority "low": its archive is written by a worker process on idle
CPU only, and at most ``cpu_share`` of one core while the log grows, so that the writers this
server serves keep their latency.
These routes sit under /v1 and need the token like every other /v1 route.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

from engram.backend import _run_backup, status_of
from engram.backup.full import PRIORITIES
from engram.backup.worker import check_cpu_share
from engram.errors import UsageError, ValidationError
from engram.graph import Engine

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


async def backup(eng: Engine, body: dict[str, Any]) -> Result:
    _only_fields(
        body, {"kind", "output", "since_s", "since_lsn", "priority", "cpu_share"}, "backup"
    )
    kind = _field(body, "kind", (str,), required=True)
    output = _field(body, "output", (str,), required=True)
    if not os.path.isabs(output):
        raise ValidationError("output must be an absolute path on the server", field="output")
    since_s = _field(body, "since_s", (int, float))
    since_lsn = _field(body, "since_lsn", (int,))
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
    loop = asyncio.get_running_loop()
    # A full backup taken here shares the machine with the writers: low priority unless asked.
    run = partial(_run_backup, priority=priority, default_priority="low", cpu_share=cpu_share)
    res = await loop.run_in_executor(None, run, eng, kind, Path(output), since_s, since_lsn)
    return 200, res


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
    st = await loop.run_in_executor(None, status_of, eng)
    st["server"] = {"pid": os.getpid(), "url": url, "uptime_s": round(time.time() - _STARTED, 1)}
    return 200, st
