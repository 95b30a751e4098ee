"""``RetryingObjectStore``: the one place requests to an object store are retried (STYLE habit 3:
retries are a wrapper, not code inside drivers; restic ``internal/backend/retry``).

Only ``Transient`` failures are retried (5xx, 408, 429/SlowDown, a dropped connection, a
timeout), with capped exponential backoff and full jitter: before retry n (from 0) it waits a
random time in [0, min(cap, base * 2**n)], and it gives up — raising the last failure, saying how
long it tried — once the waits would pass ``budget`` seconds. Production waits over minutes;
tests pass a small ``Backoff``. A read that drops mid-body is resumed from the byte it reached,
pinned to the same object version (its ETag), under the same rule.

Every request of ``ObjectStore`` is safe to repeat. The one subtlety is a conditional create
(``put`` or ``complete_upload`` with ``if_absent``) whose first attempt took effect but whose
answer was lost: the retry finds the key taken. The writer tells that from another writer's
object by the token it recorded with it (``objects.settle_conflict``).
"""

from __future__ import annotations

import builtins
import io
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from engram.storage.objects import (
    Meta,
    ObjectInfo,
    ObjectStore,
    ObjectStoreError,
    Part,
    Transient,
    Unreachable,
    Upload,
)

log = logging.getLogger("engram.storage")
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts: full jitter up to min(cap, base * 2**n), for at most ``budget``
    seconds of waiting in all. The default rides out an outage of about ten minutes."""

    base: float = 0.5
    cap: float = 60.0
    budget: float = 600.0
    # Until the endpoint has answered once, failing to connect at all is most likely a wrong
    # endpoint, not an outage: it is given up after this much waiting instead of ``budget``.
    first_contact: float = 10.0

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.cap >= self.base and self.budget >= 0):
            raise ValueError(f"{self!r}: need base > 0, cap >= base, budget >= 0")


class _Attempts:
    """The retry state of one request (or one resumed read)."""

    def __init__(self, store: RetryingObjectStore) -> None:
        self.store = store
        self.n = 0
        self.waited = 0.0

    def failed(self, e: Transient, what: str | None = None) -> None:
        """Wait before the next attempt, or raise ``e`` (said to be final) when the budget is
        spent."""
        b = self.store.backoff
        delay = self.store.rng.uniform(0, min(b.cap, b.base * 2**self.n))
        self.n += 1
        never = isinstance(e, Unreachable) and not self.store.answered
        budget = min(b.budget, b.first_contact) if never else b.budget
        if self.waited + delay > budget:
            why = "; the endpoint never answered: is it the right one?" if never else ""
            raise Transient(
                f"{e.message} (gave up after {self.n} attempts over {self.waited:.1f}s{why})"
            ) from e
        # The driver's message names the request; ``what`` adds where a resumed read stands.
        said = e.message if what is None else f"{what}: {e.message}"
        log.warning("%s; attempt %d in %.2fs", said, self.n + 1, delay)
        self.store.sleep(delay)
        self.waited += delay


class RetryingObjectStore:
    """``inner`` with every request retried on ``Transient`` failures (module docstring)."""

    def __init__(
        self,
        inner: ObjectStore,
        backoff: Backoff | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.inner = inner
        self.backoff = backoff or Backoff()
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.answered = False  # the endpoint has answered a request of this store

    def __repr__(self) -> str:
        return f"RetryingObjectStore({self.inner!r})"

    def _call(self, fn: Callable[[], T]) -> T:
        attempts = _Attempts(self)
        while True:
            try:
                out = fn()
            except Transient as e:
                attempts.failed(e)
            except ObjectStoreError:
                self.answered = True  # a refusal is an answer
                raise
            else:
                self.answered = True
                return out

    def describe(self, key: str = "") -> str:
        return self.inner.describe(key)

    def check(self) -> None:
        self._call(self.inner.check)

    def head(self, key: str) -> ObjectInfo:
        return self._call(lambda: self.inner.head(key))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self._call(lambda: self.inner.list(prefix))

    def get(
        self, key: str, start: int = 0, end: int | None = None, etag: str | None = None
    ) -> BinaryIO:
        return _Resuming(self, key, start, end, etag)  # type: ignore[return-value]

    def put(
        self, key: str, data: bytes, *, checksum: str, meta: Meta, if_absent: bool = False
    ) -> str:
        return self._call(
            lambda: self.inner.put(key, data, checksum=checksum, meta=meta, if_absent=if_absent)
        )

    def delete(self, key: str) -> None:
        self._call(lambda: self.inner.delete(key))

    def start_upload(self, key: str, *, meta: Meta) -> str:
        return self._call(lambda: self.inner.start_upload(key, meta=meta))

    def put_part(
        self, key: str, upload_id: str, number: int, data: bytes, *, checksum: str
    ) -> Part:
        return self._call(
            lambda: self.inner.put_part(key, upload_id, number, data, checksum=checksum)
        )

    def complete_upload(
        self, key: str, upload_id: str, parts: builtins.list[Part], *, if_absent: bool = False
    ) -> str:
        return self._call(
            lambda: self.inner.complete_upload(key, upload_id, parts, if_absent=if_absent)
        )

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._call(lambda: self.inner.abort_upload(key, upload_id))

    def uploads(self, prefix: str = "") -> builtins.list[Upload]:
        return self._call(lambda: self.inner.uploads(prefix))


class _Resuming(io.RawIOBase):
    """A ranged read that, when the connection drops mid-body, asks again from the byte it
    reached (the same version: ``etag``)."""

    def __init__(
        self, store: RetryingObjectStore, key: str, start: int, end: int | None, etag: str | None
    ) -> None:
        super().__init__()
        self.store = store
        self.key = key
        self.pos = start
        self.end = end
        self.etag = etag
        self.attempts = _Attempts(store)
        self.body: BinaryIO | None = None
        self._open()

    def _open(self) -> None:
        while True:
            try:
                self.body = self.store.inner.get(self.key, self.pos, self.end, self.etag)
                self.store.answered = True
                return
            except Transient as e:
                self.attempts.failed(e)
            except ObjectStoreError:
                self.store.answered = True
                raise

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while True:
            if self.body is None:
                self._open()
            assert self.body is not None
            try:
                n = self.body.readinto(b)  # type: ignore[attr-defined]
            except Transient as e:
                self._drop()
                if self.end is not None and self.pos >= self.end:
                    return 0
                self.attempts.failed(e, f"read {self.key} at byte {self.pos}")
                continue
            self.pos += n
            return int(n)

    def _drop(self) -> None:
        if self.body is not None:
            body, self.body = self.body, None
            try:
                body.close()
            except Exception:  # a broken connection may fail to close; it is dropped anyway
                pass

    def close(self) -> None:
        self._drop()
        super().close()
