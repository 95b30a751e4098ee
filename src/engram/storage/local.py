"""``LocalBackupStore``: a directory of backups behind the ``BackupStore`` seam.

Guarantees (docs/FORMAT.md "Write order"):

- Nothing is ever replaced but a catalog entry (``replace``). A publish or create renames a
  complete, fsynced temp file to its name with ``fsutil.rename_noreplace``, which fails when the
  name exists, and then fsyncs the directory: of two writers racing for one name exactly one
  wins.
- Every temp file is ``.NAME.tmp-<pid>-<hex>`` beside NAME, created with O_EXCL|O_NOFOLLOW and
  held with an owner lock (``fsutil.create_owned_file``) for as long as its writer works on it.
  A killed writer leaves it behind; ``prepare`` removes every such file whose owner is gone, and
  says so. A live writer's is left alone.
- ``discard`` removes only files this writer created, each checked by inode first, so a writer
  that lost a race never removes the winner's files.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import BinaryIO

from engram.errors import UsageError
from engram.fsutil import (
    Owned,
    create_owned_file,
    ensure_private_dir,
    fsync_dir,
    remove_stale,
    rename_noreplace,
)
from engram.storage.base import BackupStore, Ref, TempObject

log = logging.getLogger("engram.backup")

# The temp files this store makes: of a backup's archive or incremental, its sidecar or its
# catalog entry. Only these hold an owner lock, so only these are removed as a dead writer's.
TEMP_NAME = re.compile(
    r"^\.(?P<name>.+\.(?:tar\.zst|tar\.gz|tgz|log)(?:\.sha256|\.info\.json)?)"
    r"\.tmp-(?P<pid>\d+)-[0-9a-f]+$"
)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LocalTemp:
    """A temp file of ``LocalBackupStore``; ``fileno()`` is its write descriptor, so that another
    process (a backup worker) can write it directly."""

    def __init__(self, name: str, path: Path, fd: int, lock: Owned) -> None:
        self.name = name
        self.path = path
        self.fd = fd
        self.locks = [lock]
        st = os.fstat(fd)
        self.created: dict[Path, tuple[int, int]] = {path: (st.st_dev, st.st_ino)}
        self.committed = False

    def fileno(self) -> int:
        return self.fd

    def write(self, data: bytes | memoryview) -> int:
        _write_all(self.fd, data)
        return len(data)

    def sync_close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _local(temp: TempObject) -> LocalTemp:
    if not isinstance(temp, LocalTemp):
        raise TypeError(f"{temp!r} is not a temp object of a LocalBackupStore")
    return temp


class LocalBackupStore:
    """The backups in ``directory`` (absolute once made); names are paths relative to it. The
    listing covers the directory and one level of subdirectories."""

    def __init__(self, directory: Path | str) -> None:
        self.root = Path(directory).absolute()

    def __repr__(self) -> str:
        return f"LocalBackupStore({str(self.root)!r})"

    def path(self, name: str) -> Path:
        """The file of ``name``; ValueError for a name that would leave the directory."""
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{name!r} is not an object name (a relative path without '..')")
        return self.root / name

    def describe(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def prepare(self) -> list[str]:
        if not self.root.is_dir():
            raise UsageError(f"directory {self.root} does not exist; create it first")
        removed = remove_stale(self.root, lambda n: TEMP_NAME.match(n) is not None)
        for p in removed:
            m = TEMP_NAME.match(p.name)
            pid = m.group("pid") if m else "?"
            log.warning("removed %s left by a killed backup (pid %s)", p.name, pid)
        return [p.name for p in removed]

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path(name))

    def list(self, prefix: str = "") -> list[str]:
        names: list[str] = []
        try:
            top = list(os.scandir(self.root))
        except OSError:
            return names
        for e in top:
            if _is_temp(e.name):
                continue
            if e.is_file():
                names.append(e.name)
            elif e.is_dir(follow_symlinks=False):
                try:
                    below = list(os.scandir(e.path))
                except OSError:
                    continue
                names.extend(
                    f"{e.name}/{s.name}" for s in below if not _is_temp(s.name) and s.is_file()
                )
        return sorted(n for n in names if n.startswith(prefix))

    def size(self, name: str) -> int:
        return os.stat(self.path(name)).st_size

    def open(self, name: str) -> BinaryIO:
        return open(self.path(name), "rb")

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def _temp_path(self, name: str) -> Path:
        p = self.path(name)
        return p.with_name(f".{p.name}.tmp-{os.getpid()}-{os.urandom(6).hex()}")

    def create_temp(self, name: str) -> LocalTemp:
        tmp = self._temp_path(name)
        fd, lock = create_owned_file(tmp)
        return LocalTemp(name, tmp, fd, lock)

    def _rename_new(self, temp: LocalTemp, src: Path, name: str) -> None:
        dst = self.path(name)
        rename_noreplace(src, dst)
        temp.created[dst] = temp.created.pop(src)
        fsync_dir(dst.parent)

    def publish(self, temp: TempObject) -> None:
        t = _local(temp)
        t.close()
        self._rename_new(t, t.path, t.name)

    def create(self, name: str, data: bytes, temp: TempObject | None = None) -> None:
        if "/" in name:  # an object in a subdirectory (histories/<id>.json): create it first
            parent = self.path(name).parent
            if not parent.is_dir():
                ensure_private_dir(parent)
                fsync_dir(parent.parent)
        tmp = self._temp_path(name)
        fd, lock = create_owned_file(tmp)
        if temp is None:
            owner = LocalTemp(name, tmp, fd, lock)
        else:
            owner = _local(temp)
            st = os.fstat(fd)
            owner.locks.append(lock)
            owner.created[tmp] = (st.st_dev, st.st_ino)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
                if temp is None:
                    owner.fd = -1
            self._rename_new(owner, tmp, name)
        except BaseException:
            if temp is None:
                self.discard(owner)
            raise
        if temp is None:
            self.commit(owner)

    def replace(self, name: str, data: bytes) -> None:
        dst = self.path(name)
        tmp = self._temp_path(name)
        fd, lock = create_owned_file(tmp)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            lock.release()
        fsync_dir(dst.parent)

    def commit(self, temp: TempObject) -> None:
        t = _local(temp)
        t.committed = True
        t.created.clear()
        self._release(t)

    def discard(self, temp: TempObject) -> None:
        t = _local(temp)
        t.close()
        for p, ident in list(t.created.items()):
            try:
                st = os.stat(p, follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == ident:  # ours, not a file another writer put there
                p.unlink(missing_ok=True)
        t.created.clear()
        self._release(t)

    @staticmethod
    def _release(temp: LocalTemp) -> None:
        for lock in temp.locks:
            lock.release()
        temp.locks.clear()


def as_ref(output: Path | str | Ref) -> Ref:
    """``output`` as an object of a store: a path is the name of a file in its directory."""
    if isinstance(output, Ref):
        return output
    p = Path(output).absolute()
    return Ref(LocalBackupStore(p.parent), p.name)


def as_store(where: Path | str | BackupStore) -> BackupStore:
    """``where`` as a store: a path is a local directory."""
    if isinstance(where, (str, os.PathLike)):
        return LocalBackupStore(where)
    return where
