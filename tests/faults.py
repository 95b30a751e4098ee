"""Fault injection for backup and restore tests: sinks and files that fail on cue.

- ``CountingSink`` / ``counting_factory``: how many writes (and bytes) a clean backup makes.
- ``FailingSink`` / ``failing_factory``: the archive sink fails at its k-th write, after N bytes
  (writing the bytes before N first, as a filling disk does), or at its fsync, with ENOSPC, EIO
  or a KeyboardInterrupt (Ctrl-C).
- ``FailingFile`` / ``failing_open``: a raw output file for extraction that fails the same way.
- ``OsFaults``: fail ``os.write`` / ``os.fsync`` / ``os.rename`` / ``os.replace`` (and the
  no-replace rename a backup publishes with) only for files whose path matches a predicate
  (found through /proc/self/fd), so that the engine's own log writes and fsyncs go on working
  while a backup's sidecar, rename or info file fails.
- ``trace_fsyncs``: the paths ``os.fsync`` is called on.

Loaded by the tests through importlib (tests/ is not a package).
"""

from __future__ import annotations

import builtins
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import engram.backup.output as output_mod
from engram.backup.archive import FileSink

Fault = Callable[[], BaseException]


def enospc() -> BaseException:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def eio() -> BaseException:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def ctrl_c() -> BaseException:
    return KeyboardInterrupt()


class CountingSink(FileSink):
    """A real sink that records how it was used (class-level, reset with ``reset``)."""

    writes = 0
    bytes = 0
    paths: list[Path] = []

    def __init__(self, path: Path, fd: int | None = None) -> None:
        super().__init__(path, fd)
        type(self).paths.append(Path(path))

    @classmethod
    def reset(cls) -> None:
        cls.writes = 0
        cls.bytes = 0
        cls.paths = []

    def write(self, data: bytes | memoryview) -> int:
        type(self).writes += 1
        type(self).bytes += len(data)
        return super().write(data)


def counting_factory() -> tuple[Callable[[Path, int], FileSink], type[CountingSink]]:
    """A fresh counting sink class (so parallel uses do not share counters) and its factory."""

    class Counter(CountingSink):
        writes = 0
        bytes = 0
        paths: list[Path] = []

    return Counter, Counter


class FailingSink(FileSink):
    """Fails at write number ``at_write`` (1-based), or once ``after_bytes`` bytes were written
    (the bytes before the limit really reach the file), or in ``sync_close`` (the fsync)."""

    def __init__(
        self,
        path: Path,
        fd: int | None = None,
        at_write: int | None = None,
        after_bytes: int | None = None,
        at_fsync: bool = False,
        fault: Fault = enospc,
    ) -> None:
        super().__init__(path, fd)
        self.path = Path(path)
        self.at_write = at_write
        self.after_bytes = after_bytes
        self.at_fsync = at_fsync
        self.fault = fault
        self.writes = 0
        self.fired = False

    def write(self, data: bytes | memoryview) -> int:
        self.writes += 1
        if self.at_write is not None and self.writes == self.at_write:
            self.fired = True
            raise self.fault()
        if self.after_bytes is not None and self.size + len(data) > self.after_bytes:
            room = max(0, self.after_bytes - self.size)
            if room:
                super().write(memoryview(data)[:room])
            self.fired = True
            raise self.fault()
        return super().write(data)

    def sync_close(self) -> None:
        if self.at_fsync and self.fd >= 0:
            self.fired = True
            os.close(self.fd)
            self.fd = -1
            raise self.fault()
        super().sync_close()


def failing_factory(**kw: Any) -> tuple[Callable[[Path, int], FileSink], list[FailingSink]]:
    """A sink factory for ``full_backup``/``incremental_backup`` (``factory(temp path, fd)``)
    and the sinks it made."""
    made: list[FailingSink] = []

    def make(path: Path, fd: int) -> FileSink:
        s = FailingSink(path, fd, **kw)
        made.append(s)
        return s

    return make, made


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


class OsFaults:
    """Fail selected os-level calls for matching paths only (see the module doc).

    ``fail_write(pred)``: os.write to an fd whose path satisfies ``pred`` raises ENOSPC;
    ``fail_fsync(pred)``: os.fsync likewise (EIO by default); ``fail_rename(pred)``: os.rename,
    os.replace and the backup's no-replace rename whose *source* satisfies ``pred``. ``hits``
    counts the injected failures.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch
        self.hits: list[tuple[str, str]] = []
        self._real = {n: getattr(os, n) for n in ("write", "fsync", "rename", "replace")}

    def fail_write(self, pred: Callable[[str], bool], fault: Fault = enospc) -> None:
        real = self._real["write"]

        def write(fd: int, data: Any) -> int:
            p = fd_path(fd)
            if pred(p):
                self.hits.append(("write", p))
                raise fault()
            return real(fd, data)

        self.mp.setattr(os, "write", write)

    def fail_fsync(self, pred: Callable[[str], bool], fault: Fault = eio) -> None:
        real = self._real["fsync"]

        def fsync(fd: Any) -> None:
            num = fd if isinstance(fd, int) else fd.fileno()
            p = fd_path(num)
            if pred(p):
                self.hits.append(("fsync", p))
                raise fault()
            real(fd)

        self.mp.setattr(os, "fsync", fsync)

    def fail_rename(self, pred: Callable[[str], bool], fault: Fault = eio) -> None:
        for name in ("rename", "replace"):
            real = self._real[name]

            def ren(
                src: Any, dst: Any, *a: Any, _real: Any = real, _n: str = name, **k: Any
            ) -> None:
                if pred(os.fspath(src)):
                    self.hits.append((_n, os.fspath(src)))
                    raise fault()
                _real(src, dst, *a, **k)

            self.mp.setattr(os, name, ren)
        real_noreplace = output_mod.rename_noreplace

        def noreplace(src: Any, dst: Any) -> None:
            if pred(os.fspath(src)):
                self.hits.append(("rename_noreplace", os.fspath(src)))
                raise fault()
            real_noreplace(src, dst)

        self.mp.setattr(output_mod, "rename_noreplace", noreplace)
