"""A backup file being written at PATH: the one place that creates, publishes and cleans up
the files of a local backup (archive or incremental, its sidecar and its catalog entry).

Guarantees (docs/FORMAT.md "Write order"):

- Nothing is ever replaced. PATH, PATH.sha256 and PATH.info.json are each created by a rename
  that fails if the name exists (``fsutil.rename_noreplace``; the catalog entry likewise), so of
  two backups racing for one name exactly one wins; the other fails with "already exists" and
  removes only what it created itself (checked by inode before each unlink), never the winner's.
- The bytes go first to a hidden temp file beside PATH, ``.NAME.tmp-<pid>-<ns>``, created with
  O_EXCL and held with an owner lock for as long as this process works on it
  (``fsutil.create_owned_file``). A killed run leaves it behind; the next backup into the same
  directory removes every such file whose owner is gone, and says so. A live one's is left alone.
- On any failure or interrupt, everything this run created is removed: nothing appears at PATH,
  PATH.sha256 or PATH.info.json.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from engram.backup.archive import FileSink, Sink
from engram.backup.catalog import info_path, read_info, write_info
from engram.errors import BackupError, UsageError
from engram.format.manifest import encode_sidecar
from engram.fsutil import Owned, create_owned_file, fsync_dir, remove_stale, rename_noreplace

log = logging.getLogger("engram.backup")

# The temp names of a backup's archive or incremental and of its sidecar: only these are
# created with an owner lock, so only these are ever removed as a killed run's leftovers
# (other temp files, e.g. of a catalog entry being written, hold no lock and are never touched).
TEMP_NAME = re.compile(
    r"^\.(?P<name>.+\.(?:tar\.zst|tar\.gz|tgz|log)(?:\.sha256)?)\.tmp-(?P<pid>\d+)-[0-9a-f]+$"
)

# How a sink is made over the temp file: (path, open write descriptor) -> sink that owns it.
SinkFactory = Callable[[Path, int], Sink]


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def already_exists(path: Path) -> UsageError:
    return UsageError(f"{path} already exists; choose a new name (backups are never overwritten)")


def describe_os_error(e: OSError, output: Path) -> str:
    if e.errno == errno.ENOSPC:
        return f"disk full while writing {output}; free space and run the backup again"
    return f"I/O error while writing {output} ({e.strerror or e}); check the disk and retry"


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove the temp files of backups killed while they wrote into ``directory`` (those whose
    owner lock can be taken), logging a warning naming each; returns what was removed."""
    removed = remove_stale(directory, lambda name: TEMP_NAME.match(name) is not None)
    for p in removed:
        m = TEMP_NAME.match(p.name)
        pid = m.group("pid") if m else "?"
        log.warning("removed %s left by a killed backup (pid %s)", p.name, pid)
    return removed


class BackupOutput:
    """A backup file being written at ``path``. Use as a context manager:

        with BackupOutput(path) as out:
            sink = out.open()           # the temp file's sink
            ... write into sink, sink.sync_close() ...
            out.publish(sha256, info)   # archive, sidecar, catalog entry: never replacing

    Construction checks the name's directory and that nothing of the backup exists yet, and
    removes stale temp files of killed runs there. Inside the block an OSError becomes a
    BackupError naming the cause and PATH, a Ctrl-C one saying nothing was written; on any
    exception every file this object created is removed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        self.sidecar = sidecar_path(self.path)
        self.info = info_path(self.path)
        directory = self.path.parent
        if not directory.is_dir():
            raise UsageError(f"directory {directory} does not exist; create it first")
        self.check_free()
        remove_stale_temps(directory)
        tag = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._tmp = directory / f".{self.path.name}.tmp-{tag}"
        self._tmp_side = directory / f".{self.sidecar.name}.tmp-{tag}"
        self._sink: Sink | None = None
        self._locks: list[Owned] = []
        self._created: dict[Path, tuple[int, int]] = {}  # path -> (dev, ino) this run made
        self.published = False

    def check_free(self) -> None:
        """UsageError if any file of the backup exists already (a later check at publish time
        is the one that counts: this one only saves the work of a backup bound to fail)."""
        for p in (self.path, self.sidecar, self.info):
            if os.path.lexists(p):
                raise already_exists(self.path)

    @property
    def temp_path(self) -> Path:
        return self._tmp

    def _create(self, path: Path) -> int:
        fd, lock = create_owned_file(path)
        self._locks.append(lock)
        st = os.fstat(fd)
        self._created[path] = (st.st_dev, st.st_ino)
        return fd

    def open(self, factory: SinkFactory | None = None) -> Sink:
        """Create the temp file and return the sink that writes it (``factory(path, fd)``;
        a ``FileSink`` by default). Once."""
        if self._sink is not None:
            raise RuntimeError("BackupOutput.open called twice")
        fd = self._create(self._tmp)
        try:
            self._sink = (factory or _file_sink)(self._tmp, fd)
        except BaseException:
            os.close(fd)
            raise
        return self._sink

    def publish(self, sha256: str, info: dict[str, Any]) -> None:
        """Write the sidecar, then rename archive and sidecar into place without replacing,
        fsync the directory, then create the catalog entry. The temp file must be complete
        and durable (its sink sync_closed). An existing name fails with "already exists"."""
        fd = self._create(self._tmp_side)
        try:
            data = memoryview(encode_sidecar(sha256))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._move(self._tmp, self.path)
        self._move(self._tmp_side, self.sidecar)
        fsync_dir(self.path.parent)
        try:
            write_info(self.path, info)
        except FileExistsError:
            raise already_exists(self.path) from None
        except BaseException:
            # Failed after creating it (the directory's fsync)? It is ours if it describes
            # this archive; an entry another run created describes another one.
            entry = read_info(self.path)
            if entry is not None and entry.get("sha256") == sha256:
                st = os.stat(self.info, follow_symlinks=False)
                self._created[self.info] = (st.st_dev, st.st_ino)
            raise
        self.published = True

    def _move(self, src: Path, dst: Path) -> None:
        try:
            rename_noreplace(src, dst)
        except FileExistsError:
            raise already_exists(self.path) from None
        self._created[dst] = self._created.pop(src)

    def discard(self) -> None:
        """Remove every file this run created (and only those), release the owner locks."""
        if self._sink is not None:
            self._sink.close()
        for p, ident in list(self._created.items()):
            try:
                st = os.stat(p, follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == ident:  # ours, not a file another run put there
                p.unlink(missing_ok=True)
        self._created.clear()
        self._release()

    def _release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()

    def __enter__(self) -> BackupOutput:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            if self._sink is not None:
                self._sink.close()
            if not self.published:
                self.discard()
            self._release()
            return
        self.discard()
        if isinstance(exc, OSError):
            raise BackupError(describe_os_error(exc, self.path)) from None
        if isinstance(exc, KeyboardInterrupt):
            raise BackupError(f"interrupted; nothing was written at {self.path}") from None


def _file_sink(path: Path, fd: int) -> Sink:
    return FileSink(path, fd)
