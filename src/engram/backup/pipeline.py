"""Pipelined byte paths of a backup: each stage on a thread of its own.

Reading a file, hashing it (hashlib releases the GIL on large buffers), compressing it (zstd
releases it) and writing the result (a write releases it) are independent stages. Done in turn
in one thread, each waits for the others; on a machine with two or more cores they overlap
here, as ``tar | zstd | tee | sha256sum`` overlaps in separate processes, with bounded memory:

- ``HashedFile``: the first ``size`` bytes of a file, read ahead of their consumer by a thread
  that also hashes them (sha256), in a fixed ring of buffers.
- ``ThreadedSink``: a ``Sink`` whose bytes are handed to a thread that writes (and so hashes)
  them into the sink it wraps, so that a compressor never waits for the disk.
- ``PipelinedArchiveWriter``: an ``ArchiveWriter`` whose file members come through a
  ``HashedFile`` (the same archive, byte for byte).
- ``write_member``: the extraction side: one member's bytes, as a decompressor hands them on,
  hashed and written into a new file (write-back started as it goes, fsynced at the end) by a
  thread of its own, so that the thread that decompresses and parses never waits for the disk.

Every stage reports its error to the caller at the next call, or at the end: nothing fails
silently, and a stopped pipeline leaves no thread behind.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from engram.backup.archive import CHUNK, WRITEBACK_EVERY, ArchiveWriter, FileSink, Member, Sink
from engram.errors import BadArchive
from engram.fsutil import start_writeback

# Buffers a read-ahead may fill before its consumer takes them: enough for the reader to stay
# ahead of the compressor, little enough to stay in memory's cheap end (DEPTH x CHUNK bytes).
DEPTH = 4
# Writes a ThreadedSink may queue before a writer of it waits.
SINK_DEPTH = 256


class HashedFile:
    """The first ``size`` bytes of ``path``, read by a thread ``chunk`` bytes at a time and
    hashed on the way. Use as a context manager (leaving it stops the thread) and iterate once
    over ``chunks()``; each chunk is valid until the next one is asked for (its buffer is then
    reused). ``hexdigest()`` is the sha256 of every byte once the iteration has ended. A file
    shorter than ``size`` is a BadArchive ("shrank"), an OSError is raised as it is; either
    reaches the consumer in place of the chunk it stopped.
    """

    def __init__(self, path: Path, size: int, chunk: int = CHUNK, depth: int = DEPTH) -> None:
        if chunk <= 0 or depth <= 0 or size < 0:
            raise ValueError("HashedFile needs chunk > 0, depth > 0 and size >= 0")
        self.path, self.size, self.chunk = Path(path), size, chunk
        self._sha = hashlib.sha256()
        self._free: queue.Queue[bytearray | None] = queue.Queue()
        for _ in range(depth):
            self._free.put(bytearray(min(chunk, max(size, 1))))
        self._full: queue.Queue[tuple[bytearray, int] | BaseException | None] = queue.Queue()
        self._done = False
        self._thread = threading.Thread(target=self._read, name="engram-read-hash", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            left = self.size
            with open(self.path, "rb", buffering=0) as f:
                while left:
                    buf = self._free.get()
                    if buf is None:  # the consumer stopped
                        return
                    view = memoryview(buf)[: min(len(buf), left)]
                    n = f.readinto(view)
                    if not n:
                        raise BadArchive(f"{self.path} shrank while it was being archived")
                    self._sha.update(view[:n])
                    left -= n
                    self._full.put((buf, n))
            self._full.put(None)
        except BaseException as e:  # handed to the consumer, which raises it
            self._full.put(e)

    def chunks(self) -> Iterator[memoryview]:
        while not self._done:
            item = self._full.get()
            if item is None:
                self._done = True
                return
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            yield memoryview(buf)[:n]
            self._free.put(buf)

    def hexdigest(self) -> str:
        if not self._done:
            raise RuntimeError("HashedFile.hexdigest before every chunk was read")
        return self._sha.hexdigest()

    def close(self) -> None:
        """Stop the reader (if it still runs) and wait for it."""
        self._free.put(None)
        self._thread.join()

    def __enter__(self) -> HashedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThreadedSink:
    """Writes into ``inner`` from a thread of its own: ``write`` queues the bytes (at most
    ``depth`` writes ahead, then it waits) and returns. ``sync_close`` waits for every queued
    write, then sync_closes ``inner``; ``size`` and ``sha`` are then ``inner``'s (``sha`` is
    ``inner``'s own hash object). An error of ``inner`` is raised by the next ``write``,
    ``flush`` or ``sync_close``; ``close`` drops what is queued and closes ``inner``."""

    def __init__(self, inner: Sink, depth: int = SINK_DEPTH) -> None:
        self.inner = inner
        self.sha = inner.sha
        self.size = inner.size
        self._q: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._write, name="engram-write", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        while True:
            data = self._q.get()
            try:
                if data is None:
                    return
                if self._error is None and not self._stop:
                    self.inner.write(data)
            except BaseException as e:
                self._error = e
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: bytes | memoryview) -> int:
        self._check()
        if self._stop:
            raise ValueError("write to a stopped ThreadedSink")
        # The caller may reuse its buffer once this returns: only immutable bytes are queued
        # (a view of bytes keeps them alive and cannot change; any other buffer is copied).
        immutable = isinstance(data, bytes) or (
            isinstance(data, memoryview) and isinstance(data.obj, bytes)
        )
        self._q.put(data if immutable else bytes(data))
        return len(data)

    def flush(self) -> None:
        """Wait until every queued write is done (or has failed: raised here)."""
        self._q.join()
        self.size = self.inner.size
        self._check()

    def _end(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def sync_close(self) -> None:
        self.flush()
        self._end()
        self.inner.sync_close()
        self.size = self.inner.size

    def stop(self) -> None:
        """Drop what is queued and end the thread; ``inner`` stays open (its owner closes
        it)."""
        self._stop = True
        self._end()

    def close(self) -> None:
        self.stop()
        self.inner.close()


class PipelinedArchiveWriter(ArchiveWriter):
    """``ArchiveWriter`` whose file members are read and hashed ahead of the compressor by a
    ``HashedFile``; the archive is the same, byte for byte."""

    def add_file(self, name: str, path: Path, size: int) -> Member:
        self.out.write(self._header(name, size))
        with HashedFile(path, size, self.chunk) as src:
            for chunk in src.chunks():
                self.out.write(chunk)
                if self.progress:
                    self.progress(len(chunk))
        self._pad(size)
        m = Member(size, src.hexdigest())
        self.members[name] = m
        return m


class _WritebackSink(FileSink):
    """A new file (O_EXCL, 0600), hashed as written, that asks the kernel to start writing
    back every ``WRITEBACK_EVERY`` bytes (so that the final fsync has only the tail left)."""

    def __init__(self, path: Path, writeback: bool) -> None:
        super().__init__(path)
        self._writeback = writeback
        self._started = 0

    def write(self, data: bytes | memoryview) -> int:
        n = super().write(data)
        if self._writeback and self.size - self._started >= WRITEBACK_EVERY:
            start_writeback(self.fd, self._started, self.size - self._started)
            self._started = self.size
        return n


def write_member(chunks: Iterable[bytes | memoryview], path: Path, durable: bool = True) -> Member:
    """Create ``path`` (it must not exist: FileExistsError) and write ``chunks`` into it; its
    size and sha256. A thread of its own hashes and writes every chunk (and, when ``durable``,
    starts write-back as it goes and fsyncs at the end), while the calling thread produces the
    next one: chunks that are bytes, or views of bytes, are handed on as they are, any other
    buffer is copied first (its owner may reuse it). An error of either side is raised here,
    after the writer thread has ended; the file is then left for the caller to remove (an
    extraction removes its whole staging dir). Not for a process whose neighbours fsync small
    appends, with ``durable`` (``fsutil.start_writeback``)."""
    sink = ThreadedSink(_WritebackSink(Path(path), durable))
    try:
        for chunk in chunks:
            sink.write(chunk)
        if durable:
            sink.sync_close()
        else:
            sink.flush()
            sink.close()
    except BaseException:
        sink.close()
        raise
    return Member(sink.size, sink.sha.hexdigest())
