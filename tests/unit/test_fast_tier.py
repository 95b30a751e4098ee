"""The fast tier: byte budget, eviction of the least activated, write-back of dirty entries,
and, through the engine, activations reaching the warm tier at checkpoints."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec
import pytest

from engram.graph import Engine, EngineConfig
from engram.model import Memory
from engram.tiers.fast import FastTier, memory_size


def mem(mid: str, count: int = 0, content: str = "x") -> Memory:
    return Memory(mid, content, 0.5, {}, 1, 1, count, count)


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.written: list[Memory] = []
        self.fail = fail

    def __call__(self, ms: Iterable[Memory]) -> None:
        ms = list(ms)
        if self.fail:
            raise OSError("disk full")
        self.written.extend(ms)


def test_get_put_and_accounting() -> None:
    f = FastTier(1 << 20, Sink())
    assert f.get("a") is None and f.misses == 1
    f.put(mem("a"))
    f.put(mem("b", content="y" * 100))
    assert f.get("a") == mem("a") and f.hits == 1
    assert len(f) == 2
    assert f.bytes == memory_size(mem("a")) + memory_size(mem("b", content="y" * 100))
    f.put(mem("b"))  # replacing re-counts the size
    assert f.bytes == 2 * memory_size(mem("a"))
    f.discard("a")
    f.discard("zz")
    assert len(f) == 1 and f.bytes == memory_size(mem("b"))
    f.clear()
    assert len(f) == 0 and f.bytes == 0


def test_dirty_tracking_and_take_dirty() -> None:
    f = FastTier(1 << 20, Sink())
    f.put(mem("a", 1), dirty=True)
    f.put(mem("b", 1), dirty=True)
    f.put(mem("c"))
    assert f.dirty_count == 2
    f.put(mem("b", 2))  # the warm tier got this version directly: clean again
    assert f.dirty_count == 1
    assert f.take_dirty() == [mem("a", 1)]
    assert f.dirty_count == 0 and len(f) == 3
    f.put(mem("c", 1), dirty=True)
    f.discard("c")  # deleted memories are not written back
    assert f.take_dirty() == []


def test_zero_budget_writes_dirty_entries_straight_back() -> None:
    sink = Sink()
    f = FastTier(0, sink)
    f.put(mem("a"))
    f.put(mem("b", 3), dirty=True)
    assert len(f) == 0 and f.bytes == 0
    assert sink.written == [mem("b", 3)]


def test_eviction_keeps_the_most_activated_and_writes_back_dirty_victims() -> None:
    sink = Sink()
    size = memory_size(mem("m0"))
    f = FastTier(size * 10, sink)
    for i in range(10):
        f.put(mem(f"m{i}", count=i), dirty=i % 2 == 0)
    assert len(f) == 10 and not sink.written
    f.put(mem("hot", count=100))
    assert f.bytes <= f.budget * 0.9
    kept = set(f.hot_ids(100))
    assert "hot" in kept and "m9" in kept and "m0" not in kept
    evicted = {f"m{i}" for i in range(10)} - kept
    # Exactly the evicted dirty entries were written back, and nothing clean.
    assert {m.id for m in sink.written} == {i for i in evicted if int(i[1:]) % 2 == 0}
    remaining_dirty = {m.id for m in f.take_dirty()}
    assert remaining_dirty == {i for i in kept if i != "hot" and int(i[1:]) % 2 == 0}


def test_failed_write_back_keeps_entries_cached_and_dirty() -> None:
    sink = Sink(fail=True)
    size = memory_size(mem("m0"))
    f = FastTier(size * 3, sink)
    for i in range(3):
        f.put(mem(f"m{i}", count=i), dirty=True)
    with pytest.raises(OSError):
        f.put(mem("m3", count=5), dirty=True)
    # Nothing dirty was dropped: a later checkpoint still finds every activation.
    assert f.dirty_count == 4 and len(f) == 4
    sink.fail = False
    f.put(mem("m4", count=6))
    assert {m.id for m in sink.written} | {m.id for m in f.take_dirty()} >= {
        "m0", "m1", "m2", "m3"
    }


def test_one_entry_larger_than_the_budget() -> None:
    sink = Sink()
    f = FastTier(10, sink)
    f.put(mem("big", content="z" * 1000), dirty=True)
    assert len(f) == 0 and f.bytes == 0 and [m.id for m in sink.written] == ["big"]


def test_hot_ids_by_activation_count() -> None:
    f = FastTier(1 << 20, Sink())
    for i, c in enumerate([3, 9, 1, 7]):
        f.put(mem(f"m{i}", c))
    assert f.hot_ids(2) == ["m1", "m3"]
    assert f.hot_ids(10) == ["m1", "m3", "m0", "m2"]


# -- through the engine ------------------------------------------------------------------------


def committed(root: Path, mid: str) -> tuple[int, int] | None:
    """(activation_count, applied_lsn) as another connection sees the warm tier."""
    conn = sqlite3.connect(f"file:{root / 'warm' / 'engram.db'}?mode=ro", uri=True)
    try:
        r = conn.execute("SELECT activation_count FROM memories WHERE id=?", (mid,)).fetchone()
        lsn = conn.execute("SELECT value FROM meta WHERE key='applied_lsn'").fetchone()
        return None if r is None else (r[0], int(lsn[0]))
    finally:
        conn.close()


def test_activations_reach_the_warm_tier_at_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "d"
    eng = Engine.open(root, EngineConfig(checkpoint_interval=3600))
    eng.apply([{"op": "create_memory", "id": "a", "content": "x"}])
    eng.checkpoint()
    for _ in range(3):
        eng.apply([{"op": "activate", "id": "a"}])
    assert eng.memory("a").activation_count == 3
    assert eng.fast.dirty_count == 1
    assert eng.warm.get_memory("a").activation_count == 0  # write-back: not yet in SQLite
    assert committed(root, "a") == (0, 1)
    assert eng.checkpoint() == 4
    assert eng.fast.dirty_count == 0
    assert committed(root, "a") == (3, 4)
    eng.apply([{"op": "activate", "id": "a"}])
    eng.close()  # the final checkpoint flushes it too
    assert committed(root, "a") == (4, 5)


def test_periodic_checkpoint_flushes_activations(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with Engine.open(root, EngineConfig(checkpoint_interval=0.01)) as eng:
        eng.apply([{"op": "create_memory", "id": "a", "content": "x"}])
        eng.apply([{"op": "activate", "id": "a"}])
        deadline = time.monotonic() + 20
        while committed(root, "a") != (1, 2):
            assert time.monotonic() < deadline, "no periodic checkpoint"
            time.sleep(0.01)


def test_eviction_writes_dirty_entries_back(tmp_path: Path) -> None:
    root = tmp_path / "d"
    size = memory_size(mem("m00"))
    eng = Engine.open(root, EngineConfig(fast_tier_bytes=size * 3, checkpoint_interval=3600))
    ids = [f"m{i:02d}" for i in range(12)]
    eng.apply([{"op": "create_memory", "id": i, "content": "x"} for i in ids])
    for n, i in enumerate(ids):
        for _ in range(n % 3 + 1):
            eng.apply([{"op": "activate", "id": i}])
    cached = set(eng.fast.hot_ids(100))
    assert 0 < len(cached) < len(ids)
    for n, i in enumerate(ids):
        assert eng.memory(i).activation_count == n % 3 + 1
        if i not in cached:  # evicted: its activations went to the warm tier on the way out
            assert eng.warm.get_memory(i).activation_count == n % 3 + 1
    assert eng.digest.hex == eng.recompute_digest().hex
    eng.close()
    with Engine.open(root) as eng:
        assert [eng.memory(i).activation_count for i in ids] == [n % 3 + 1 for n in range(12)]


@pytest.mark.parametrize("budget", [0, 1, 700])
def test_tiny_budget_gives_the_same_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    clock = [1_700_000_000_000_000_000]

    def now() -> int:
        clock[0] += 1_000_000
        return clock[0]

    ops: list[list[dict]] = [[{"op": "create_memory", "id": f"m{i}", "content": f"c{i}"}]
                             for i in range(8)]
    for r in range(40):
        i = (r * 5) % 8
        ops.append([{"op": "activate", "id": f"m{i}", "boost": 0.05}])
        if r % 9 == 4:
            ops.append([{"op": "update_memory", "id": f"m{i}", "content": f"u{r}"}])
        if r % 13 == 6:
            ops.append([{"op": "create_edge", "src": f"m{i}", "dst": f"m{(i + 1) % 8}"}])
    ops.append([{"op": "delete_memory", "id": "m3"}])

    def run(root: Path, fast_bytes: int) -> tuple[list[Memory], str]:
        clock[0] = 1_700_000_000_000_000_000
        cfg = EngineConfig(fast_tier_bytes=fast_bytes, half_life_s=5.0, checkpoint_interval=3600,
                           checkpoint_ops=17)
        with Engine.open(root, cfg) as eng:
            for batch in ops:
                eng.apply(batch)
                got = [eng.memory(f"m{j}") for j in range(8) if eng.get_memory(f"m{j}")]
            assert eng.digest.hex == eng.recompute_digest().hex
            return got, eng.digest.hex

    monkeypatch.setattr(time, "time_ns", now)
    small = run(tmp_path / "small", budget)
    big = run(tmp_path / "big", 1 << 20)
    assert [msgspec.structs.asdict(m) for m in small[0]] == [
        msgspec.structs.asdict(m) for m in big[0]
    ]
    assert small[1] == big[1]


def test_failed_write_back_at_checkpoint_loses_nothing(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "d"
    eng = Engine.open(root, EngineConfig(checkpoint_interval=3600))
    eng.apply([{"op": "create_memory", "id": "a", "content": "x"}])
    eng.checkpoint()
    eng.apply([{"op": "activate", "id": "a"}])
    real = eng.warm.put_memories
    calls = [0]

    def failing(ms: Iterable[Memory]) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise sqlite3.OperationalError("disk I/O error")
        real(ms)

    eng.warm.put_memories = failing  # type: ignore[method-assign]
    with pytest.raises(Exception):  # noqa: B017 - any error, as long as nothing is lost
        eng.checkpoint()
    eng.warm.put_memories = real  # type: ignore[method-assign]
    eng.close()
    with Engine.open(root) as e2:
        assert e2.memory("a").activation_count == 1
        assert e2.digest.hex == e2.recompute_digest().hex
