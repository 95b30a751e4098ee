"""Awaiting log durability from the event loop without blocking it.

``Engine.submit`` returns before the fsync; the flusher thread later calls the callbacks of every
LSN it made durable. One group commit can finish hundreds of writes at once, so the callbacks only
queue their LSN and wake the loop once per batch (one self-pipe write, not hundreds); the loop
then resolves every waiting request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from functools import partial
from typing import Protocol


class DurableSource(Protocol):
    def on_durable(self, lsn: int, cb: Callable[[BaseException | None], None]) -> None: ...


class DurableWaiter:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._mu = threading.Lock()
        self._fired: list[tuple[int, BaseException | None]] = []
        self._wake_pending = False
        self._waiting: dict[int, asyncio.Future[None]] = {}  # touched by the loop thread only

    async def wait(self, source: DurableSource, lsn: int) -> None:
        """Return once ``lsn`` is durable; raise the writer's error if it never will be."""
        fut = self.loop.create_future()
        # Every write ends at its own LSN, so one future per LSN is enough.
        self._waiting[lsn] = fut
        source.on_durable(lsn, partial(self._fire, lsn))
        try:
            await fut
        finally:
            self._waiting.pop(lsn, None)

    def _fire(self, lsn: int, exc: BaseException | None) -> None:
        # Runs on the flusher thread (or inline): must never raise, or the flusher dies.
        with self._mu:
            self._fired.append((lsn, exc))
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self.loop.call_soon_threadsafe(self._resolve)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is waiting
            pass

    def _resolve(self) -> None:
        with self._mu:
            fired, self._fired = self._fired, []
            self._wake_pending = False
        for lsn, exc in fired:
            fut = self._waiting.get(lsn)
            if fut is None or fut.done():
                continue
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
