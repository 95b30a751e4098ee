"""``FlakyObjects``: an ``ObjectStore`` that passes every request to another one and fails some
on cue, as a network or an overloaded server would (STYLE habit 10: fault injection is a wrapper
implementing the same interface). For the retry and object store tests.

``fail`` maps a request name (``put``, ``get``, ``put_part``, ``complete_upload``, …) to how many
of its next calls fail with ``Transient`` before it reaches the inner store; ``lose`` to how
many of its next calls take effect and then fail anyway (an answer lost on the way back);
``cut_after`` makes the next ``get`` bodies fail (``Transient``) once they have given that many
bytes, ``cuts`` times. ``calls`` counts the requests that reached the wrapper, by name.
"""

from __future__ import annotations

import builtins
import io
from collections import Counter
from collections.abc import Callable
from typing import BinaryIO, TypeVar

from engram.storage.objects import Meta, ObjectInfo, ObjectStore, Part, Transient, Upload

T = TypeVar("T")


class _CutBody(io.RawIOBase):
    def __init__(self, inner: BinaryIO, after: int) -> None:
        super().__init__()
        self.inner = inner
        self.left = after

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.left <= 0:
            raise Transient("injected: the connection dropped mid-body")
        view = memoryview(b)[: self.left]
        n = int(self.inner.readinto(view))  # type: ignore[attr-defined]
        self.left -= n
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


class FlakyObjects:
    def __init__(
        self,
        inner: ObjectStore,
        *,
        fail: dict[str, int] | None = None,
        lose: dict[str, int] | None = None,
        cut_after: int | None = None,
        cuts: int = 1,
    ) -> None:
        self.inner = inner
        self.fail: Counter[str] = Counter(fail or {})
        self.lose: Counter[str] = Counter(lose or {})
        self.cut_after = cut_after
        self.cuts = cuts
        self.calls: Counter[str] = Counter()

    def _do(self, name: str, fn: Callable[[], T]) -> T:
        self.calls[name] += 1
        if self.fail[name] > 0:
            self.fail[name] -= 1
            raise Transient(f"injected: {name} failed (503 SlowDown)")
        out = fn()
        if self.lose[name] > 0:
            self.lose[name] -= 1
            raise Transient(f"injected: the answer to {name} was lost")
        return out

    def describe(self, key: str = "") -> str:
        return self.inner.describe(key)

    def check(self) -> None:
        self._do("check", self.inner.check)

    def head(self, key: str) -> ObjectInfo:
        return self._do("head", lambda: self.inner.head(key))

    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return self._do("list", lambda: self.inner.list(prefix))

    def get(
        self, key: str, start: int = 0, end: int | None = None, etag: str | None = None
    ) -> BinaryIO:
        body = self._do("get", lambda: self.inner.get(key, start, end, etag))
        if self.cut_after is not None and self.cuts > 0:
            self.cuts -= 1
            return _CutBody(body, self.cut_after)  # type: ignore[return-value]
        return body

    def put(
        self, key: str, data: bytes, *, checksum: str, meta: Meta, if_absent: bool = False
    ) -> str:
        return self._do(
            "put",
            lambda: self.inner.put(key, data, checksum=checksum, meta=meta, if_absent=if_absent),
        )

    def delete(self, key: str) -> None:
        self._do("delete", lambda: self.inner.delete(key))

    def start_upload(self, key: str, *, meta: Meta) -> str:
        return self._do("start_upload", lambda: self.inner.start_upload(key, meta=meta))

    def put_part(
        self, key: str, upload_id: str, number: int, data: bytes, *, checksum: str
    ) -> Part:
        return self._do(
            "put_part",
            lambda: self.inner.put_part(key, upload_id, number, data, checksum=checksum),
        )

    def complete_upload(
        self, key: str, upload_id: str, parts: builtins.list[Part], *, if_absent: bool = False
    ) -> str:
        return self._do(
            "complete_upload",
            lambda: self.inner.complete_upload(key, upload_id, parts, if_absent=if_absent),
        )

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._do("abort_upload", lambda: self.inner.abort_upload(key, upload_id))

    def uploads(self, prefix: str = "") -> builtins.list[Upload]:
        return self._do("uploads", lambda: self.inner.uploads(prefix))
