"""The storage seam of backups: ``BackupStore``, what every place that keeps backups offers.

Objects are named by keys relative to the store (``full-20251024.tar.zst``, ``sub/x.log``:
``/``-separated, no ``..``), never by absolute paths, so that the same code works on a local
directory (``storage.local.LocalBackupStore``) and on an object store. The method set is one an
object store can implement: a publish is a conditional create (S3 ``If-None-Match: *``), a
listing is by prefix, and a published object is never renamed; only a catalog entry is updated
in place (a validation's verdict).

A backup is published as three objects: the archive or incremental ``NAME``, its sidecar
``NAME.sha256`` and its catalog entry ``NAME.info.json``. The writer writes ``NAME`` into a temp
object, then publishes it and creates the two others as part of the same publication; until it
commits, ``discard`` removes everything the publication made — and only that.

Errors, for every method: ``FileNotFoundError`` for an object that is not there,
``FileExistsError`` for a name that is taken (a create or publish never replaces), any other
``OSError`` (ENOSPC, EIO, …) for a failure of the medium; a ``KeyboardInterrupt`` may arrive
anywhere. None of them leaves a half-written object under a published name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Protocol

SIDECAR_SUFFIX = ".sha256"
INFO_SUFFIX = ".info.json"


def sidecar_name(name: str) -> str:
    return name + SIDECAR_SUFFIX


def info_name(name: str) -> str:
    return name + INFO_SUFFIX


class TempObject(Protocol):
    """An object being written, not yet visible under ``name``: owned by the process writing
    it for as long as it exists, so that a killed writer's temp can be told from a live one's.
    ``write`` takes every byte or raises; ``sync_close`` makes the bytes durable and closes
    (required before ``publish``); ``close`` closes without (after a failure)."""

    name: str

    def write(self, data: bytes | memoryview) -> int: ...

    def sync_close(self) -> None: ...

    def close(self) -> None: ...


class BackupStore(Protocol):
    def describe(self, name: str = "") -> str:
        """How messages name the object ``name`` (the store itself for ""): a path, a URL."""
        ...

    def prepare(self) -> list[str]:
        """Get ready to take new objects: UsageError when the store cannot (a directory that does
        not exist); removes the temps of writers that are gone (a live writer's never), saying
        so in a warning each; returns what was removed."""
        ...

    def exists(self, name: str) -> bool:
        """Whether anything is published under ``name`` (temps do not count)."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """The published names that start with ``prefix``, sorted; cheap (no object is read)."""
        ...

    def size(self, name: str) -> int:
        """The size of ``name`` in bytes; FileNotFoundError if it is not there."""
        ...

    def open(self, name: str) -> BinaryIO:
        """A binary stream reading ``name`` from its start; FileNotFoundError if absent."""
        ...

    def read(self, name: str) -> bytes:
        """All of the (small) object ``name``; FileNotFoundError if absent."""
        ...

    def create_temp(self, name: str) -> TempObject:
        """A new temp object that ``publish`` will make ``name``. OSError if it cannot be made."""
        ...

    def publish(self, temp: TempObject) -> None:
        """Make the complete (sync_closed) ``temp`` visible as ``temp.name``, atomically and
        durably; FileExistsError, with nothing changed, when the name is taken."""
        ...

    def create(self, name: str, data: bytes, temp: TempObject | None = None) -> None:
        """Create the small object ``name`` holding ``data``, atomically and durably, never
        replacing: FileExistsError when it exists. With ``temp``, it belongs to that temp's
        publication (``discard`` removes it until ``commit``)."""
        ...

    def replace(self, name: str, data: bytes) -> None:
        """Replace the small object ``name`` with ``data`` atomically and durably (a reader
        sees the old or the new content, never a mix); only for catalog entries."""
        ...

    def commit(self, temp: TempObject) -> None:
        """The publication of ``temp`` is complete: nothing of it is removed from now on, and
        the writer lets go of it."""
        ...

    def discard(self, temp: TempObject) -> None:
        """Remove ``temp`` and whatever its uncommitted publication made (checked to be the
        objects it made, never another writer's under the same name). Never raises for what is
        already gone; safe to call twice, and does nothing after ``commit``."""
        ...


class Forwarding:
    """The read-only part of the seam passed to ``self.inner`` as it is: a base for wrappers
    (fault injection, encryption) that change how objects are written or read, not what a
    store holds or how it is named."""

    inner: BackupStore

    def describe(self, name: str = "") -> str:
        return self.inner.describe(name)

    def prepare(self) -> list[str]:
        return self.inner.prepare()

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def size(self, name: str) -> int:
        return self.inner.size(name)


@dataclass(frozen=True)
class Ref:
    """The object ``name`` in ``store``."""

    store: BackupStore
    name: str

    def describe(self) -> str:
        return self.store.describe(self.name)
