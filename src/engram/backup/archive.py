"""Streaming tar archives, compressed with zstd or gzip, hashed as they are written and read.

Writing: GNU-format tar headers written by hand and file data streamed in large chunks straight
into the compressor (no temp copies); sha256 of each member's data and of the compressed output.
Reading: our own tar reader over the decompressor, which refuses anything but regular files with
names on the allow-list (no absolute paths, no ``..``, no links, no devices) and writes only into
the directory it is given, hashing as it goes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import queue
import stat
import struct
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard

from engram.errors import BadArchive, EngramError
from engram.format.manifest import (
    MAX_ARCHIVE_HEADER,
    allowed_member,
    decode_archive_header,
    encode_archive_header,
)
from engram.fsutil import start_writeback

CHUNK = 4 << 20
WRITEBACK_EVERY = 8 << 20  # extraction: bytes written between two start_writeback calls
BLOCK = 512
RECORD = 20 * BLOCK
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
# The archive header's containers (docs/FORMAT.md "Archive header"): zstd, an empty frame (no
# content, one empty last block) then a skippable frame with this magic; gzip, an FEXTRA
# subfield with this id.
ZSTD_EMPTY_FRAME = bytes.fromhex("28b52ffd2000010000")
ZSTD_HEADER_MAGIC = 0x184D2A5E
GZIP_HEADER_ID = b"Eg"
_FEXTRA = 4

Progress = Callable[[int], None]


class Sink(Protocol):
    """Where a backup's bytes go (an archive or an incremental, already compressed): a file
    (``FileSink``) or a stream to a client (the server's backup stream). ``size`` and ``sha``
    count and hash every byte written, so that whoever wrote can say what it wrote.

    ``write`` takes every byte or raises; ``sync_close`` makes the bytes durable where that
    means something (fsync of a file) and closes; ``close`` closes without (after a failure)."""

    size: int
    sha: hashlib._Hash

    def write(self, data: bytes | memoryview) -> int: ...

    def flush(self) -> None: ...

    def sync_close(self) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """A file, hashed as written: ``path`` created with O_EXCL, or the open descriptor ``fd``
    (a file another step created, or a pipe: only a regular file is fsynced). The sink owns
    the descriptor and closes it."""

    def __init__(self, path: Path | None = None, fd: int | None = None) -> None:
        if fd is None:
            if path is None:
                raise ValueError("FileSink needs a path or a descriptor")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.fd = fd
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(self.fd, mv) :]
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def sync_close(self) -> None:
        if self.fd >= 0:
            if self._regular:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _GzipWriter:
    """A gzip member written field by field (RFC 1952), so that the archive header rides in
    its FEXTRA field: gzip, Python's gzip module and GNU tar skip it. Raw deflate in between,
    then the CRC32 and size of the uncompressed data."""

    def __init__(self, sink: Sink, level: int = 6, header: bytes | None = None) -> None:
        self.sink = sink
        self.z = zlib.compressobj(level, zlib.DEFLATED, -15)
        self.crc = 0
        self.isize = 0
        flags, extra = 0, b""
        if header is not None:
            sub = GZIP_HEADER_ID + struct.pack("<H", len(header)) + header
            flags, extra = _FEXTRA, struct.pack("<H", len(sub)) + sub
        # ID1 ID2, CM deflate, FLG, MTIME 0 (unknown), XFL 0, OS 255 (unknown)
        sink.write(GZIP_MAGIC + bytes((8, flags)) + b"\0\0\0\0\0\xff" + extra)

    def write(self, data: bytes | memoryview) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.isize += len(data)
        out = self.z.compress(data)
        if out:
            self.sink.write(out)
        return len(data)

    def finish(self) -> None:
        self.sink.write(self.z.flush() + struct.pack("<II", self.crc, self.isize & 0xFFFFFFFF))


class _ZstdWriter:
    """``threads``: None = one compression thread per core (up to 8); 0 or 1 = compress in the
    calling thread only (a low-priority backup, which must not take a second core)."""

    def __init__(
        self,
        sink: Sink,
        level: int = 1,
        threads: int | None = None,
        header: bytes | None = None,
    ) -> None:
        if header is not None:
            # An empty frame first keeps the zstd magic at offset 0 (GNU tar and file(1) sniff
            # it), then the header in a skippable frame, which every zstd decoder passes over.
            sink.write(ZSTD_EMPTY_FRAME + struct.pack("<II", ZSTD_HEADER_MAGIC, len(header)))
            sink.write(header)
        if threads is None:
            threads = min(os.cpu_count() or 1, 8)
        # The content checksum lets a reader without the sidecar still catch a changed byte.
        cctx = zstandard.ZstdCompressor(
            level=level, threads=threads if threads > 1 else 0, write_checksum=True
        )
        self.w = cctx.stream_writer(cast(IO[bytes], sink), closefd=False, write_size=1 << 16)

    def write(self, data: bytes | memoryview) -> int:
        return self.w.write(data)

    def finish(self) -> None:
        self.w.close()  # ends the one frame (closefd=False leaves the sink open)


@dataclass
class Member:
    size: int
    sha256: str


@dataclass
class ArchiveWriter:
    """Write a tar archive member by member; ``members`` maps name to size and sha256.
    ``threads`` is zstd's (see ``_ZstdWriter``); gzip always compresses in the calling thread.
    ``chunk``: files are read, hashed and compressed this many bytes at a time.
    ``header``: the archive header's fields (``manifest.archive_header``; a whole manifest
    works too), written at the very start of the archive (docs/FORMAT.md "Archive header");
    None writes an archive without one, as engram did before headers existed."""

    sink: Sink
    compression: str
    progress: Progress | None = None
    threads: int | None = None
    chunk: int = CHUNK  # bytes per read of a file member
    members: dict[str, Member] = field(default_factory=dict)
    header: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        head = None if self.header is None else encode_archive_header(self.header)
        self.out: _GzipWriter | _ZstdWriter = (
            _ZstdWriter(self.sink, threads=self.threads, header=head)
            if self.compression == "zstd"
            else _GzipWriter(self.sink, header=head)
        )
        self._buf = bytearray(self.chunk)
        self.mtime = int(time.time())

    def _header(self, name: str, size: int) -> bytes:
        ti = tarfile.TarInfo(name)
        ti.size = size
        ti.mode = 0o600
        ti.mtime = self.mtime
        ti.type = tarfile.REGTYPE
        ti.uname = ti.gname = "engram"
        return ti.tobuf(format=tarfile.GNU_FORMAT)

    def _pad(self, size: int) -> None:
        rem = size % BLOCK
        if rem:
            self.out.write(b"\0" * (BLOCK - rem))

    def add_bytes(self, name: str, data: bytes) -> Member:
        self.out.write(self._header(name, len(data)))
        self.out.write(data)
        self._pad(len(data))
        m = Member(len(data), hashlib.sha256(data).hexdigest())
        self.members[name] = m
        if self.progress:
            self.progress(len(data))
        return m

    def add_file(self, name: str, path: Path, size: int) -> Member:
        """Stream the first ``size`` bytes of ``path`` (which must not shrink meanwhile)."""
        self.out.write(self._header(name, size))
        sha = hashlib.sha256()
        buf = self._buf
        mv = memoryview(buf)
        left = size
        with open(path, "rb", buffering=0) as f:
            while left:
                n = f.readinto(mv[: min(self.chunk, left)])  # type: ignore[attr-defined]
                if not n:
                    raise BadArchive(f"{path} shrank while it was being archived")
                chunk = mv[:n]
                sha.update(chunk)
                self.out.write(chunk)
                left -= n
                if self.progress:
                    self.progress(n)
        self._pad(size)
        m = Member(size, sha.hexdigest())
        self.members[name] = m
        return m

    def finish(self) -> None:
        self.out.write(b"\0" * (2 * BLOCK))
        self.out.finish()


# -- reading -------------------------------------------------------------------------------


class HashingReader:
    """Reads the compressed archive, hashing every byte (the sidecar check, in the same pass;
    ``hashed=False``: a stream that checks its own hash); with ``walk``, every byte also goes
    through a ``ZstdFrameWalk`` (a stream that cannot seek)."""

    def __init__(
        self,
        f: BinaryIO,
        progress: Progress | None = None,
        walk: ZstdFrameWalk | None = None,
        hashed: bool = True,
    ) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.hashed = hashed
        self.progress = progress
        self.walk = walk
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if self.hashed:
            self.sha.update(data)
        if self.walk is not None:
            self.walk.feed(data)
        self.size += len(data)
        if self.progress and data:
            self.progress(len(data))
        return data

    def readinto(self, b: bytearray | memoryview) -> int:
        n = self.f.readinto(b)  # type: ignore[attr-defined]
        if n:
            got = memoryview(b)[:n]
            if self.hashed:
                self.sha.update(got)
            if self.walk is not None:
                self.walk.feed(got)
            self.size += n
            if self.progress:
                self.progress(n)
        return n or 0

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def sniff_compression(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    raise BadArchive(f"{path} is neither zstd- nor gzip-compressed; it is not an engram backup")


def read_archive_header(path: Path) -> dict[str, Any] | None:
    """The archive header's fields (a few KB read from the start), or None for an archive
    written without one. BadArchive if a header is there but damaged."""
    with open(path, "rb") as f:
        head = f.read(ARCHIVE_HEAD_BYTES)
    return parse_archive_header(head, Path(path).name)


# What ``parse_archive_header`` needs of an archive's start.
ARCHIVE_HEAD_BYTES = MAX_ARCHIVE_HEADER + 64


def parse_archive_header(head: bytes, name: str) -> dict[str, Any] | None:
    """``read_archive_header`` of the first ``ARCHIVE_HEAD_BYTES`` of the archive ``name``."""
    if head.startswith(ZSTD_EMPTY_FRAME):
        rest = head[len(ZSTD_EMPTY_FRAME) :]
        if len(rest) < 8 or struct.unpack_from("<I", rest)[0] != ZSTD_HEADER_MAGIC:
            return None
        (n,) = struct.unpack_from("<I", rest, 4)
        if n > MAX_ARCHIVE_HEADER or len(rest) < 8 + n:
            raise BadArchive(f"{name}: the archive header is damaged (bad length)")
        return decode_archive_header(rest[8 : 8 + n], name)
    if head.startswith(GZIP_MAGIC) and len(head) >= 12 and head[3] & _FEXTRA:
        (xlen,) = struct.unpack_from("<H", head, 10)
        extra, pos = head[12 : 12 + xlen], 0
        while pos + 4 <= len(extra):
            (n,) = struct.unpack_from("<H", extra, pos + 2)
            if extra[pos : pos + 2] == GZIP_HEADER_ID:
                if pos + 4 + n > len(extra):
                    raise BadArchive(f"{name}: the archive header is damaged (bad length)")
                return decode_archive_header(extra[pos + 4 : pos + 4 + n], name)
            pos += 4 + n
    return None


def check_zstd_frames(path: Path) -> None:
    """Walk the zstd frame and block headers of ``path`` (seeks only): a stream reader reports a
    cut-off last frame as a clean end, so truncation is caught here, before extraction."""
    size = path.stat().st_size
    with open(path, "rb") as f:

        def need(n: int, what: str) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise BadArchive(f"the archive is truncated: it ends inside a zstd {what}")
            return b

        while f.tell() < size:
            magic = int.from_bytes(need(4, "frame header"), "little")
            if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
                f.seek(int.from_bytes(need(4, "skippable frame"), "little"), 1)
                if f.tell() > size:
                    raise BadArchive("the archive is truncated: it ends inside a skippable frame")
                continue
            if magic != 0xFD2FB528:
                raise BadArchive(f"the archive is damaged: non-zstd bytes at offset {f.tell() - 4}")
            fhd = need(1, "frame header")[0]
            single = (fhd >> 5) & 1
            fcs = {0: single, 1: 2, 2: 4, 3: 8}[fhd >> 6]
            header = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            need(header, "frame header")
            while True:
                bh = int.from_bytes(need(3, "block header"), "little")
                btype, bsize = (bh >> 1) & 3, bh >> 3
                if btype == 3:
                    raise BadArchive("the archive is damaged: an invalid zstd block")
                f.seek(1 if btype == 1 else bsize, 1)
                if f.tell() > size:
                    raise BadArchive("the archive is truncated: it ends inside a zstd block")
                if bh & 1:
                    break
            if fhd & 4:
                need(4, "frame checksum")


class ZstdFrameWalk:
    """``check_zstd_frames`` for a stream that cannot seek: fed every compressed byte in order,
    it follows the frame and block headers (skipping block contents by count), and ``end``
    refuses a stream that stops anywhere but between two frames. A stream reader reports a
    cut-off last frame as a clean end, so this is what catches a truncated archive read from
    an object store; nothing is placed before ``end`` has passed."""

    _WHAT = {
        "magic": "frame header",
        "skip-size": "skippable frame",
        "descriptor": "frame header",
        "frame-rest": "frame header",
        "block": "block header",
        "checksum": "frame checksum",
    }

    def __init__(self) -> None:
        self.pos = 0  # bytes consumed
        self._state = "magic"
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._skip_what = ""
        self._checksum = False
        self._last = False

    def feed(self, data: bytes | memoryview) -> None:
        mv = memoryview(data).cast("B")
        i, n = 0, len(mv)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            k = min(self._need - len(self._buf), n - i)
            self._buf += mv[i : i + k]
            i += k
            if len(self._buf) == self._need:
                at = self.pos + i - self._need
                head, self._buf = bytes(self._buf), bytearray()
                self._step(head, at)
        self.pos += n

    def _expect(self, state: str, need: int) -> None:
        self._state, self._need = state, need
        if need == 0:  # a frame header with nothing after its descriptor
            self._step(b"", self.pos)

    def _step(self, b: bytes, at: int) -> None:
        s = self._state
        if s == "magic":
            magic = int.from_bytes(b, "little")
            if 0x184D2A50 <= magic <= 0x184D2A5F:
                self._expect("skip-size", 4)
            elif magic == 0xFD2FB528:
                self._expect("descriptor", 1)
            else:
                raise BadArchive(f"the archive is damaged: non-zstd bytes at offset {at}")
        elif s == "skip-size":
            self._skip, self._skip_what = int.from_bytes(b, "little"), "skippable frame"
            self._expect("magic", 4)
        elif s == "descriptor":
            fhd = b[0]
            single = (fhd >> 5) & 1
            fcs = {0: single, 1: 2, 2: 4, 3: 8}[fhd >> 6]
            self._checksum = bool(fhd & 4)
            self._expect("frame-rest", (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs)
        elif s == "frame-rest":
            self._expect("block", 3)
        elif s == "block":
            bh = int.from_bytes(b, "little")
            btype, bsize = (bh >> 1) & 3, bh >> 3
            if btype == 3:
                raise BadArchive("the archive is damaged: an invalid zstd block")
            self._skip, self._skip_what = (1 if btype == 1 else bsize), "zstd block"
            if not bh & 1:
                self._expect("block", 3)
            elif self._checksum:
                self._expect("checksum", 4)
            else:
                self._expect("magic", 4)
        elif s == "checksum":
            self._expect("magic", 4)

    def end(self) -> None:
        """BadArchive unless the stream ended between two frames."""
        if self._skip:
            raise BadArchive(f"the archive is truncated: it ends inside a {self._skip_what}")
        if self._state != "magic" or self._buf or self.pos == 0:
            what = self._WHAT[self._state]
            raise BadArchive(f"the archive is truncated: it ends inside a zstd {what}")


_READ_ERRORS = (zstandard.ZstdError, OSError, EOFError, zlib.error)
PREFETCH = 1 << 20


class _Decompressed:
    """The decompressed tar, read ahead by a thread of its own: decompressing (and hashing the
    compressed bytes) releases the GIL, so it runs on one core while the caller hashes and
    writes members on the other, as ``zstd -d | tar -x`` does with two processes."""

    def __init__(self, raw: HashingReader, compression: str) -> None:
        self.raw = raw
        if compression == "zstd":
            dctx = zstandard.ZstdDecompressor()
            self.r: BinaryIO = dctx.stream_reader(  # type: ignore[assignment]
                cast(IO[bytes], raw), read_size=CHUNK, read_across_frames=True
            )
        else:
            import gzip

            self.r = cast(BinaryIO, gzip.GzipFile(fileobj=cast(IO[bytes], raw), mode="rb"))
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=16)
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="engram-decompress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self.r.read(PREFETCH)
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as e:  # raised in the reading thread by _next
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _fill(self, what: str) -> bool:
        """Make ``_buf`` non-empty; False at the end of the stream."""
        while not self._buf:
            if self._eof:
                return False
            item = self._q.get()
            if isinstance(item, BaseException):
                self._eof = True
                # A store's own error (an object that is not what was recorded, a network
                # that stayed down) says what happened itself; it is no damage to report.
                if isinstance(item, _READ_ERRORS) and not isinstance(item, EngramError):
                    raise BadArchive(
                        f"the archive is damaged: decompression failed in {what} ({item})"
                    ) from None
                raise item
            if not item:
                self._eof = True
                return False
            self._buf = memoryview(item)
        return True

    def take(self, n: int, what: str) -> memoryview:
        """Up to ``n`` (> 0) next bytes, without a copy; the stream must not end first."""
        if not self._fill(what):
            raise BadArchive(f"the archive is truncated: it ends inside {what}")
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def read_exact(self, n: int, what: str) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += self.take(n - len(out), what)
        return bytes(out)

    def rest(self, what: str) -> Iterator[memoryview]:
        """Everything left in the stream."""
        while self._fill(what):
            out, self._buf = self._buf, memoryview(b"")
            yield out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def check_member_name(name: str) -> str:
    """Refuse names that could write outside the target or that are not ours."""
    if not name or name.startswith("/") or "\\" in name or "\0" in name:
        raise BadArchive(f"archive member {name!r} has an absolute or invalid path; refused")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadArchive(f"archive member {name!r} has a '..' or empty path component; refused")
    if not allowed_member(name):
        raise BadArchive(f"archive member {name!r} is not part of an engram backup; refused")
    return name


_KIND_NAMES = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.DIRTYPE: "a directory",
    tarfile.CONTTYPE: "a contiguous file",
}


def extract_verified(
    archive: Path,
    dest: Path,
    progress: Progress | None = None,
    writer: Callable[[Path], BinaryIO] | None = None,
    durable: bool = True,
) -> tuple[dict[str, Member], bytes | None, str]:
    """Extract every member into ``dest`` (an empty private dir), hashing as it goes.

    Returns (members, manifest bytes or None, sha256 of the compressed archive). Refuses any
    member that is not a regular file with an allowed name, duplicates, and trailing garbage.
    ``durable=False`` (a throwaway restore test) skips the fsyncs: the disk is left to whoever
    shares the machine.
    """
    compression = sniff_compression(archive)
    if compression == "zstd":
        check_zstd_frames(archive)
    open_out = writer or (lambda p: open(p, "xb", buffering=0))  # noqa: SIM115
    with open(archive, "rb") as f:
        raw = HashingReader(f, progress)
        src = _Decompressed(raw, compression)
        try:
            members, manifest = _extract_members(src, dest, open_out, durable)
        finally:
            src.close()
        raw.drain()
    return members, manifest, raw.sha.hexdigest()


@dataclass
class Extracted:
    """What ``extract_stream`` read: every member's size and hash, the manifest's bytes (None
    when absent), the SHA-256 of every compressed byte ("" when the stream checks its own),
    and the archive's first bytes (for ``parse_archive_header``)."""

    members: dict[str, Member]
    manifest: bytes | None
    sha256: str
    head: bytes


class _Prefixed(io.RawIOBase):
    """``head`` (bytes already read from ``f``), then the rest of ``f``."""

    def __init__(self, head: bytes, f: BinaryIO) -> None:
        super().__init__()
        self.head = memoryview(head)
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        if self.head:
            n = min(len(view), len(self.head))
            view[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        return int(self.f.readinto(view) or 0)  # type: ignore[attr-defined]


def extract_stream(
    f: BinaryIO,
    name: str,
    dest: Path,
    progress: Progress | None = None,
    durable: bool = True,
    hashed: bool = True,
) -> Extracted:
    """``extract_verified`` of an archive read as a stream from its first byte to its last (an
    object store's reader: no seeking, no local copy). Every check is the same; the zstd frame
    walk runs on the bytes as they pass (``ZstdFrameWalk``) and its verdict comes at the end of
    the stream, so a caller places nothing before this returns. ``name`` names the archive in
    messages. ``hashed=False``: the stream hashes its bytes itself (an object store's reader
    told the sidecar's hash), so they are not hashed again here."""
    head = b""
    while len(head) < ARCHIVE_HEAD_BYTES:
        more = f.read(ARCHIVE_HEAD_BYTES - len(head))
        if not more:
            break
        head += more
    if head.startswith(ZSTD_MAGIC):
        compression, walk = "zstd", ZstdFrameWalk()
    elif head.startswith(GZIP_MAGIC):
        compression, walk = "gzip", None
    else:
        raise BadArchive(f"{name} is neither zstd- nor gzip-compressed; it is not an engram backup")
    open_out = lambda p: open(p, "xb", buffering=0)  # noqa: E731, SIM115
    raw = HashingReader(cast(BinaryIO, _Prefixed(head, f)), progress, walk, hashed)
    src = _Decompressed(raw, compression)
    try:
        members, manifest = _extract_members(src, dest, open_out, durable)
    finally:
        src.close()
    raw.drain()
    if walk is not None:
        walk.end()
    return Extracted(members, manifest, raw.sha.hexdigest() if hashed else "", head)


def _extract_members(
    src: _Decompressed, dest: Path, open_out: Callable[[Path], BinaryIO], durable: bool = True
) -> tuple[dict[str, Member], bytes | None]:
    members: dict[str, Member] = {}
    manifest: bytes | None = None
    zero_blocks = 0
    while True:
        hdr = src.read_exact(BLOCK, "a tar header")
        if hdr == b"\0" * BLOCK:
            zero_blocks += 1
            if zero_blocks == 2:
                break
            continue
        if zero_blocks:
            raise BadArchive("the archive is damaged: data after an end-of-archive marker")
        try:
            ti = tarfile.TarInfo.frombuf(hdr, "utf-8", "strict")
        except (tarfile.HeaderError, UnicodeDecodeError) as e:
            raise BadArchive(f"the archive has an invalid tar header ({e})") from None
        name = ti.name
        if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = _KIND_NAMES.get(ti.type, f"of tar type {ti.type!r}")
            raise BadArchive(f"archive member {name!r} is {kind}, not a regular file; refused")
        check_member_name(name)
        if name in members:
            raise BadArchive(f"archive member {name!r} appears twice; refused")
        if ti.size < 0 or ti.size > 1 << 44:
            raise BadArchive(f"archive member {name!r} has an impossible size")
        target = dest / name
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        sha = hashlib.sha256()
        keep = bytearray() if name == "manifest.json" else None
        if keep is not None and ti.size > 16 << 20:
            raise BadArchive("manifest.json is implausibly large; refused")
        left = ti.size
        try:
            out = open_out(target)
        except FileExistsError:
            raise BadArchive(f"archive member {name!r} appears twice; refused") from None
        try:
            written = started = 0
            while left:
                chunk = src.take(min(CHUNK, left), repr(name))
                sha.update(chunk)
                _write_all(out, chunk)
                if keep is not None:
                    keep += chunk
                left -= len(chunk)
                written += len(chunk)
                if durable and written - started >= WRITEBACK_EVERY:  # the disk works meanwhile
                    start_writeback(out.fileno(), started, written - started)
                    started = written
            if durable:
                os.fsync(out.fileno())
        finally:
            out.close()
        os.chmod(target, 0o600)
        pad = (-ti.size) % BLOCK
        if pad:
            src.read_exact(pad, repr(name))
        members[name] = Member(ti.size, sha.hexdigest())
        if keep is not None:
            manifest = bytes(keep)
    # The rest of the stream must be zeros (tar record padding), then nothing.
    for rest in src.rest("the padding after the last member"):
        if bytes(rest).count(0) != len(rest):
            raise BadArchive("the archive is damaged: data after an end-of-archive marker")
    return members, manifest


def _write_all(out: BinaryIO, data: memoryview) -> None:
    while data:
        n = out.write(data)
        if n is None:
            raise OSError(errno.EIO, "short write")
        data = data[n:]


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    sha = hashlib.sha256()
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(mv)  # type: ignore[attr-defined]
            if not n:
                break
            sha.update(mv[:n])
            if progress:
                progress(n)
    return sha.hexdigest()
