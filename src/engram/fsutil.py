"""Small file-system helpers: atomic metadata writes, private directories (STYLE habit 7),
publishing without replacing, work files that name their owner, and starting write-back early."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (0700); an existing one readable by others is tightened to 0700."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    if p.stat().st_mode & 0o077:
        os.chmod(p, 0o700)
    return p


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` via temp file, fsync, rename, fsync of the directory."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, p)
    fsync_dir(p.parent)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) through libc (the os module does not expose it), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk, without
    waiting, so that the fsync that must follow has only the tail left to wait for. Not for a
    process whose neighbours fsync small appends (a server's log): their fsyncs would queue
    behind this write-back all along.

    A hint: it does nothing where sync_file_range is missing, and ignores its errors; the
    caller's fsync is what makes the data durable and reports an I/O error."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# -- publishing without replacing ------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_renameat2 = _load_renameat2()


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst`` atomically, failing with FileExistsError if ``dst`` exists —
    never replacing it, even when another process creates ``dst`` at the same moment.

    Linux's renameat2(RENAME_NOREPLACE) does it in one step for files and directories. Where it
    is missing or the file system refuses it, a file is published with link() (which never
    replaces) and the temp name unlinked; a directory then falls back to a check before the
    rename, which leaves a window for a concurrent creator (documented, not silent)."""
    s, d = os.fsencode(src), os.fsencode(dst)
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, s, _AT_FDCWD, d, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
            raise OSError(err, os.strerror(err), os.fsdecode(d))
    if os.path.isdir(s) and not os.path.islink(s):
        if os.path.lexists(d):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(d))
        os.rename(s, d)
        return
    os.link(s, d)
    os.unlink(s)


def write_new(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` holding ``data``: temp file, fsync, rename without replacing, fsync of
    the directory. FileExistsError if ``path`` exists (nothing of this call remains then)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        rename_noreplace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


# -- work files that name their owner ---------------------------------------------------------
#
# A temp file or staging dir that a killed process leaves behind (a full copy of a database, a
# half-written archive) must not stay for ever. Each one is held with flock() by the process
# working on it, for as long as it works on it: the kernel drops the lock when the process dies,
# however it dies. A later run that finds one of engram's work files whose lock it can take knows
# its owner is gone and removes it. Names carry the owner's pid for the message only; the lock is
# the proof (a pid can be reused, a lock cannot outlive its holder).


class Owned:
    """The lock on a work file or directory, held until ``release`` (or process death)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _claim(path: Path, fd: int) -> Owned:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A cleaner may have removed the path between our creating it and locking it.
        st, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise FileNotFoundError(errno.ENOENT, "work file removed while it was created", path)
    except BaseException:
        os.close(fd)
        raise
    return Owned(path, fd)


_AT_SYMLINK_FOLLOW = 0x400


def _load_linkat() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_linkat = _load_linkat()


def _link_fd(fd: int, path: Path) -> None:
    """Give the nameless (O_TMPFILE) file open at ``fd`` the name ``path``; FileExistsError
    if the name is taken. (os.link would link /proc's symlink itself, not the file.)"""
    if _linkat is None:
        raise OSError(errno.ENOSYS, "linkat is not available")
    src = f"/proc/self/fd/{fd}".encode()
    if _linkat(_AT_FDCWD, src, _AT_FDCWD, os.fsencode(path), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def create_owned_file(path: Path, mode: int = 0o600) -> tuple[int, Owned]:
    """Create ``path`` (never replacing anything) for writing and hold its owner lock:
    (write fd, lock). Close the write fd as usual; ``release`` the lock once the file is
    published or removed.

    Where the file system offers O_TMPFILE the file is made nameless, locked, and only then
    linked at ``path``: a cleaner never sees it unlocked, so no live writer's file is ever
    taken for a dead one's. Elsewhere it is created by name and locked right after."""
    try:
        wfd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, mode)
    except (AttributeError, OSError):
        wfd = -1
    if wfd >= 0:
        try:
            fcntl.flock(wfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock_fd = os.dup(wfd)  # the lock lives on while the write fd is closed
            try:
                _link_fd(wfd, path)  # FileExistsError: never replaces
            except BaseException:
                os.close(lock_fd)
                raise
        except FileExistsError:
            os.close(wfd)
            raise
        except OSError:  # no /proc or no linkat: create it by name below
            os.close(wfd)
            wfd = -1
        except BaseException:
            os.close(wfd)
            raise
        else:
            return wfd, Owned(path, lock_fd)
    wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        lock = _claim(path, os.open(path, os.O_RDONLY | os.O_NOFOLLOW))
    except BaseException:
        os.close(wfd)
        path.unlink(missing_ok=True)
        raise
    return wfd, lock


def create_owned_dir(path: Path) -> Owned:
    """Create the directory ``path`` (0700) and hold its owner lock until ``release``."""
    path.mkdir(mode=0o700)
    try:
        return _claim(path, os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def remove_stale(directory: Path, match: Callable[[str], bool]) -> list[Path]:
    """Remove the work files and dirs in ``directory`` whose names ``match`` and whose owner is
    gone (their lock can be taken); returns what was removed. Never follows a symlink, never
    touches anything whose lock is held, and ignores what it cannot open."""
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not match(name):
            continue
        p = Path(directory) / name
        try:
            st = os.stat(p, follow_symlinks=False)
            is_dir = stat.S_ISDIR(st.st_mode)
            if not (is_dir or stat.S_ISREG(st.st_mode)):
                continue
            flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if is_dir else 0)
            fd = os.open(p, flags)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive and working on it
            if is_dir:
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed
