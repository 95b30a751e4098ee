"""``DirObjectStore``: an ``ObjectStore`` in a local directory — the embedded default, and the
reference the conformance suite holds S3 servers to.

An object ``a/b`` is the file ``DIR/a/b``, whole and durable before it appears: a put writes and
fsyncs a temp file, then renames it into place (never replacing, for a conditional create:
``fsutil.rename_noreplace``) and fsyncs the directory. engram's metadata (``Meta``) is kept in
the file's extended attributes (``user.engram.*``), set before the rename, so an object and its
metadata appear together; on a file system without user xattrs objects carry none (reads then
check a hash only when the caller names one). Multipart uploads live in
``DIR/.engram-uploads/<id>/`` (a record of the upload and one file per part) until completed or
aborted; that directory is
never listed as objects, and no key may start with it. Like an S3 server, a put or part whose
bytes do not hash to the checksum sent is refused (ObjectCorrupt).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO

from engram.fsutil import ensure_private_dir, fsync_dir, rename_noreplace
from engram.storage.objects import (
    Meta,
    NoSuchBucket,
    ObjectCorrupt,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    Part,
    Upload,
    check_key,
    check_prefix,
)

UPLOADS = ".engram-uploads"
_XATTR = {"sha256": "user.engram.sha256", "writer": "user.engram.writer"}


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'


def _write_file(path: Path, chunks: builtins.list[bytes] | bytes, meta: Meta | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        if meta is not None:
            for field, attr in _XATTR.items():
                value = getattr(meta, field)
                if value is not None:
                    try:
                        os.setxattr(fd, attr, value.encode())
                    except OSError:  # no user xattrs here: the object carries no metadata
                        break
        os.fsync(fd)
    finally:
        os.close(fd)


class _Range(io.RawIOBase):
    def __init__(self, f: BinaryIO, remaining: int | None) -> None:
        super().__init__()
        self.f = f
        self.remaining = remaining

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b)
        if self.remaining is not None:
            view = view[: self.remaining]
        n = self.f.readinto(view)  # type: ignore[attr-defined]
        if self.remaining is not None:
            self.remaining -= n
        return int(n)

    def close(self) -> None:
        self.f.close()
        super().close()


class DirObjectStore:
    """The objects under ``directory`` (module docstring)."""

    def __init__(self, directory: Path | str) -> None:
        self.root = Path(directory).absolute()

    def __repr__(self) -> str:
        return f"DirObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == UPLOADS:
            raise ValueError(f"{key!r} is not an object key ({UPLOADS} is reserved)")
        return self.root / key

    def _work(self) -> Path:
        return ensure_private_dir(self.root / UPLOADS)

    def _tmp(self) -> Path:
        return self._work() / f"put-{os.getpid()}-{os.urandom(6).hex()}"

    def describe(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def check(self) -> None:
        if not self.root.is_dir():
            raise NoSuchBucket(f"directory {self.root} does not exist; create it first")

    def _missing(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"{self.describe(key)} does not exist; check the name")

    def head(self, key: str) -> ObjectInfo:
        p = self._path(key)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise self._missing(key) from None
        if not os.path.isfile(p):
            raise self._missing(key)
        got: dict[str, str | None] = {}
        for field, attr in _XATTR.items():
            try:
                got[field] = os.getxattr(p, attr).decode()
            except OSError:
                got[field] = None
        return ObjectInfo(key, st.st_size, _etag(st), st.st_mtime, got["sha256"], got["writer"])

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        out: builtins.list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            if rel == ".":
                dirnames[:] = [d for d in dirnames if d != UPLOADS]
                rel = ""
            for f in filenames:
                key = f"{rel}/{f}" if rel else f
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, f), follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(key, st.st_size, _etag(st), st.st_mtime))
        return sorted(out, key=lambda i: i.key)

    def get(
        self, key: str, start: int = 0, end: int | None = None, etag: str | None = None
    ) -> BinaryIO:
        p = self._path(key)
        try:
            f = open(p, "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise self._missing(key) from None
        st = os.fstat(f.fileno())
        if etag is not None and _etag(st) != etag:
            f.close()
            raise ObjectCorrupt(f"{self.describe(key)} changed while it was read; read it again")
        f.seek(start)
        remaining = None if end is None else max(0, end - start)
        return io.BufferedReader(_Range(f, remaining), 1 << 20)  # type: ignore[return-value]

    def _place(self, tmp: Path, key: str, if_absent: bool) -> str:
        dst = self._path(key)
        if not dst.parent.is_dir():
            ensure_private_dir(dst.parent)
        try:
            if if_absent:
                rename_noreplace(tmp, dst)
            else:
                os.replace(tmp, dst)
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            raise ObjectExists(
                f"{self.describe(key)} already exists; nothing was replaced"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dst.parent)
        return _etag(os.stat(dst))

    def _check_sum(self, key: str, data: bytes, checksum: str) -> None:
        if hashlib.sha256(data).hexdigest() != checksum:
            raise ObjectCorrupt(
                f"{self.describe(key)}: the bytes received do not match their SHA-256 checksum "
                "(BadDigest); nothing was stored"
            )

    def put(
        self, key: str, data: bytes, *, checksum: str, meta: Meta, if_absent: bool = False
    ) -> str:
        self._path(key)
        self._check_sum(key, data, checksum)
        tmp = self._tmp()
        try:
            _write_file(tmp, data, meta)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._place(tmp, key, if_absent)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    # -- multipart -------------------------------------------------------------------------

    def _upload_dir(self, key: str, upload_id: str) -> Path:
        d = self.root / UPLOADS / upload_id
        try:
            record = json.loads((d / "upload.json").read_bytes())
        except (OSError, ValueError):
            raise ObjectNotFound(
                f"the upload {upload_id} to {self.describe(key)} does not exist (aborted?)"
            ) from None
        if record.get("key") != key:
            raise ObjectNotFound(f"the upload {upload_id} is not one to {self.describe(key)}")
        return d

    def start_upload(self, key: str, *, meta: Meta) -> str:
        self._path(key)
        upload_id = f"{time.time_ns():x}-{os.urandom(8).hex()}"
        d = self._work() / upload_id
        d.mkdir(mode=0o700)
        record = {"key": key, "initiated": time.time(), "writer": meta.writer}
        _write_file(d / "upload.json", json.dumps(record).encode())
        fsync_dir(d.parent)
        return upload_id

    def put_part(
        self, key: str, upload_id: str, number: int, data: bytes, *, checksum: str
    ) -> Part:
        d = self._upload_dir(key, upload_id)
        self._check_sum(key, data, checksum)
        tmp = d / f"{number}.tmp-{os.urandom(6).hex()}"
        _write_file(tmp, data)
        os.replace(tmp, d / str(number))
        return Part(number, f'"{checksum}"', checksum, len(data))

    def complete_upload(
        self, key: str, upload_id: str, parts: builtins.list[Part], *, if_absent: bool = False
    ) -> str:
        d = self._upload_dir(key, upload_id)
        record = json.loads((d / "upload.json").read_bytes())
        if [p.number for p in parts] != list(range(1, len(parts) + 1)):
            raise ObjectCorrupt(f"{self.describe(key)}: the parts are not numbered 1..n")
        if if_absent and self._path(key).exists():
            raise ObjectExists(f"{self.describe(key)} already exists; nothing was replaced")
        tmp = self._tmp()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                for p in parts:
                    h = hashlib.sha256()
                    with open(d / str(p.number), "rb") as f:
                        while block := f.read(1 << 20):
                            h.update(block)
                            view = memoryview(block)
                            while view:
                                view = view[os.write(fd, view) :]
                    if h.hexdigest() != p.sha256:
                        raise ObjectCorrupt(
                            f"{self.describe(key)}: part {p.number} is not the part sent"
                        )
                if record.get("writer"):
                    try:
                        os.setxattr(fd, _XATTR["writer"], str(record["writer"]).encode())
                    except OSError:
                        pass
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        etag = self._place(tmp, key, if_absent)
        shutil.rmtree(d, ignore_errors=True)
        return etag

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            d = self._upload_dir(key, upload_id)
        except ObjectNotFound:
            return
        shutil.rmtree(d, ignore_errors=True)

    def uploads(self, prefix: str = "") -> builtins.list[Upload]:
        out: builtins.list[Upload] = []
        try:
            entries = list(os.scandir(self.root / UPLOADS))
        except FileNotFoundError:
            return out
        for e in entries:
            try:
                record = json.loads(Path(e.path, "upload.json").read_bytes())
            except (OSError, ValueError):
                continue
            if str(record["key"]).startswith(prefix):
                out.append(Upload(str(record["key"]), e.name, float(record["initiated"])))
        return sorted(out, key=lambda u: (u.key, u.initiated))
