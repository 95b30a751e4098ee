"""``FaultyStore``: a ``BackupStore`` that passes every call to another one and fails one on
cue, for the backup fault tests and the stores' conformance suite (STYLE habit 10).

Faults: the k-th write to a temp object (counted over every temp of this store), a write that
would take a temp past N bytes (the bytes before N are written first, as a filling disk does),
the temp's ``sync_close`` (its fsync), creating the temp, and each step of a publication — the
archive (``publish``), its sidecar or its catalog entry (``create`` of ``NAME.sha256`` /
``NAME.info.json``) — either before the step or after it has taken effect (a directory fsync
that fails once the rename was made). Each fault raises what ``fault()`` returns: ``enospc``,
``eio`` or ``interrupt`` (Ctrl-C). ``writes`` and ``bytes`` count what the temps received, so a
clean run tells how many writes a fault can be put at; ``fired`` says whether the fault was met.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import BinaryIO, Literal

from engram.storage.base import (
    INFO_SUFFIX,
    SIDECAR_SUFFIX,
    BackupStore,
    Forwarding,
    TempObject,
)

Fault = Callable[[], BaseException]
Step = Literal["archive", "sidecar", "info"]


def enospc() -> BaseException:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def eio() -> BaseException:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def interrupt() -> BaseException:
    return KeyboardInterrupt()


def step_of(name: str) -> Step:
    if name.endswith(SIDECAR_SUFFIX):
        return "sidecar"
    if name.endswith(INFO_SUFFIX):
        return "info"
    return "archive"


class FaultyTemp:
    def __init__(self, store: FaultyStore, inner: TempObject) -> None:
        self.store = store
        self.inner = inner
        self.name = inner.name
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        s = self.store
        s.writes += 1
        if s.on_write is not None:
            s.on_write()
        if s.at_write is not None and s.writes == s.at_write:
            raise s.fire()
        if s.after_bytes is not None and s.bytes + len(data) > s.after_bytes:
            room = max(0, s.after_bytes - s.bytes)
            if room:
                self.inner.write(memoryview(data)[:room])
                s.bytes += room
            raise s.fire()
        n = self.inner.write(data)
        s.bytes += len(data)
        return n

    def sync_close(self) -> None:
        if self.store.at_sync:
            self.inner.close()
            raise self.store.fire()
        self.inner.sync_close()

    def close(self) -> None:
        self.inner.close()


class FaultyStore(Forwarding):
    """``inner`` with the faults given (module docstring); without any, a counting pass-through.
    ``when`` says whether a publication step fails "before" or "after" it took effect."""

    def __init__(
        self,
        inner: BackupStore,
        *,
        at_write: int | None = None,
        after_bytes: int | None = None,
        at_sync: bool = False,
        at_create_temp: bool = False,
        at_step: Step | None = None,
        when: Literal["before", "after"] = "before",
        fault: Fault = enospc,
        on_write: Callable[[], None] | None = None,
    ) -> None:
        self.inner = inner
        self.at_write = at_write
        self.after_bytes = after_bytes
        self.at_sync = at_sync
        self.at_create_temp = at_create_temp
        self.at_step = at_step
        self.when = when
        self.fault = fault
        self.on_write = on_write
        self.writes = 0
        self.bytes = 0
        self.fired = False

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r})"

    def fire(self) -> BaseException:
        self.fired = True
        return self.fault()

    def _step(self, step: Step, call: Callable[[], None]) -> None:
        if self.at_step == step and self.when == "before":
            raise self.fire()
        call()
        if self.at_step == step and self.when == "after":
            raise self.fire()

    def _inner_temp(self, temp: TempObject | None) -> TempObject | None:
        return temp.inner if isinstance(temp, FaultyTemp) else temp

    # -- the seam --------------------------------------------------------------------------

    def open(self, name: str) -> BinaryIO:
        return self.inner.open(name)

    def read(self, name: str) -> bytes:
        return self.inner.read(name)

    def create_temp(self, name: str) -> FaultyTemp:
        if self.at_create_temp:
            raise self.fire()
        return FaultyTemp(self, self.inner.create_temp(name))

    def publish(self, temp: TempObject) -> None:
        inner = self._inner_temp(temp)
        assert inner is not None
        self._step("archive", lambda: self.inner.publish(inner))

    def create(self, name: str, data: bytes, temp: TempObject | None = None) -> None:
        inner = self._inner_temp(temp)
        self._step(step_of(name), lambda: self.inner.create(name, data, inner))

    def replace(self, name: str, data: bytes) -> None:
        self.inner.replace(name, data)

    def commit(self, temp: TempObject) -> None:
        inner = self._inner_temp(temp)
        assert inner is not None
        self.inner.commit(inner)

    def discard(self, temp: TempObject) -> None:
        inner = self._inner_temp(temp)
        assert inner is not None
        self.inner.discard(inner)
