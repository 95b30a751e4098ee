"""The log writer: group commit, durability modes, failing writes and fsyncs, rotation (O1)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from engram import digest as dg
from engram.errors import Unavailable
from engram.format import record as fmt
from engram.graph import Engine, EngineConfig
from engram.model import OpType
from engram.oplog import writer as writer_mod
from engram.oplog.reader import LogFile, list_segments
from engram.oplog.writer import LogWriter
from faults import trace_fsyncs

DB = "00000000-0000-4000-8000-0000000000aa"


def rec(lsn: int, size: int = 0) -> bytes:
    return fmt.encode_record(lsn, 1000 + lsn, lsn, True, OpType.MARKER, f"m{lsn}", None,
                             b"x" * size)


def make_writer(d: Path, **kw: object) -> LogWriter:
    w = LogWriter(d, DB, **kw)  # type: ignore[arg-type]
    w.start_segment(1, dg.EMPTY)
    w.start()
    return w


def read_lsns(d: Path) -> list[int]:
    out = []
    segs = list_segments(d)
    for i, (_, p) in enumerate(segs):
        out += [r.lsn for r in LogFile.open(p).records(allow_torn_tail=i == len(segs) - 1)]
    return out


def wait_until(cond, what: str, limit: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.002)


# -- group commit ------------------------------------------------------------------------------


def test_group_commit_shares_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # a disk with some latency, so writers pile up behind it
        time.sleep(0.002)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    w = make_writer(tmp_path)
    base = w.fsyncs
    engine_lock = threading.Lock()
    state = {"lsn": 0}
    threads, per_thread = 16, 25

    def client() -> None:
        for _ in range(per_thread):
            with engine_lock:  # the engine appends under its lock, in LSN order
                state["lsn"] += 1
                lsn = state["lsn"]
                w.append(rec(lsn), lsn)
            w.wait_durable(lsn)
            assert w.durable_lsn >= lsn

    ts = [threading.Thread(target=client) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    writes = threads * per_thread
    fsyncs = w.fsyncs - base
    w.close()
    assert 1 <= fsyncs < writes / 2, (fsyncs, writes)
    assert read_lsns(tmp_path) == list(range(1, writes + 1))


def test_on_durable_callbacks_fire_in_order(tmp_path: Path) -> None:
    w = make_writer(tmp_path)
    got: list[tuple[int, BaseException | None]] = []
    done = threading.Event()
    for lsn in range(1, 6):
        w.append(rec(lsn), lsn)
        w.on_durable(lsn, lambda e, lsn=lsn: (got.append((lsn, e)), lsn == 5 and done.set()))
    assert done.wait(20)
    assert got == [(n, None) for n in range(1, 6)]
    # Already durable: called at once, in the caller's thread.
    mine: list[BaseException | None] = []
    w.on_durable(3, mine.append)
    assert mine == [None]
    w.close()


# -- durability modes --------------------------------------------------------------------------


def test_sync_mode_acknowledges_only_after_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    gate = threading.Event()
    real_fsync = os.fsync

    def held_fsync(fd: int) -> None:
        gate.wait(20)
        real_fsync(fd)

    w = make_writer(tmp_path)
    monkeypatch.setattr(os, "fsync", held_fsync)
    w.append(rec(1), 1)
    with pytest.raises(Unavailable):
        w.wait_durable(1, timeout=0.05)  # the fsync is held back: no acknowledgement yet
    assert w.durable_lsn == 0
    gate.set()
    w.wait_durable(1, timeout=20)
    assert w.durable_lsn == 1
    w.close()


def test_batch_mode_acknowledges_at_write_and_syncs_soon(tmp_path: Path) -> None:
    w = make_writer(tmp_path, durability="batch", batch_interval=0.001)
    base = w.fsyncs
    for lsn in range(1, 21):
        w.append(rec(lsn), lsn)
        w.wait_durable(lsn)  # returns at once
    wait_until(lambda: w.durable_lsn == 20, "the batch flusher")
    assert w.fsyncs > base
    w.close()
    assert read_lsns(tmp_path) == list(range(1, 21))


def test_none_mode_never_fsyncs_until_asked(tmp_path: Path) -> None:
    w = make_writer(tmp_path, durability="none")
    base = w.fsyncs
    assert w._thread is None
    for lsn in range(1, 11):
        w.append(rec(lsn), lsn)
        w.wait_durable(lsn)
    called: list[BaseException | None] = []
    w.on_durable(10, called.append)
    assert called == [None]
    assert w.fsyncs == base and w.durable_lsn == 0
    w.sync()
    assert w.fsyncs == base + 1 and w.durable_lsn == 10
    w.close()
    assert read_lsns(tmp_path) == list(range(1, 11))


def test_unknown_durability_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LogWriter(tmp_path, DB, durability="sometimes")


@pytest.mark.parametrize("mode", ["sync", "batch", "none"])
def test_engine_durability_modes_round_trip(tmp_path: Path, mode: str) -> None:
    cfg = EngineConfig(durability=mode, batch_interval=0.001)
    with Engine.open(tmp_path / "d", cfg) as eng:
        for i in range(20):
            eng.apply([{"op": "create_memory", "id": f"m{i}", "content": "c"}])
        digest = eng.digest.hex
    with Engine.open(tmp_path / "d", cfg) as eng:
        assert eng.last_lsn == 20 and eng.digest.hex == digest


# -- failing writes ----------------------------------------------------------------------------


class FailingWrite:
    """os.write for one fd that fails with ``err`` once ``budget`` more bytes were written
    (the part that fits is written first, as a real short write would)."""

    def __init__(self, fd_of, budget: int, err: int = errno.ENOSPC) -> None:  # type: ignore[no-untyped-def]
        self.fd_of = fd_of
        self.budget = budget
        self.err = err
        self.real = os.write
        self.failures = 0

    def __call__(self, fd: int, data) -> int:  # type: ignore[no-untyped-def]
        if fd != self.fd_of():
            return self.real(fd, data)
        if self.budget <= 0:
            self.failures += 1
            raise OSError(self.err, os.strerror(self.err))
        n = self.real(fd, bytes(data)[: self.budget])
        self.budget -= n
        return n


@pytest.mark.parametrize("budget", [0, 1, 7, 8, 40, 150])
def test_failed_write_is_cut_back_and_writer_stays_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    w = make_writer(tmp_path)
    for lsn in (1, 2):
        w.append(rec(lsn), lsn)
    w.wait_durable(2)
    size = os.path.getsize(w.current_path)  # type: ignore[arg-type]
    fault = FailingWrite(lambda: w._fd, budget)
    monkeypatch.setattr(os, "write", fault)
    with pytest.raises(Unavailable) as ei:
        w.append(rec(3, 100) + rec(4, 100), 4)
    assert "No space left on device" in str(ei.value) and "\n" not in str(ei.value)
    assert fault.failures == 1
    assert os.path.getsize(w.current_path) == size  # type: ignore[arg-type]
    assert w.written_lsn == 2 and w.failed is None
    monkeypatch.setattr(os, "write", fault.real)
    w.append(rec(3) + rec(4), 4)
    w.wait_durable(4)
    w.close()
    lf = LogFile.open(list_segments(tmp_path)[-1][1])
    assert [r.lsn for r in lf.records()] == [1, 2, 3, 4]
    assert lf.torn is None


def test_engine_write_failure_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    eng = Engine.open(tmp_path / "d", EngineConfig())
    eng.apply([{"op": "create_memory", "id": "a", "content": "one"}])
    lsn, digest = eng.last_lsn, eng.digest.hex
    assert eng.writer is not None
    fault = FailingWrite(lambda: eng.writer._fd, 10)  # type: ignore[union-attr]
    monkeypatch.setattr(os, "write", fault)
    with pytest.raises(Unavailable):
        eng.apply([{"op": "create_memory", "id": "b", "content": "two"},
                   {"op": "create_edge", "src": "a", "dst": "b"}])
    assert eng.last_lsn == lsn and eng.digest.hex == digest
    assert eng.get_memory("b") is None
    monkeypatch.setattr(os, "write", fault.real)
    eng.apply([{"op": "create_memory", "id": "c", "content": "three"}])
    assert eng.last_lsn == lsn + 1
    assert eng.digest.hex == eng.recompute_digest().hex
    eng.close()
    with Engine.open(tmp_path / "d", EngineConfig()) as eng:
        assert sorted(m.id for m in eng.iter_memories()) == ["a", "c"]
        assert eng.last_lsn == lsn + 1


# -- failing fsync -----------------------------------------------------------------------------


def test_failed_fsync_stops_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_writer(tmp_path)
    w.append(rec(1), 1)
    w.wait_durable(1)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    errors: list[BaseException | None] = []
    w.append(rec(2), 2)
    w.on_durable(2, errors.append)
    with pytest.raises(Unavailable) as ei:
        w.wait_durable(2, timeout=20)
    assert "restart" in str(ei.value)
    assert len(errors) == 1 and isinstance(errors[0], Unavailable)
    with pytest.raises(Unavailable):
        w.append(rec(3), 3)
    with pytest.raises(Unavailable):
        w.start_segment(3, dg.EMPTY)
    late: list[BaseException | None] = []
    w.on_durable(2, late.append)
    assert isinstance(late[0], Unavailable)
    assert w.durable_lsn == 1
    w.close()


def test_engine_refuses_writes_after_fsync_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    eng = Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600))
    eng.apply([{"op": "create_memory", "id": "a", "content": "one"}])
    real = os.fsync

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(Unavailable):
        eng.apply([{"op": "create_memory", "id": "b", "content": "two"}])
    with pytest.raises(Unavailable):
        eng.apply([{"op": "create_memory", "id": "c", "content": "three"}])
    monkeypatch.setattr(os, "fsync", real)
    eng.close()
    # The log is re-read on the next open; only "c" was never written.
    with Engine.open(tmp_path / "d", EngineConfig()) as eng:
        assert eng.get_memory("c") is None
        assert eng.digest.hex == eng.recompute_digest().hex


# -- rotation ----------------------------------------------------------------------------------


def test_rotation_by_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = trace_fsyncs(monkeypatch)
    d = tmp_path / "d"
    digest_at = {0: dg.EMPTY}
    with Engine.open(d, EngineConfig(segment_bytes=1500)) as eng:
        for i in range(60):
            ops = [{"op": "create_memory", "id": f"m{i}", "content": "z" * (i % 50)}]
            if i % 7 == 3:
                ops.append({"op": "create_edge", "src": f"m{i}", "dst": f"m{i - 1}"})
            eng.apply(ops)
            digest_at[eng.last_lsn] = eng.digest.hex
        last = eng.last_lsn
    segs = list_segments(d / "oplog")
    assert len(segs) > 3
    names = [p.name for _, p in segs]
    assert names == sorted(names) and all(len(n) == 20 for n in names)
    assert not [p for p in (d / "oplog").iterdir() if p.name.startswith(".")]
    expect = 1
    for i, (first, path) in enumerate(segs):
        lf = LogFile.open(path)
        assert lf.header["database_id"] == eng.database_id
        assert lf.header["format_version"] == fmt.FORMAT_VERSION
        assert lf.header["first_lsn"] == first == expect
        assert lf.header["base_digest"] == digest_at[first - 1]
        got = [r.lsn for r in lf.records()]
        if i < len(segs) - 1:
            assert got and got[0] == first
            assert os.path.getsize(path) >= 1500
            # A segment is fsynced before the next one is created.
            new_tmp = str(segs[i + 1][1].with_name("." + segs[i + 1][1].name + ".tmp"))
            assert str(path) in events[: events.index(new_tmp)]
        expect = (got[-1] + 1) if got else first
    assert expect == last + 1


def test_failed_rotation_leaves_no_segment_and_keeps_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = make_writer(tmp_path, segment_bytes=10)
    w.append(rec(1), 1)
    w.wait_durable(1)
    real_open = os.open

    def full_open(path, flags, mode=0o777):  # type: ignore[no-untyped-def]
        if str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode)

    monkeypatch.setattr(writer_mod.os, "open", full_open)
    assert w.needs_rotation()
    with pytest.raises(Unavailable):
        w.start_segment(2, dg.EMPTY)
    monkeypatch.setattr(writer_mod.os, "open", real_open)
    assert [p.name for _, p in list_segments(tmp_path)] == [fmt.segment_name(1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [fmt.segment_name(1)]
    w.append(rec(2), 2)  # still appending to the old segment
    w.start_segment(3, dg.EMPTY)
    w.append(rec(3), 3)
    w.wait_durable(3)
    w.close()
    assert read_lsns(tmp_path) == [1, 2, 3]


def test_leftover_temp_segment_is_overwritten(tmp_path: Path) -> None:
    (tmp_path / ("." + fmt.segment_name(1) + ".tmp")).write_bytes(b"junk from a crash")
    w = make_writer(tmp_path)
    w.append(rec(1), 1)
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [fmt.segment_name(1)]
    assert read_lsns(tmp_path) == [1]


def test_open_existing_cuts_a_torn_tail(tmp_path: Path) -> None:
    w = make_writer(tmp_path)
    w.append(rec(1) + rec(2), 2)
    w.close()
    path = list_segments(tmp_path)[0][1]
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(rec(3)[:9])
    w = LogWriter(tmp_path, DB)
    w.open_existing(path, good, 2)
    assert path.stat().st_size == good
    w.start()
    w.append(rec(3), 3)
    w.wait_durable(3)
    w.close()
    assert read_lsns(tmp_path) == [1, 2, 3]


def test_a_raising_callback_does_not_stop_group_commit(tmp_path: Path) -> None:
    w = make_writer(tmp_path)

    def bad(err: BaseException | None) -> None:
        raise RuntimeError("callback bug")

    w.append(rec(1), 1)
    w.on_durable(1, bad)
    w.wait_durable(1, timeout=20)
    for lsn in range(2, 5):  # the flusher is still alive
        w.append(rec(lsn), lsn)
        w.wait_durable(lsn, timeout=20)
    w.close()
