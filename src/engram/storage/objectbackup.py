"""``ObjectBackupStore``: the ``BackupStore`` seam over any ``ObjectStore`` (S3, a directory), so
that every backup path that takes a store works on object storage (docs/DESIGN.md "Object
storage", docs/FORMAT.md "A repository in a bucket").

- A temp object is an upload in progress: bytes kept in memory up to one part, then a multipart
  upload to NAME that no listing shows and no reader can open, its parts sent
  ``objects.UPLOAD_THREADS`` at a time (so at most that many parts and the one filling are in
  memory). ``publish`` completes it (or puts
  a one-part object) with ``If-None-Match: *``: of two writers racing for NAME exactly one wins,
  and the loser's bytes never replace the winner's.
- ``create`` is a conditional put, ``replace`` (catalog entries only) an unconditional one: S3
  replaces an object atomically, so a reader sees the old or the new entry.
- Every object engram creates records a token of the write that made it (``engram-writer``).
  ``discard`` removes only objects that carry its publication's token, so a writer that lost a
  race never removes the winner's; a conditional create retried after its first attempt took
  effect recognises its own object by the same token.
- The whole object's SHA-256 is computed while uploading. A one-part object records it in its
  metadata (``engram-sha256``); an archive's is recorded by its sidecar, which ``create``
  checks against the hash of the bytes uploaded before creating it. ``open`` and ``read`` check
  it at the end of every complete read (``ObjectCorrupt`` otherwise); ``open`` reads ahead
  (``objects.ObjectReader``).
- ``prepare`` aborts the multipart uploads under the store's prefix that began more than
  ``stale_after`` ago (default 24 hours): S3 cannot tell a live writer's upload from a dead
  one's, so age is the only sign. A live writer whose upload is aborted meanwhile fails at
  ``publish`` (the upload is gone) and publishes nothing; no backup upload is expected to run
  that long, and a bucket lifecycle rule (AbortIncompleteMultipartUpload) is the usual second
  net.
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import BinaryIO

from engram.errors import BadArchive
from engram.format.manifest import decode_sidecar
from engram.storage.base import SIDECAR_SUFFIX, TempObject, sidecar_name
from engram.storage.objects import (
    DEFAULT_PART,
    READ_AHEAD,
    UPLOAD_THREADS,
    Meta,
    NoSuchBucket,
    ObjectCorrupt,
    ObjectExists,
    ObjectNotFound,
    ObjectReader,
    ObjectStore,
    ObjectWriter,
    check_key,
    settle_conflict,
)

log = logging.getLogger("engram.backup")

STALE_AFTER = 24 * 3600.0


class ObjectTemp:
    """A backup object being uploaded (``TempObject``); ``created`` maps each key its
    publication made to that object's ETag, until ``commit``."""

    def __init__(self, store: ObjectBackupStore, name: str) -> None:
        self.name = name
        self.token = os.urandom(12).hex()
        self.writer = ObjectWriter(
            store.objects,
            name,
            meta=Meta(None, self.token, store.storage_class),
            first_part=store.first_part,
            threads=store.upload_threads,
        )
        self.created: dict[str, str] = {}
        self.committed = False
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        return self.writer.write(data)

    def sync_close(self) -> None:
        """Upload the last part: every byte is then held by the server (not yet visible)."""
        self.writer.finish()
        self.closed = True

    def close(self) -> None:
        self.closed = True


def _temp(temp: TempObject) -> ObjectTemp:
    if not isinstance(temp, ObjectTemp):
        raise TypeError(f"{temp!r} is not a temp object of an ObjectBackupStore")
    return temp


class ObjectBackupStore:
    """Backups kept in ``objects`` (module docstring). ``storage_class`` applies to every object
    it creates; ``first_part`` is the part size an upload starts with, ``upload_threads`` how
    many of its parts go up at once, ``read_ahead`` how many ranges a read fetches ahead."""

    def __init__(
        self,
        objects: ObjectStore,
        *,
        storage_class: str | None = None,
        stale_after: float = STALE_AFTER,
        first_part: int = DEFAULT_PART,
        upload_threads: int = UPLOAD_THREADS,
        read_ahead: int = READ_AHEAD,
        clock: float | None = None,
    ) -> None:
        self.objects = objects
        self.storage_class = storage_class
        self.stale_after = stale_after
        self.first_part = first_part
        self.upload_threads = upload_threads
        self.read_ahead = read_ahead
        self._clock = clock

    def __repr__(self) -> str:
        return f"ObjectBackupStore({self.objects!r})"

    def _now(self) -> float:
        return self._clock if self._clock is not None else time.time()

    def describe(self, name: str = "") -> str:
        return self.objects.describe(name)

    def prepare(self) -> list[str]:
        try:
            self.objects.check()
        except NoSuchBucket as e:
            raise NoSuchBucket(e.message) from None
        removed: list[str] = []
        for u in self.objects.uploads():
            age = self._now() - u.initiated
            if age < self.stale_after:
                continue
            self.objects.abort_upload(u.key, u.upload_id)
            log.warning(
                "aborted the upload of %s begun %.1f hours ago (a killed backup's; upload %s)",
                self.describe(u.key),
                age / 3600,
                u.upload_id,
            )
            removed.append(u.key)
        return removed

    def exists(self, name: str) -> bool:
        try:
            self.objects.head(check_key(name))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        return [i.key for i in self.objects.list(prefix)]

    def size(self, name: str) -> int:
        return self.objects.head(check_key(name)).size

    def _expected(self, name: str, recorded: str | None) -> str | None:
        """The SHA-256 a complete read of ``name`` must give: the one recorded with it, else
        its sidecar's (a multipart archive's hash is known only once uploaded)."""
        if recorded is not None or name.endswith(SIDECAR_SUFFIX):
            return recorded
        try:
            side = ObjectReader(self.objects, sidecar_name(name))
        except ObjectNotFound:
            return None
        with side:
            data = side.read()
        try:
            return decode_sidecar(data, self.describe(sidecar_name(name)))
        except BadArchive:
            return None  # the backup's own checks report a bad sidecar

    def reader(self, name: str, sha256: str | None = None) -> ObjectReader:
        """A reader of ``name`` from its start, reading ahead, that checks at its end that the
        bytes hash to ``sha256`` (when given: a sidecar the caller read), else to the hash
        recorded with the object or its sidecar's; ``ObjectCorrupt`` otherwise. The hash it
        took is its ``sha256`` once read to the end, so the bytes are hashed once."""
        info = self.objects.head(check_key(name))
        return ObjectReader(
            self.objects,
            name,
            info=info,
            sha256=sha256 or self._expected(name, info.sha256),
            ahead=self.read_ahead,
        )

    def open(self, name: str) -> BinaryIO:
        return io.BufferedReader(self.reader(name), 1 << 20)  # type: ignore[return-value]

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def create_temp(self, name: str) -> ObjectTemp:
        return ObjectTemp(self, check_key(name))

    def publish(self, temp: TempObject) -> None:
        t = _temp(temp)
        t.closed = True
        try:
            etag = t.writer.publish(if_absent=True)
        except ObjectExists:
            if not self._ours(t, t.name):
                raise
            t.writer.abort()  # our completion took effect; the upload is gone or unneeded
            etag = self.objects.head(t.name).etag
        except ObjectNotFound as e:
            # The upload is gone: a retried completion whose first attempt took effect, or an
            # upload that another writer's prepare aborted as stale.
            if not self._ours(t, t.name):
                raise ObjectNotFound(
                    f"the upload of {self.describe(t.name)} was aborted before it was "
                    "completed (a prepare took it for a killed backup's); run the backup again"
                ) from e
            etag = self.objects.head(t.name).etag
        t.created[t.name] = etag

    def _ours(self, temp: ObjectTemp, key: str) -> bool:
        try:
            return self.objects.head(key).writer == temp.token
        except ObjectNotFound:
            return False

    def create(self, name: str, data: bytes, temp: TempObject | None = None) -> None:
        check_key(name)
        owner = _temp(temp) if temp is not None else None
        if owner is not None and name == sidecar_name(owner.name) and owner.writer.finished:
            try:
                recorded: str | None = decode_sidecar(data, self.describe(name))
            except BadArchive:  # holds no hash: the backup's own checks refuse such a sidecar
                recorded = None
            if recorded is not None and recorded != owner.writer.sha256:
                raise ObjectCorrupt(
                    f"{self.describe(name)} would record {recorded[:16]}… but the bytes "
                    f"uploaded to {self.describe(owner.name)} hash to "
                    f"{owner.writer.sha256[:16]}…; nothing was created"
                )
        token = owner.token if owner is not None else os.urandom(12).hex()
        w = ObjectWriter(self.objects, name, meta=Meta(None, token, self.storage_class))
        try:
            w.write(data)
            try:
                etag = w.publish(if_absent=True)
            except ObjectExists:
                if not settle_conflict(self.objects, name, token, w.sha256):
                    raise
                info = self.objects.head(name)
                if info.writer != token:  # the same bytes, but another writer's object
                    raise
                etag = info.etag
        except BaseException:
            w.abort()
            raise
        if owner is not None:
            owner.created[name] = etag

    def replace(self, name: str, data: bytes) -> None:
        w = ObjectWriter(
            self.objects, check_key(name), meta=Meta(None, os.urandom(12).hex(), self.storage_class)
        )
        try:
            w.write(data)
            w.publish(if_absent=False)
        except BaseException:
            w.abort()
            raise

    def commit(self, temp: TempObject) -> None:
        t = _temp(temp)
        t.committed = True
        t.created.clear()

    def discard(self, temp: TempObject) -> None:
        t = _temp(temp)
        if t.committed:
            return
        t.closed = True
        t.writer.abort()
        for key in list(t.created):
            if self._ours(t, key):  # ours, not an object another writer put there
                self.objects.delete(key)
            del t.created[key]
