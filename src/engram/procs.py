"""How engram runs its own work: the resources a command may use (decided once, where the
command starts, and passed down), starting its helper processes (``python -m engram.…``), and
idle CPU priority."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import engram

log = logging.getLogger(__name__)

# A row scan gains nothing from more processes than this: each helper pays for its own start
# and its own page cache.
MAX_SCAN_WORKERS = 4


@dataclass(frozen=True)
class Resources:
    """What a command may take from the machine. Decided where the command starts (its
    ``--priority``, or the backup a validation follows) and passed down, so that no code below
    changes its algorithm by looking at the thread it runs on.

    ``scan_workers``: how many cores a scan may keep busy at once — helper processes scanning
    parts of a table, a check in a thread beside a scan; 1 means one thing at a time, in this
    process. ``idle``: the command runs at idle CPU priority (``idle_priority``, applied where it
    starts; threads and processes it starts inherit it). ``cpu_share``: the most of one core
    that paced work (a low-priority backup's worker) uses while the log grows; None: no cap.
    """

    scan_workers: int = 1
    idle: bool = False
    cpu_share: float | None = None

    def __post_init__(self) -> None:
        if self.scan_workers < 1:
            raise ValueError(f"scan_workers must be at least 1, got {self.scan_workers}")

    @classmethod
    def normal(cls) -> Resources:
        """A command at priority "normal": every core this process may run on (up to
        ``MAX_SCAN_WORKERS``), no cap."""
        return cls(scan_workers=max(1, min(usable_cores(), MAX_SCAN_WORKERS)))

    @classmethod
    def low(cls, cpu_share: float | None = None) -> Resources:
        """A command at priority "low": idle CPU only, one thing at a time (the other cores are
        the database's), paced work capped at ``cpu_share``."""
        return cls(scan_workers=1, idle=True, cpu_share=cpu_share)

    @classmethod
    def for_priority(cls, priority: str, cpu_share: float | None = None) -> Resources:
        """A command at ``priority`` "low" or "normal" (checked by the caller; ``cpu_share``
        applies to low only)."""
        if priority == "low":
            return cls.low(cpu_share)
        if priority == "normal":
            return cls.normal()
        raise ValueError(f"priority must be low or normal, got {priority!r}")


def usable_cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
