"""The engine's write path: every op, batch atomicity, cascading deletes, conflicts, strength."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engram import query
from engram.errors import Conflict, EngramError, NotFound, Unavailable, ValidationError
from engram.graph import Engine, EngineConfig
from engram.model import OpType
from engram.oplog.reader import LogFile, list_segments

T0 = 1_700_000_000_000_000_000


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A wall clock the test moves by hand (time.time_ns), so decay is exact."""
    now = [T0]
    monkeypatch.setattr(time, "time_ns", lambda: now[0])
    return now


@pytest.fixture
def eng(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600))
    yield e
    e.close()


def records(e: Engine) -> list[Any]:
    assert e.writer is not None
    e.writer.sync()
    out = []
    for _, p in list_segments(e.layout.oplog):
        out += list(LogFile.open(p).records(allow_torn_tail=True))
    return out


def state(e: Engine) -> tuple[list[tuple], list[tuple]]:
    mems = [(m.id, m.content, m.strength, m.metadata, m.activation_count)
            for m in e.iter_memories()]
    edges = [(x.src, x.dst, x.kind, x.weight) for x in e.iter_edges()]
    return mems, edges


def test_every_op_type(eng: Engine) -> None:
    r = eng.apply([{"op": "create_memory", "id": "a", "content": "alpha", "strength": 0.3,
                    "metadata": {"tag": "x"}}])
    assert r.lsn == 1 and r.results == [{"op": "create_memory", "id": "a"}]
    r = eng.apply([{"op": "create_memory", "content": "beta"}])
    b = r.results[0]["id"]
    r = eng.apply([{"op": "update_memory", "id": "a", "content": "alpha2", "metadata": {}}])
    assert r.results == [{"op": "update_memory", "id": "a"}]
    r = eng.apply([{"op": "activate", "id": "a", "boost": 0.2}])
    assert r.results[0]["op"] == "activate" and 0.3 < r.results[0]["strength"] <= 0.5
    r = eng.apply([{"op": "create_edge", "src": "a", "dst": b, "kind": "k", "weight": 0.7}])
    assert r.results == [{"op": "create_edge", "src": "a", "dst": b, "kind": "k"}]
    r = eng.apply([{"op": "mark", "name": "p1"}])
    assert r.results == [{"op": "mark", "name": "p1"}]
    m = eng.memory("a")
    assert (m.content, m.metadata, m.activation_count) == ("alpha2", {}, 1)
    assert [n["memory"]["id"] for n in query.neighbors(eng, "a", "out", 1)] == [b]
    r = eng.apply([{"op": "delete_edge", "src": "a", "dst": b, "kind": "k"}])
    assert r.results == [{"op": "delete_edge", "src": "a", "dst": b, "kind": "k"}]
    assert query.neighbors(eng, "a") == []
    r = eng.apply([{"op": "delete_memory", "id": b}])
    assert r.results == [{"op": "delete_memory", "id": b, "edges_deleted": 0}]
    with pytest.raises(NotFound):
        eng.memory(b)
    assert eng.last_lsn == r.lsn == 8
    ops = [x.op for x in records(eng)]
    assert ops == [OpType.CREATE_MEMORY, OpType.CREATE_MEMORY, OpType.UPDATE_MEMORY,
                   OpType.UPDATE_STRENGTH, OpType.CREATE_EDGE, OpType.MARKER, OpType.DELETE_EDGE,
                   OpType.DELETE_MEMORY]
    assert eng.digest.hex == eng.recompute_digest().hex
    s = eng.stats()
    assert (s["memories"], s["edges"], s["lsn"], s["digest"]) == (1, 0, 8, eng.digest.hex)


def _seed(eng: Engine) -> None:
    eng.apply([{"op": "create_memory", "id": i, "content": f"content {i}"} for i in "abc"]
              + [{"op": "create_edge", "src": "a", "dst": "b"},
                 {"op": "create_edge", "src": "c", "dst": "a", "kind": "k"}])


BAD_AT: list[tuple[dict, type[EngramError]]] = [
    ({"op": "create_memory", "id": "a", "content": "dup"}, Conflict),
    ({"op": "activate", "id": "zz"}, NotFound),
    ({"op": "create_edge", "src": "a", "dst": "zz"}, NotFound),
    ({"op": "update_memory", "id": "b", "strength": 7}, ValidationError),
    ({"op": "delete_edge", "src": "b", "dst": "a"}, NotFound),
    ({"op": "bogus"}, ValidationError),
    ({"op": "create_memory", "id": "new", "content": "x", "metadata": {"n": float("nan")}},
     ValidationError),
]


@pytest.mark.parametrize("index", [0, 2, 4])
@pytest.mark.parametrize(("bad", "err"), BAD_AT, ids=[b[0]["op"] for b in BAD_AT])
def test_batch_is_atomic(eng: Engine, index: int, bad: dict, err: type) -> None:
    _seed(eng)
    lsn, digest, before = eng.last_lsn, eng.digest.hex, state(eng)
    ops: list[dict] = [
        {"op": "create_memory", "id": "n1", "content": "one"},
        {"op": "activate", "id": "a"},
        {"op": "delete_memory", "id": "c"},
        {"op": "create_edge", "src": "n1", "dst": "b"},
        {"op": "update_memory", "id": "b", "content": "changed"},
    ]
    ops.insert(index, bad)
    with pytest.raises(err) as ei:
        eng.apply(ops)
    assert ei.value.details["index"] == index
    assert ei.value.to_dict()["index"] == index
    assert str(ei.value).startswith(f"op {index}: ")
    assert eng.last_lsn == lsn and eng.digest.hex == digest
    assert state(eng) == before
    assert len(records(eng)) == lsn
    assert eng.digest.hex == eng.recompute_digest().hex
    # The same batch without the bad op goes through whole.
    ops.pop(index)
    res = eng.apply(ops)
    assert res.lsn == lsn + 6  # 5 ops, and deleting c takes its one edge first
    assert eng.get_memory("c") is None and eng.memory("b").content == "changed"


def test_single_bad_op_has_no_index(eng: Engine) -> None:
    with pytest.raises(NotFound) as ei:
        eng.apply([{"op": "delete_memory", "id": "ghost"}])
    assert "index" not in ei.value.to_dict()
    assert ei.value.http_status == 404


@pytest.mark.parametrize("ops", [[], {}, "x", None])
def test_ops_must_be_a_non_empty_list(eng: Engine, ops: Any) -> None:
    with pytest.raises(ValidationError) as ei:
        eng.apply(ops)
    assert ei.value.field == "ops"


def test_delete_memory_takes_its_edges_in_the_same_transaction(eng: Engine) -> None:
    _seed(eng)
    eng.apply([{"op": "create_edge", "src": "a", "dst": "a", "kind": "self"}])
    first = eng.last_lsn + 1
    res = eng.apply([{"op": "delete_memory", "id": "a"}])
    assert res.results == [{"op": "delete_memory", "id": "a", "edges_deleted": 3}]
    txn = [r for r in records(eng) if r.lsn >= first]
    assert [r.op for r in txn] == [OpType.DELETE_EDGE] * 3 + [OpType.DELETE_MEMORY]
    assert {r.txid for r in txn} == {first}
    assert [r.txn_end for r in txn] == [False, False, False, True]
    assert list(eng.iter_edges()) == []
    assert eng.stats()["edges"] == 0
    assert eng.digest.hex == eng.recompute_digest().hex


def test_conflicts_and_not_found(eng: Engine) -> None:
    _seed(eng)
    with pytest.raises(Conflict) as ei:
        eng.apply([{"op": "create_memory", "id": "a", "content": "again"}])
    assert ei.value.http_status == 409 and ei.value.details["field"] == "id"
    for op, field in [
        ({"op": "update_memory", "id": "zz", "content": "x"}, "id"),
        ({"op": "activate", "id": "zz"}, "id"),
        ({"op": "delete_memory", "id": "zz"}, "id"),
        ({"op": "create_edge", "src": "zz", "dst": "a"}, "src"),
        ({"op": "create_edge", "src": "a", "dst": "zz"}, "dst"),
        ({"op": "delete_edge", "src": "a", "dst": "b", "kind": "nope"}, "src"),
    ]:
        with pytest.raises(NotFound) as ei2:
            eng.apply([op])
        assert ei2.value.details["field"] == field, op
    with pytest.raises(NotFound):
        eng.memory("zz")
    with pytest.raises(ValidationError):
        eng.memory("bad id")
    assert eng.last_lsn == 5


def test_create_edge_again_is_an_upsert(eng: Engine) -> None:
    _seed(eng)
    before = next(e for e in eng.iter_edges() if e.key() == ("a", "b", "related"))
    eng.apply([{"op": "create_edge", "src": "a", "dst": "b", "weight": 3}])
    after = next(e for e in eng.iter_edges() if e.key() == ("a", "b", "related"))
    assert after.weight == 3.0 and after.created_at == before.created_at
    assert eng.stats()["edges"] == 2
    assert eng.digest.hex == eng.recompute_digest().hex


def test_activation_decays_then_raises_capped_at_one(tmp_path: Path, clock: list[int]) -> None:
    hl = 10.0
    with Engine.open(tmp_path / "d", EngineConfig(half_life_s=hl, checkpoint_interval=3600)) as e:
        e.apply([{"op": "create_memory", "id": "a", "content": "x", "strength": 0.8}])
        clock[0] += int(hl * 1e9)  # one half-life later
        assert query.memory(e, "a")["effective_strength"] == pytest.approx(0.4)
        r = e.apply([{"op": "activate", "id": "a", "boost": 0.1}])
        assert r.results[0]["strength"] == pytest.approx(0.5)
        m = e.memory("a")
        assert m.strength == pytest.approx(0.5) and m.activation_count == 1
        assert m.updated_at == m.last_activated_at == clock[0]
        clock[0] += int(2 * hl * 1e9)  # two half-lives: 0.125, then +0.1
        r = e.apply([{"op": "activate", "id": "a"}])
        assert r.results[0]["strength"] == pytest.approx(0.225)
        for _ in range(20):
            r = e.apply([{"op": "activate", "id": "a", "boost": 0.3}])
            assert r.results[0]["strength"] <= 1.0
        assert r.results[0]["strength"] == 1.0 and e.memory("a").strength == 1.0
        assert e.memory("a").activation_count == 22
        # An update without a strength carries the decayed value forward.
        clock[0] += int(hl * 1e9)
        e.apply([{"op": "update_memory", "id": "a", "content": "y"}])
        assert e.memory("a").strength == pytest.approx(0.5)
        digest = e.digest.hex
        assert digest == e.recompute_digest().hex
    # Replay is deterministic: after-images, not recomputation.
    with Engine.open(tmp_path / "d", EngineConfig(half_life_s=hl)) as e:
        assert e.digest.hex == digest == e.recompute_digest().hex
        assert e.memory("a").strength == pytest.approx(0.5)


def test_timestamps_never_decrease_when_the_clock_steps_back(
    tmp_path: Path, clock: list[int]
) -> None:
    with Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600)) as e:
        e.apply([{"op": "create_memory", "id": "a", "content": "x"}])
        clock[0] -= 10**12
        e.apply([{"op": "create_memory", "id": "b", "content": "x"}])
        ts = [r.ts_ns for r in records(e)]
        assert ts == sorted(ts)
    with Engine.open(tmp_path / "d") as e:  # and the reader accepts the log
        assert e.last_lsn == 2


def test_readonly_engine_refuses_writes(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "d") as e:
        e.apply([{"op": "create_memory", "id": "a", "content": "x"}])
    ro = Engine.open(tmp_path / "d", readonly=True)
    try:
        assert ro.memory("a").content == "x"
        with pytest.raises(Unavailable):
            ro.apply([{"op": "create_memory", "id": "b", "content": "x"}])
    finally:
        ro.close()


def test_submit_then_wait_and_on_durable(eng: Engine) -> None:
    res = eng.submit([{"op": "create_memory", "id": "a", "content": "x"}])
    got: list[BaseException | None] = []
    eng.wait(res.lsn)
    eng.on_durable(res.lsn, got.append)
    assert got == [None]
    assert eng.writer is not None and eng.writer.durable_lsn >= res.lsn


def test_concurrent_writers_readers_and_checkpoints(tmp_path: Path) -> None:
    import random
    import threading

    cfg = EngineConfig(checkpoint_interval=0.005, fast_tier_bytes=1500, segment_bytes=8192,
                       checkpoint_ops=40)
    root = tmp_path / "d"
    eng = Engine.open(root, cfg)
    ids = [f"m{i}" for i in range(12)]
    eng.apply([{"op": "create_memory", "id": i, "content": f"word{i} common"} for i in ids])
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                a, b = rng.choice(ids), rng.choice(ids)
                op = rng.choice([
                    {"op": "activate", "id": a},
                    {"op": "update_memory", "id": a, "content": f"word{a} v{rng.random()}"},
                    {"op": "create_edge", "src": a, "dst": b, "weight": rng.random()},
                    {"op": "delete_edge", "src": a, "dst": b},
                    {"op": "delete_memory", "id": a},
                    {"op": "create_memory", "id": a, "content": f"word{a} again"},
                ])
                try:
                    eng.apply([op])
                except (NotFound, Conflict):
                    pass
        except BaseException as e:  # surfaced below
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                for i in ids:
                    m = eng.get_memory(i)
                    if m is not None:
                        try:
                            query.neighbors(eng, i, "both", 2)
                        except NotFound:
                            pass
                query.recall(eng, "common", 5)
                eng.stats()
        except BaseException as e:
            errors.append(e)

    ws = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    rs = [threading.Thread(target=reader) for _ in range(2)]
    for t in ws + rs:
        t.start()
    for t in ws:
        t.join()
    stop.set()
    for t in rs:
        t.join()
    assert not errors, errors
    assert eng.digest.hex == eng.recompute_digest().hex
    final = state(eng), eng.digest.hex, eng.last_lsn
    eng.close()
    with Engine.open(root, cfg) as e2:
        assert (state(e2), e2.digest.hex, e2.last_lsn) == final
        assert e2.digest.hex == e2.recompute_digest().hex
