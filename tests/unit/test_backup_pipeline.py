"""The pipelined byte paths of a backup (engram.backup.pipeline): a file read and hashed ahead
of its consumer, a sink written by a thread, and the archive they write, which must be the
serial writer's, byte for byte; every error reaches the caller and no thread outlives its
pipeline."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest
import zstandard

from engram.backup.archive import ArchiveWriter
from engram.backup.pipeline import (
    HashedFile,
    PipelinedArchiveWriter,
    ThreadedSink,
    write_member,
)
from engram.backup.worker import Plan, PlanMember, write_plan
from engram.errors import BadArchive

MANIFEST = {
    "kind": "full",
    "database_id": "00000000-0000-4000-8000-000000000000",
    "snapshot_lsn": 0,
    "snapshot_time": "",
    "snapshot_time_ns": 0,
    "warm_lsn": 0,
    "digest": "0" * 64,
    "counts": {"memories": 0, "edges": 0},
}
THREADS = ("engram-read-hash", "engram-write")
WB = 8 << 20  # archive.WRITEBACK_EVERY


def _pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in THREADS]


class MemorySink:
    """A sink in memory that fails with ``error`` once ``fail_after`` bytes were written."""

    def __init__(self, fail_after: int | None = None, error: OSError | None = None) -> None:
        self.buf = bytearray()
        self.sha = hashlib.sha256()
        self.size = 0
        self.fail_after = fail_after
        self.error = error or OSError(errno.ENOSPC, "No space left on device")
        self.synced = self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        if self.fail_after is not None and self.size >= self.fail_after:
            raise self.error
        self.buf += data
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def sync_close(self) -> None:
        self.synced = True

    def close(self) -> None:
        self.closed = True


# -- HashedFile ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunk"), [(0, 4096), (1, 4096), (4096, 4096), (100_000, 4096), (5000, 1 << 20)]
)
def test_hashed_file_gives_the_prefix_and_its_hash(tmp_path: Path, size: int, chunk: int) -> None:
    data = os.urandom(size + 777)  # longer than asked for: only the first size bytes count
    p = tmp_path / "f"
    p.write_bytes(data)
    got = bytearray()
    with HashedFile(p, size, chunk=chunk, depth=2) as src:
        for c in src.chunks():
            assert 0 < len(c) <= chunk
            got += c
        assert src.hexdigest() == hashlib.sha256(data[:size]).hexdigest()
    assert bytes(got) == data[:size]
    assert _pipeline_threads() == []


def test_hashed_file_that_shrank_or_is_missing(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10_000)
    with HashedFile(p, 20_000, chunk=4096) as src, pytest.raises(BadArchive) as ei:
        for _ in src.chunks():
            pass
    assert ei.value.message == f"{p} shrank while it was being archived"
    with HashedFile(tmp_path / "gone", 1) as src, pytest.raises(FileNotFoundError):
        list(src.chunks())
    assert _pipeline_threads() == []


def test_hashed_file_stopped_early_leaves_no_thread(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(1 << 20))
    with HashedFile(p, 1 << 20, chunk=4096, depth=2) as src:
        for _ in src.chunks():
            break  # the reader is now blocked waiting for a free buffer
        with pytest.raises(RuntimeError, match="before every chunk"):
            src.hexdigest()
    assert _pipeline_threads() == []


@pytest.mark.parametrize(("size", "chunk", "depth"), [(-1, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_hashed_file_refuses_bad_arguments(
    tmp_path: Path, size: int, chunk: int, depth: int
) -> None:
    with pytest.raises(ValueError, match="HashedFile needs"):
        HashedFile(tmp_path / "f", size, chunk=chunk, depth=depth)


# -- ThreadedSink ----------------------------------------------------------------------------


def test_threaded_sink_writes_in_order_and_copies_reused_buffers() -> None:
    inner = MemorySink()
    ts = ThreadedSink(inner, depth=2)
    buf = bytearray(b"a" * 1000)
    want = bytearray()
    for i in range(200):
        buf[:] = bytes([i % 251]) * 1000
        ts.write(memoryview(buf))  # the caller reuses its buffer at once
        ts.write(b"tail%d" % i)
        want += bytes([i % 251]) * 1000 + b"tail%d" % i
    ts.sync_close()
    assert bytes(inner.buf) == bytes(want) and inner.synced
    assert (ts.size, ts.sha.hexdigest()) == (len(want), hashlib.sha256(want).hexdigest())
    assert _pipeline_threads() == []


def test_threaded_sink_raises_the_inner_error_and_never_syncs_after_it() -> None:
    inner = MemorySink(fail_after=10_000)
    ts = ThreadedSink(inner, depth=4)
    with pytest.raises(OSError) as ei:
        for _ in range(1000):
            ts.write(b"y" * 4096)
        ts.sync_close()
    assert ei.value.errno == errno.ENOSPC
    with pytest.raises(OSError):  # and again: an error is never swallowed
        ts.sync_close()
    assert not inner.synced
    ts.close()
    assert inner.closed and _pipeline_threads() == []
    closed = ThreadedSink(MemorySink())
    closed.close()
    with pytest.raises(ValueError, match="stopped"):
        closed.write(b"z")


# -- the archive -----------------------------------------------------------------------------


def _plan(tmp_path: Path, threads: int | None, chunk: int) -> Plan:
    big = tmp_path / "big.bin"
    if not big.exists():
        big.write_bytes(os.urandom(300_000) + bytes(700_000))
        (tmp_path / "cold.seg").write_bytes(os.urandom(5000))
    members = [
        PlanMember("identity.json", data=b'{"database_id": "x"}'),
        PlanMember("warm/engram.db", path=str(big), size=900_001),  # a prefix of the file
        PlanMember("fast/hot.json", data=b'{"ids": []}'),
        PlanMember("cold/" + "a" * 64 + ".seg", path=str(tmp_path / "cold.seg"), size=5000),
    ]
    return Plan("zstd", members, dict(MANIFEST), threads, chunk=chunk)


def _tar(raw: bytes) -> dict[str, bytes]:
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        out = {}
        for m in t.getmembers():
            f = t.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


def test_pipelined_archive_is_the_serial_one(tmp_path: Path) -> None:
    """A plan for every core is written through the pipeline, one for one core serially: the
    same members, hashes and manifest; the sink got exactly the bytes it hashed."""
    got = {}
    for threads in (None, 1):
        sink = MemorySink()
        members = write_plan(_plan(tmp_path, threads, 64 << 10), sink)
        assert sink.synced and sink.sha.hexdigest() == hashlib.sha256(sink.buf).hexdigest()
        got[threads] = (members, _tar(bytes(sink.buf)))
    assert got[None] == got[1]
    members, files = got[None]
    big = (tmp_path / "big.bin").read_bytes()[:900_001]
    assert files["warm/engram.db"] == big
    assert members["warm/engram.db"].sha256 == hashlib.sha256(big).hexdigest()
    assert _pipeline_threads() == []


def test_pipelined_writer_equals_archive_writer_byte_for_byte(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(os.urandom(50_000))
    out = []
    for cls in (PipelinedArchiveWriter, ArchiveWriter):
        sink = MemorySink()
        aw = cls(sink, "gzip", chunk=4096, header=MANIFEST)
        aw.mtime = 1_700_000_000  # tar headers carry the time: the same for both
        aw.add_file("warm/engram.db", tmp_path / "f", 50_000)
        aw.add_bytes("manifest.json", b"{}")
        aw.finish()
        out.append((bytes(sink.buf), aw.members))
    assert out[0] == out[1]


@pytest.mark.parametrize("fail_after", [0, 100_000])
def test_pipelined_write_failure_reaches_the_caller_and_stops_every_thread(
    tmp_path: Path, fail_after: int
) -> None:
    sink = MemorySink(fail_after=fail_after, error=OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError) as ei:
        write_plan(_plan(tmp_path, None, 4096), sink)
    assert ei.value.errno == errno.EIO
    assert not sink.synced  # a failed archive is never made durable
    assert _pipeline_threads() == []


def test_pipelined_write_interrupted_by_its_caller_stops_every_thread(tmp_path: Path) -> None:
    """An exception in the caller's thread (a Ctrl-C arrives there; here from progress)."""

    def progress(n: int) -> None:
        raise KeyboardInterrupt

    sink = MemorySink()
    with pytest.raises(KeyboardInterrupt):
        write_plan(_plan(tmp_path, None, 4096), sink, progress)
    assert not sink.synced and _pipeline_threads() == []


def test_pipelined_write_of_a_file_that_shrank(tmp_path: Path) -> None:
    plan = _plan(tmp_path, None, 4096)
    plan.members[1] = PlanMember("warm/engram.db", path=str(tmp_path / "big.bin"), size=2 << 20)
    with pytest.raises(BadArchive, match="shrank while it was being archived"):
        write_plan(plan, MemorySink())
    assert _pipeline_threads() == []


# -- write_member (extraction) ---------------------------------------------------------------


@pytest.mark.parametrize("durable", [True, False])
def test_write_member_writes_and_hashes_what_it_is_given(tmp_path: Path, durable: bool) -> None:
    blob = os.urandom(WB + 3 * 65536 + 11)  # past one write-back step
    reused = bytearray(1000)

    def chunks():  # views of bytes (handed on as they are) and a reused buffer (copied)
        view = memoryview(blob)
        for i in range(0, len(blob), 65536):
            yield view[i : i + 65536]
        for i in range(3):
            reused[:] = bytes([i]) * 1000
            yield memoryview(reused)
        yield b""

    want = blob + b"".join(bytes([i]) * 1000 for i in range(3))
    p = tmp_path / "warm" / "engram.db"
    p.parent.mkdir()
    m = write_member(chunks(), p, durable)
    assert (m.size, m.sha256) == (len(want), hashlib.sha256(want).hexdigest())
    assert p.read_bytes() == want and (p.stat().st_mode & 0o777) == 0o600
    assert _pipeline_threads() == []
    with pytest.raises(FileExistsError):  # a member never replaces a file
        write_member([b"x"], p)
    assert p.read_bytes() == want


def test_write_member_passes_on_the_producer_error(tmp_path: Path) -> None:
    def chunks():
        yield b"a" * 100_000
        raise BadArchive("the archive is truncated: it ends inside 'warm/engram.db'")

    with pytest.raises(BadArchive, match="truncated"):
        write_member(chunks(), tmp_path / "m", durable=True)
    assert _pipeline_threads() == []
    with pytest.raises(FileNotFoundError):
        write_member([b"x"], tmp_path / "no-such-dir" / "m")
