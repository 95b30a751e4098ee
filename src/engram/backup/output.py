"""A backup being written to a store: the one place that creates, publishes and cleans up the
objects of a backup (archive or incremental, its sidecar and its catalog entry), through the
``storage.BackupStore`` seam (a local directory: ``storage.local.LocalBackupStore``).

Guarantees (docs/FORMAT.md "Write order"):

- Nothing is ever replaced. NAME, NAME.sha256 and NAME.info.json are each created only if the
  name is free (the store's publish and create never replace), so of two backups racing for one
  name exactly one wins; the other fails with "already exists" and removes only what it created
  itself, never the winner's.
- The bytes go first to a temp object owned by this process (a hidden temp file beside NAME,
  held with an owner lock). A killed run leaves it behind; the next backup into the same store
  removes every temp whose owner is gone, and says so. A live one's is left alone.
- On any failure or interrupt, everything this run created is removed: nothing appears at NAME,
  NAME.sha256 or NAME.info.json.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from engram.backup.archive import FileSink, Sink
from engram.backup.catalog import encode_entry
from engram.backup.history import publish_lineage
from engram.errors import BackupError, EngramError, Refused
from engram.format.manifest import encode_sidecar
from engram.storage import BackupStore, Ref, TempObject, as_ref, info_name, sidecar_name


def already_exists(path: Path | str) -> Refused:
    return Refused(f"{path} already exists; choose a new name (backups are never overwritten)")


def describe_os_error(e: OSError, output: Path | str) -> str:
    if e.errno == errno.ENOSPC:
        return f"disk full while writing {output}; free space and run the backup again"
    return f"I/O error while writing {output} ({e.strerror or e}); check the disk and retry"


class TempSink:
    """The sink over a store's temp object: every byte is counted and hashed, then written."""

    def __init__(self, temp: TempObject) -> None:
        self.temp = temp
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.temp.write(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def sync_close(self) -> None:
        self.temp.sync_close()

    def close(self) -> None:
        self.temp.close()


class BackupOutput:
    """A backup being written as ``output`` (a path: the file of that name in its directory; or
    an object of any store). Use as a context manager:

        with BackupOutput(output) as out:
            sink = out.open()           # the temp object's sink
            ... write into sink, sink.sync_close() ...
            out.publish(sha256, info)   # archive, sidecar, catalog entry: never replacing

    Construction readies the store (a directory that does not exist is a UsageError; temps of
    killed runs are removed) and checks that nothing of the backup exists yet. Inside the block
    an OSError becomes a BackupError naming the cause and the output, a Ctrl-C one saying
    nothing was written; on any exception every object this run created is removed.
    """

    def __init__(self, output: Path | str | Ref) -> None:
        ref = as_ref(output)
        self.store: BackupStore = ref.store
        self.name = ref.name
        self.path = ref.describe()  # how messages name the backup
        self.sidecar = self.store.describe(sidecar_name(self.name))
        self.store.prepare()
        self.check_free()
        self._temp: TempObject | None = None
        self._sink: Sink | None = None
        self.published = False

    def check_free(self) -> None:
        """UsageError if any object of the backup exists already (the store's refusal at
        publish time is the one that counts: this only saves the work of a doomed backup)."""
        for n in (self.name, sidecar_name(self.name), info_name(self.name)):
            if self.store.exists(n):
                raise already_exists(self.path)

    def open(self) -> Sink:
        """Create the temp object and return the sink that writes it. Once. A temp that is a
        local file is written through a ``FileSink`` on its descriptor, so that a worker process
        can write it directly."""
        if self._temp is not None:
            raise RuntimeError("BackupOutput.open called twice")
        self._temp = self.store.create_temp(self.name)
        fileno = getattr(self._temp, "fileno", None)
        self._sink = FileSink(fd=os.dup(fileno())) if fileno is not None else TempSink(self._temp)
        return self._sink

    def publish(self, sha256: str, info: dict[str, Any]) -> None:
        """Publish the archive, then create its sidecar (``sha256sum`` format) and its catalog
        entry, each never replacing; then commit. The sink must be complete and durable
        (sync_closed). A taken name fails with "already exists". The entry names its files
        relative to the directory holding it (``path`` NAME, ``sidecar`` NAME.sha256), whatever
        ``info`` says, so that a copied repository names nothing outside itself."""
        if self._temp is None:
            raise RuntimeError("BackupOutput.publish before open")
        temp = self._temp
        base = self.name.rsplit("/", 1)[-1]
        entry = info | {"path": base, "sidecar": sidecar_name(base)}
        if info.get("lineage") is not None:  # the histories it names exist before it does
            publish_lineage(self.store, str(info["database_id"]), info["lineage"])
        try:
            self.store.publish(temp)
            self.store.create(sidecar_name(self.name), encode_sidecar(sha256, self.name), temp)
            self.store.create(info_name(self.name), encode_entry(entry), temp)
        except FileExistsError:
            raise already_exists(self.path) from None
        self.store.commit(temp)
        self.published = True

    def discard(self) -> None:
        """Remove every object this run created (and only those)."""
        if self._sink is not None:
            self._sink.close()
        if self._temp is not None:
            self.store.discard(self._temp)

    def __enter__(self) -> BackupOutput:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            if not self.published:
                self.discard()
            elif self._sink is not None:
                self._sink.close()
            return
        self.discard()
        if isinstance(exc, OSError) and not isinstance(exc, EngramError):
            # An object store's errors (storage.objects) already say what failed and where.
            raise BackupError(describe_os_error(exc, self.path)) from None
        if isinstance(exc, KeyboardInterrupt):
            raise BackupError(f"interrupted; nothing was written at {self.path}") from None
