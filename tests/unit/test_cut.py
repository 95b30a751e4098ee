"""The backup cut and the write pause as objects of their own (engram.cut)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from engram.cut import Quiesce
from engram.errors import Refused, Unavailable
from engram.graph import Engine, EngineConfig


def test_cuts_hold_wal_checkpoints_until_the_last_is_released(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600)) as e:
        e.apply([{"op": "create_memory", "id": "a", "content": "x"}])
        e.checkpoint()
        wal = e.warm.conn.execute
        one = e.cut()
        two = e.cut()
        assert e.cuts.held == 2 and wal("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert (one.snapshot_lsn, one.warm_lsn, one.memories) == (1, 1, 1)
        assert one.hot_ids == ["a"] and e.wal_still_valid(one)
        e.release_cut(one)
        assert e.cuts.held == 1 and wal("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        e.release_cut(two)
        assert e.cuts.held == 0 and wal("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000


def test_close_waits_for_the_cut(tmp_path: Path) -> None:
    e = Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600))
    cut = e.cut()
    closed = threading.Event()
    t = threading.Thread(target=lambda: (e.close(), closed.set()))
    t.start()
    assert not closed.wait(0.3)  # the backup still streams the warm files
    e.release_cut(cut)
    t.join(10)
    assert closed.is_set()


def test_a_failed_or_readonly_engine_takes_no_cut(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "d") as e:
        e.apply([{"op": "create_memory", "id": "a", "content": "x"}])
    with Engine.open(tmp_path / "d", readonly=True) as ro, pytest.raises(Unavailable):
        ro.cut()
    with Engine.open(tmp_path / "d") as e:
        e.failed = "disk gone"
        with pytest.raises(Unavailable, match="disk gone"):
            e.cut()
        assert e.cuts.held == 0
        e.failed = None


def test_quiesce_pauses_lifts_and_lapses() -> None:
    lock = threading.RLock()
    q = Quiesce(lock)
    assert q.state() == {"quiesced": False, "until": None} and q.block is None
    with lock:
        q.pause(60)
    assert q.block is not None and "engram resume" in q.block and q.retry_after == 5.0
    assert q.state()["quiesced"] and q.state()["until"]
    with lock:
        assert q.lift() is True and q.lift() is False
    assert q.block is None
    with lock:
        q.pause(0.05)  # lapses by itself
    deadline = time.monotonic() + 5
    while q.block is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q.block is None and q.state()["quiesced"] is False
    q.close()


def test_quiesced_engine_refuses_writes_until_resumed(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600)) as e:
        e.apply([{"op": "create_memory", "id": "a", "content": "x"}])
        st = e.quiesce(30)
        assert st["quiesced"] and st["checkpoint_lsn"] == st["lsn"] == 1
        with pytest.raises(Unavailable) as info:
            e.apply([{"op": "create_memory", "id": "b", "content": "x"}])
        assert info.value.retry_after == 5.0
        with pytest.raises(Refused, match="already paused"):  # one pause at a time
            e.quiesce(30)
        e.resume()
        e.apply([{"op": "create_memory", "id": "b", "content": "x"}])
