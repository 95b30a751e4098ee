"""The ``ObjectStore`` seam: what engram needs of an object store (S3 or a local directory), and
the code every store shares on top of it (docs/DESIGN.md "Object storage").

An ``ObjectStore`` offers a small set of requests, each one round trip that may be retried as a
whole: put bytes (``put``, optionally only if the key is free: S3 ``If-None-Match: *``), read a
byte range (``get``), ``head``, ``list`` by prefix, ``delete``, and multipart uploads
(``start_upload``, ``put_part``, ``complete_upload`` — conditional like ``put`` —
``abort_upload``, ``uploads``).
Every request names the SHA-256 of the bytes it sends, which the store passes to the server
(S3 ``x-amz-checksum-sha256``), so a byte damaged on the way is refused there. Drivers never
retry: ``storage.retry.RetryingObjectStore`` does, around any store.

Built on those: ``ObjectWriter`` streams an object of any size (one ``put`` while it fits in one
part, else a multipart upload with parts sized by ``part_size``), computing the whole object's
SHA-256 as it goes; ``ObjectReader`` streams it back in ranged reads and checks that hash at the
end (integrity never depends on the server); ``upload`` puts a stream or bytes in one call.

Keys are ``/``-separated relative names (no empty, ``.`` or ``..`` part, no leading ``/``).

Errors (all ``EngramError``, and ``OSError`` so that the ``BackupStore`` seam's callers see the
kinds they know): ``Transient`` (5xx, 408, 429/SlowDown, a dropped connection, a timeout: worth
retrying), ``ObjectNotFound`` (a ``FileNotFoundError``), ``ObjectExists`` (a ``FileExistsError``:
a conditional create found the key taken), ``AccessDenied``, ``NoSuchBucket`` and
``ObjectCorrupt`` (the bytes read are not the bytes written). Each message is one line naming
the endpoint, bucket or directory, and key, and what to do.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import re
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from engram.errors import EngramError

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
# S3's limits (also those of every S3-compatible store engram is tested against).
MIN_PART = 5 * MiB  # every part but the last
MAX_PART = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT = 5 * TiB
# The first part size of an upload whose size is not known in advance, and the smallest one
# chosen for a known size: large enough that requests cost little next to the bytes they carry,
# small enough that a part buffered in memory (and resent after a failure) stays cheap.
DEFAULT_PART = 8 * MiB
# A stream of unknown size doubles its part size every GROW_EVERY parts: 1,000 parts of each of
# 8 MiB, 16 MiB, ... 4 GiB reach 8 TiB within 10,000 parts, past the 5 TiB object limit.
GROW_EVERY = 1_000
# How many parts of one upload are sent at once, and how many ranges of one download are
# fetched ahead of the reader. A writer holds at most (UPLOAD_THREADS + 1) parts in memory
# (those in flight and the one filling), a reader (READ_AHEAD + 1) ranges of at most
# READ_CHUNK bytes: 40 MiB each with 8 MiB parts.
UPLOAD_THREADS = 4
READ_AHEAD = 4
READ_CHUNK = 8 * MiB

# The object metadata engram records (S3 user metadata ``x-amz-meta-…``).
META_SHA256 = "engram-sha256"
META_WRITER = "engram-writer"

_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class ObjectStoreError(EngramError, OSError):
    """The object store failed (exit 1)."""

    code = "object_store"


class Transient(ObjectStoreError):
    """The object store did not answer or asked to slow down (5xx, 408, 429, a dropped
    connection, a timeout); worth retrying (exit 1 once the retries are spent)."""

    code = "object_store_unavailable"


class Unreachable(Transient):
    """No connection to the endpoint could be made at all (refused, no route, a name that does
    not resolve): an outage once the endpoint has answered, most likely a wrong endpoint before
    it ever has."""


class ObjectNotFound(ObjectStoreError, FileNotFoundError):
    """No object (or upload) under that key (exit 1)."""

    code = "object_not_found"


class ObjectExists(ObjectStoreError, FileExistsError):
    """A conditional create found the key taken: nothing was replaced (exit 3)."""

    exit_code = 3
    http_status = 409
    code = "object_exists"


class AccessDenied(ObjectStoreError):
    """The credentials were refused or are missing (exit 1)."""

    code = "access_denied"


class NoSuchBucket(ObjectStoreError):
    """The bucket (or the local store's directory) does not exist (exit 2: name another one or
    create it)."""

    exit_code = 2
    http_status = 400
    code = "no_such_bucket"


class ObjectCorrupt(ObjectStoreError):
    """The bytes read are not the bytes written: a hash or size differs (exit 1)."""

    code = "object_corrupt"


def check_key(key: str) -> str:
    """``key`` if it is a valid object key; ValueError otherwise."""
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or _BAD_KEY_CHARS.search(key)
        or len(key.encode()) > 1024
    ):
        raise ValueError(f"{key!r} is not an object key (a relative '/'-separated name)")
    return key


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can start keys ("" or a key prefix); ValueError otherwise."""
    if prefix:
        check_key(prefix.rstrip("/") or "x")
        if prefix.startswith("/") or "//" in prefix:
            raise ValueError(f"{prefix!r} is not a key prefix")
    return prefix


@dataclass(frozen=True)
class Meta:
    """What engram records with an object: the SHA-256 of the whole object (when known before
    the upload starts), the token of the write that made it, and the S3 storage class."""

    sha256: str | None = None
    writer: str | None = None
    storage_class: str | None = None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    modified: float  # seconds since the epoch
    sha256: str | None = None  # ``head`` only: the whole object's hash, when recorded
    writer: str | None = None  # ``head`` only: the token of the write that made it


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Upload:
    """A multipart upload in progress (not an object yet: no listing shows it)."""

    key: str
    upload_id: str
    initiated: float  # seconds since the epoch, by the server's clock


class ObjectStore(Protocol):
    def describe(self, key: str = "") -> str:
        """How messages name ``key`` (or the store for ""): ``s3://bucket/prefix/key``, a path."""
        ...

    def check(self) -> None:
        """Raise NoSuchBucket / AccessDenied / Transient unless the store can be used."""
        ...

    def head(self, key: str) -> ObjectInfo:
        """The object's size, ETag, time and engram's metadata; ObjectNotFound if absent."""
        ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key (uploads in progress
        never appear); ``sha256`` and ``writer`` are not filled in."""
        ...

    def get(
        self, key: str, start: int = 0, end: int | None = None, etag: str | None = None
    ) -> BinaryIO:
        """A stream of the bytes [start, end) of ``key`` (to its end for None), which the caller
        closes; with ``etag``, ObjectCorrupt if the object is no longer that version."""
        ...

    def put(
        self, key: str, data: bytes, *, checksum: str, meta: Meta, if_absent: bool = False
    ) -> str:
        """Store ``data`` (whose hex SHA-256 is ``checksum``) under ``key``; its ETag. With
        ``if_absent`` ObjectExists, replacing nothing, when the key is taken."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; nothing for a key that is not there."""
        ...

    def start_upload(self, key: str, *, meta: Meta) -> str:
        """Begin a multipart upload to ``key``: its upload id."""
        ...

    def put_part(
        self, key: str, upload_id: str, number: int, data: bytes, *, checksum: str
    ) -> Part:
        """Upload part ``number`` (1-based) of ``data`` (hex SHA-256 ``checksum``)."""
        ...

    def complete_upload(
        self, key: str, upload_id: str, parts: builtins.list[Part], *, if_absent: bool = False
    ) -> str:
        """Make the upload the object ``key``: its ETag. With ``if_absent``, ObjectExists (the
        upload stays, to be aborted) when the key is taken; ObjectNotFound when the upload is
        gone (aborted)."""
        ...

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Drop the upload and its parts; nothing for one that is gone."""
        ...

    def uploads(self, prefix: str = "") -> builtins.list[Upload]:
        """The multipart uploads in progress whose key starts with ``prefix``."""
        ...


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def part_size(number: int, size: int | None, first: int = DEFAULT_PART) -> int:
    """The size of part ``number`` (1-based) of an object of ``size`` bytes (None: not known
    while streaming). A known size gets one part size, the smallest multiple of 1 MiB from
    ``first`` up that fits the object in ``MAX_PARTS`` parts; an unknown one starts at
    ``first`` and doubles every ``GROW_EVERY`` parts (capped at ``MAX_PART``), so that 10,000
    parts reach past ``MAX_OBJECT`` whatever comes. ValueError past the limits."""
    if number < 1 or number > MAX_PARTS:
        raise ValueError(f"part {number} is outside 1..{MAX_PARTS}")
    if size is not None:
        if size > MAX_OBJECT:
            raise ValueError(f"an object of {size} bytes is larger than S3's 5 TiB limit")
        need = -(-size // MAX_PARTS)
        return max(first, -(-need // MiB) * MiB)
    return min(MAX_PART, first << ((number - 1) // GROW_EVERY))


class OrderedHash:
    """The SHA-256 of the pieces given to ``update``, in that order, taken on a thread of its
    own (hashlib releases the GIL for large pieces), so that hashing overlaps the caller's
    network and disk work instead of adding to it. A piece must not change once given; at most
    ``backlog`` pieces wait, so memory stays bounded. Small pieces are hashed in the caller's
    thread, after those waiting."""

    SMALL = 64 * 1024

    def __init__(self, backlog: int = 2) -> None:
        self._h = hashlib.sha256()
        self._backlog = backlog
        self._pool: ThreadPoolExecutor | None = None
        self._waiting: deque[Future[None]] = deque()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) < self.SMALL:
            self.update_now(data)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="engram-hash")
        while len(self._waiting) >= self._backlog:
            self._waiting.popleft().result()
        self._waiting.append(self._pool.submit(self._h.update, data))

    def update_now(self, data: bytes | bytearray | memoryview) -> None:
        """Hash ``data`` before returning (a piece the caller will reuse)."""
        self._drain()
        self._h.update(data)

    def _drain(self) -> None:
        while self._waiting:
            self._waiting.popleft().result()

    def hexdigest(self) -> str:
        self._drain()
        self.close()
        return self._h.hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True)


class ObjectWriter:
    """Writes one object to ``store`` as a stream: ``write`` as often as needed, ``finish``,
    then ``publish``; ``abort`` on any failure (it drops a multipart upload, so that nothing is
    left behind). Bytes are kept in memory up to one part; an object that fits in one part is
    one ``put`` at ``publish``, a larger one a multipart upload begun when the first part is
    full. ``sha256`` and ``size`` are the whole object's once finished.

    Parts go up ``threads`` at a time (1: one after the other, in the caller's thread). A full
    part is handed to a thread and ``write`` goes on; it waits while ``threads`` parts are in
    flight, so the writer holds at most ``threads`` + 1 parts in memory. A part that failed
    (after the store's own retries) fails the next ``write`` or ``finish``; ``abort`` waits for
    the parts in flight before it drops the upload, so that no part lands after it. ``parts``
    is in part order once finished."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        *,
        size: int | None = None,
        meta: Meta | None = None,
        first_part: int = DEFAULT_PART,
        threads: int = UPLOAD_THREADS,
    ) -> None:
        self.store = store
        self.key = check_key(key)
        self.expected_size = size
        self.meta = meta or Meta()
        self.first_part = first_part
        self.threads = max(1, threads)
        self._buf = bytearray()
        # The whole object's hash, taken from the parts as they leave (immutable copies, in
        # order) on a thread of its own.
        self._hash = OrderedHash()
        self.size = 0
        self.upload_id: str | None = None
        self.parts: builtins.list[Part] = []
        self._sent = 0  # parts handed out (done or in flight)
        self._inflight: deque[Future[Part]] = deque()  # in part order
        self._pool: ThreadPoolExecutor | None = None
        self.finished = False
        self.sha256 = ""

    def _next_part_size(self) -> int:
        return part_size(self._sent + 1, self.expected_size, self.first_part)

    def write(self, data: bytes | memoryview) -> int:
        if self.finished:
            raise ValueError(f"write to {self.key} after finish")
        self._buf += data
        self.size += len(data)
        while len(self._buf) > self._next_part_size():  # the last part may be a full one
            self._send_part(self._next_part_size())
        return len(data)

    def _put(self, upload_id: str, number: int, chunk: bytes) -> Part:
        return self.store.put_part(self.key, upload_id, number, chunk, checksum=sha256_hex(chunk))

    def _send_part(self, n: int) -> None:
        with memoryview(self._buf) as view:  # one copy of the part, released before the resize
            chunk = bytes(view[:n])
        self._hash.update(chunk)
        if self.upload_id is None:
            self.upload_id = self.store.start_upload(self.key, meta=self.meta)
        self._sent += 1
        if self.threads == 1:
            self.parts.append(self._put(self.upload_id, self._sent, chunk))
        else:
            self._wait_for_room()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="engram-upload")
            self._inflight.append(self._pool.submit(self._put, self.upload_id, self._sent, chunk))
        del self._buf[:n]

    def _reap(self) -> None:
        """Raise the failure of a part that failed; move the parts done, in order, to
        ``parts``."""
        for f in self._inflight:
            if f.done() and (e := f.exception()) is not None:
                raise e
        while self._inflight and self._inflight[0].done():
            self.parts.append(self._inflight.popleft().result())

    def _wait_for_room(self) -> None:
        while True:
            self._reap()
            running = [f for f in self._inflight if not f.done()]
            if len(running) < self.threads:
                return
            wait(running, return_when=FIRST_COMPLETED)

    def _drain(self) -> None:
        """Wait for every part in flight; the pool's threads end."""
        if self._inflight:
            wait(list(self._inflight))
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True)

    def finish(self) -> None:
        """Every byte is written: the last part goes up and every part is done (an object of
        one part waits for ``publish``)."""
        if self.finished:
            return
        if self.upload_id is not None and self._buf:
            self._send_part(len(self._buf))
        elif self.upload_id is None:
            self._hash.update(bytes(self._buf))  # one put: the buffer is the object
        self._drain()
        self._reap()
        self.sha256 = self._hash.hexdigest()
        self.finished = True

    def publish(self, *, if_absent: bool = True) -> str:
        """Make the object visible under its key (conditionally with ``if_absent``): its ETag."""
        self.finish()
        if self.upload_id is None:
            data = bytes(self._buf)
            meta = Meta(self.sha256, self.meta.writer, self.meta.storage_class)
            etag = self.store.put(
                self.key, data, checksum=self.sha256, meta=meta, if_absent=if_absent
            )
            self._buf.clear()
            return etag
        etag = self.store.complete_upload(self.key, self.upload_id, self.parts, if_absent=if_absent)
        self.upload_id = None
        return etag

    def abort(self) -> None:
        """Drop what was uploaded and not published, once no part is in flight any more. Never
        raises for an upload already gone."""
        self._buf.clear()
        self._drain()
        self._hash.close()
        self._inflight.clear()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            self.store.abort_upload(self.key, upload_id)


@dataclass(frozen=True)
class Uploaded:
    key: str
    size: int
    sha256: str
    etag: str
    existed: bool  # the same bytes were already there (a conditional create found its twin)


def upload(
    store: ObjectStore,
    key: str,
    source: BinaryIO | bytes,
    *,
    size: int | None = None,
    if_absent: bool = True,
    storage_class: str | None = None,
    first_part: int = DEFAULT_PART,
    chunk: int = MiB,
    threads: int = UPLOAD_THREADS,
) -> Uploaded:
    """Upload ``source`` to ``key``: multipart when larger than one part, aborted on any failure.
    With ``if_absent`` (objects that are never replaced), a key already holding the same bytes
    is fine (``existed``) and one holding other bytes is ObjectExists."""
    token = os.urandom(12).hex()
    if isinstance(source, bytes):
        size, source = len(source), io.BytesIO(source)
    w = ObjectWriter(
        store,
        key,
        size=size,
        meta=Meta(None, token, storage_class),
        first_part=first_part,
        threads=threads,
    )
    try:
        while block := source.read(chunk):
            w.write(block)
        w.finish()
        try:
            etag = w.publish(if_absent=if_absent)
        except ObjectExists:
            w.abort()  # a multipart upload that did not become the object is not left behind
            if not settle_conflict(store, key, token, w.sha256):
                raise
            info = store.head(key)
            return Uploaded(key, w.size, w.sha256, info.etag, info.writer != token)
        except ObjectNotFound:
            # The upload is gone: a retried completion whose first attempt took effect (the
            # object is ours), or an upload aborted meanwhile.
            w.abort()
            try:
                info = store.head(key)
            except ObjectNotFound:
                info = None
            if info is None or info.writer != token:
                raise
            return Uploaded(key, w.size, w.sha256, info.etag, False)
    except BaseException:
        w.abort()
        raise
    return Uploaded(key, w.size, w.sha256, etag, False)


def settle_conflict(store: ObjectStore, key: str, token: str, sha256: str) -> bool:
    """After a conditional create found ``key`` taken: whether what is there is ours (a retried
    request whose first attempt succeeded) or holds the same bytes (``sha256``). The hash is
    taken from the object's metadata, or by reading it when none was recorded."""
    try:
        info = store.head(key)
    except ObjectNotFound:
        return False
    if info.writer is not None and info.writer == token:
        return True
    theirs = info.sha256
    if theirs is None:
        h = hashlib.sha256()
        with ObjectReader(store, key, info=info) as f:
            while block := f.read(MiB):
                h.update(block)
        theirs = h.hexdigest()
    return theirs == sha256


class ObjectReader(io.RawIOBase):
    """Reads the object ``key`` from its start, in ranged requests that grow from ``first``
    bytes to ``window`` (a caller that wants only a header fetches little), each pinned to the
    version first seen (its ETag), and checks at the end that the bytes hash to ``sha256`` (or
    the hash recorded with the object): ObjectCorrupt otherwise, and when the size differs.
    The hash taken is ``sha256`` once the object was read to its end. Not seekable: it is a
    stream.

    The first range is streamed as it arrives. A reader that goes past it reads ahead: the
    next ``ahead`` ranges are fetched by threads while it consumes the one before (0: every
    range streamed in turn), so it holds at most ``ahead`` + 1 ranges of at most ``window``
    bytes in memory. The hash is taken in order, by the reading thread; a range that failed
    (after the store's own retries) fails the read that reaches it."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        *,
        info: ObjectInfo | None = None,
        sha256: str | None = None,
        first: int = 256 * 1024,
        window: int = READ_CHUNK,
        ahead: int = READ_AHEAD,
    ) -> None:
        super().__init__()
        self.store = store
        self.key = key
        self.info = info or store.head(key)
        self.expected = sha256 or self.info.sha256
        self.pos = 0
        self._span = first
        self._window = window
        self._ahead = max(0, ahead)
        self._body: BinaryIO | None = None
        self._body_end = 0
        self._hash = OrderedHash()
        # The SHA-256 of every byte read, once the object was read to its end (whatever it
        # was checked against), so that a caller comparing it with another record (a
        # sidecar) need not hash the bytes again.
        self.sha256: str | None = None
        self.verified = False
        # Read-ahead: ranges in flight, in order ([start, end) and the bytes to come), the
        # range being consumed and where in it, and where the next range starts.
        self._pool: ThreadPoolExecutor | None = None
        self._fetching: deque[tuple[int, int, Future[bytearray]]] = deque()
        self._cur = memoryview(b"")
        self._cur_at = 0
        self._next = 0

    def readable(self) -> bool:
        return True

    def _next_span(self) -> int:
        span = self._span
        self._span = min(self._window, self._span * 4)
        return span

    def _cut(self, at: int) -> ObjectCorrupt:
        return ObjectCorrupt(
            f"{self.store.describe(self.key)} ended at byte {at} of {self.info.size}; it "
            "changed or was cut while read: read it again"
        )

    def _fetch(self, start: int, end: int) -> bytearray:
        buf = bytearray(end - start)
        view = memoryview(buf)
        got = 0
        with self.store.get(self.key, start, end, etag=self.info.etag) as body:
            while got < len(buf):
                n = body.readinto(view[got:])  # type: ignore[attr-defined]
                if not n:
                    raise self._cut(start + got)
                got += n
        return buf

    def _schedule(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._ahead, thread_name_prefix="engram-read")
        while len(self._fetching) < self._ahead and self._next < self.info.size:
            start = self._next
            end = min(self.info.size, start + self._next_span())
            self._fetching.append((start, end, self._pool.submit(self._fetch, start, end)))
            self._next = end

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        if not len(view):
            return 0
        size = self.info.size
        while True:
            if self._cur_at < len(self._cur):
                n = min(len(view), len(self._cur) - self._cur_at)
                view[:n] = self._cur[self._cur_at : self._cur_at + n]
                self._cur_at += n
                self.pos += n
                return n
            if self.pos >= size:
                self._done()
                return 0
            if self._ahead and self.pos > 0 and self._body is None:
                # Past the first range: take the next one fetched ahead.
                if not self._fetching:
                    self._next = self.pos
                self._schedule()
                start, _, fut = self._fetching.popleft()
                assert start == self.pos
                data = fut.result()
                self._hash.update(data)  # the whole range, in order, while it is consumed
                self._cur, self._cur_at = memoryview(data), 0
                self._schedule()
                continue
            if self._body is None:
                end = min(size, self.pos + self._next_span())
                self._body = self.store.get(self.key, self.pos, end, etag=self.info.etag)
                self._body_end = end
            want = min(len(view), self._body_end - self.pos)
            n = self._body.readinto(view[:want]) if want else 0  # type: ignore[attr-defined]
            if n:
                self._hash.update_now(view[:n])  # the caller's buffer: hashed before return
                self.pos += n
                if self.pos == self._body_end:
                    self._close_body()
                return int(n)
            if self.pos < self._body_end:
                raise self._cut(self.pos)
            self._close_body()

    def _close_body(self) -> None:
        if self._body is not None:
            body, self._body = self._body, None
            body.close()

    def _done(self) -> None:
        if self.sha256 is None:
            self.sha256 = self._hash.hexdigest()
        if self.verified or self.expected is None:
            return
        got = self.sha256
        if got != self.expected:
            raise ObjectCorrupt(
                f"{self.store.describe(self.key)} does not hash to the SHA-256 recorded for it "
                f"({got[:16]}… instead of {self.expected[:16]}…): it is damaged; use another copy"
            )
        self.verified = True

    def close(self) -> None:
        self._close_body()
        self._hash.close()
        self._cur = memoryview(b"")
        if self._pool is not None:
            # Ranges not begun are dropped; those being fetched end on their own (bounded by
            # the store's timeouts) and are thrown away.
            pool, self._pool = self._pool, None
            pool.shutdown(wait=False, cancel_futures=True)
        self._fetching.clear()
        super().close()


def read_all(store: ObjectStore, key: str, sha256: str | None = None) -> bytes:
    """All of the (small) object ``key``, checked against its recorded hash (or ``sha256``)."""
    with ObjectReader(store, key, sha256=sha256) as f:
        return f.read()
