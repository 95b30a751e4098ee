"""Fault injection for backup and restore tests.

- A backup's own writes fail through ``engram.storage.faults.FaultyStore``, a store wrapper
  (its faults ``enospc``, ``eio`` and ``ctrl_c`` are re-exported here).
- ``FailingFile`` / ``FailingOpen``: a raw output file for extraction that fails at the k-th
  write or after N bytes (the bytes before N are written first, as a filling disk does).
- ``trace_fsyncs``: the paths ``os.fsync`` is called on.

Loaded by the tests through importlib (tests/ is not a package).
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engram.storage.faults import Fault, eio, enospc
from engram.storage.faults import interrupt as ctrl_c

__all__ = ["FailingFile", "FailingOpen", "Fault", "ctrl_c", "eio", "enospc", "trace_fsyncs"]


class FailingFile:
    """A raw binary output file (as extraction opens it) that fails once the writes counted in
    ``counter`` (shared by every file one ``FailingOpen`` made) reach ``at_write``, or once this
    file holds ``after_bytes`` bytes (the bytes before the limit really reach it)."""

    def __init__(
        self,
        path: Path,
        mode: str,
        counter: list[int],
        at_write: int | None = None,
        after_bytes: int | None = None,
        fault: Fault = enospc,
    ) -> None:
        self.f = builtins.open(path, mode, buffering=0)
        self.counter = counter
        self.at_write = at_write
        self.after_bytes = after_bytes
        self.fault = fault
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.counter[0] += 1
        if self.at_write is not None and self.counter[0] >= self.at_write:
            raise self.fault()
        if self.after_bytes is not None and self.size + len(data) > self.after_bytes:
            room = max(0, self.after_bytes - self.size)
            if room:
                self.f.write(memoryview(data)[:room])
                self.size += room
            raise self.fault()
        n = self.f.write(data) or 0
        self.size += n
        return n

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FailingOpen:
    """A stand-in for ``open`` in one module (``monkeypatch.setattr(module, "open", fo,
    raising=False)``): files opened for writing whose path satisfies ``matches`` become
    FailingFiles; every other open is the real one."""

    def __init__(self, matches: Callable[[Path], bool], **kw: Any) -> None:
        self.matches = matches
        self.kw = kw
        self.counter = [0]
        self.opened: list[Path] = []

    def __call__(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wxa") and self.matches(Path(file)):
            self.opened.append(Path(file))
            return FailingFile(Path(file), mode, self.counter, **self.kw)
        return builtins.open(file, mode, *args, **kwargs)


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def trace_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the files ``os.fsync`` is called on from now on, in order (each fsync
    still happens)."""
    paths: list[str] = []
    real = os.fsync

    def tracing(fd: int) -> None:
        paths.append(fd_path(fd))
        real(fd)

    monkeypatch.setattr(os, "fsync", tracing)
    return paths
