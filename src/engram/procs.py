"""Starting engram's own helper processes (``python -m engram.…``), and running work at idle
CPU priority."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import engram

log = logging.getLogger(__name__)


def module_argv(module: str, *args: str) -> list[str]:
    """The command line running ``module`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def module_env() -> dict[str, str]:
    """This process's environment, with the directory this engram package was imported from
    first on PYTHONPATH: a helper runs this very code, installed or not."""
    env = dict(os.environ)
    root = str(Path(engram.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def at_idle_priority() -> bool:
    """Whether the calling thread runs at idle priority (``lower_priority``). Work done there
    should use one core: the point of idle priority is to leave the others to the database."""
    try:
        if os.sched_getscheduler(0) == os.SCHED_IDLE:
            return True
    except (AttributeError, OSError):
        pass
    try:
        return os.nice(0) >= 19
    except OSError:
        return False


def lower_priority() -> str:
    """Make the calling thread (on Linux; the process elsewhere) run only when a CPU is
    otherwise idle: SCHED_IDLE, or nice 19 where that is not available or not permitted.
    Threads and processes it starts afterwards inherit it. Returns which one it got."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        pass
    try:
        os.nice(19 - os.nice(0))
        return "nice 19"
    except OSError:
        return "unchanged"


@contextmanager
def idle_priority(enabled: bool = True) -> Iterator[None]:
    """Run the block at idle priority (``lower_priority``) when ``enabled``, then put the
    calling thread back as it was where the system allows it (an unprivileged thread may not
    raise itself again: it then stays low, which only makes it slower)."""
    if not enabled:
        yield
        return
    try:
        before: tuple[int, os.sched_param] | None = (
            os.sched_getscheduler(0),
            os.sched_getparam(0),
        )
    except (AttributeError, OSError):
        before = None
    nice = os.nice(0)
    lower_priority()
    try:
        yield
    finally:
        try:
            if before is not None:
                os.sched_setscheduler(0, *before)
            if os.nice(0) != nice:
                os.nice(nice - os.nice(0))
        except (AttributeError, OSError) as e:
            log.debug("could not restore this thread's CPU priority: %s", e)
