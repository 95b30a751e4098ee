"""The seams of the slimmer engine: queries over a GraphView (any view, not only the engine),
the engine's status snapshot, and the warm tier's paged scans."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest

from engram import query
from engram.errors import NotFound, ValidationError
from engram.graph import Engine, EngineConfig
from engram.model import Edge, Memory, check_id
from engram.tiers.warm import WarmTier

T = 1_700_000_000_000_000_000


def mem(mid: str, content: str, strength: float = 0.5) -> Memory:
    return Memory(mid, content, strength, {}, T, T, 0, 0)


class DictView:
    """A GraphView over two dicts: what the queries need, and nothing of the engine."""

    half_life_s = 0.0

    def __init__(self, memories: list[Memory], edges: list[Edge]) -> None:
        self.memories = {m.id: m for m in memories}
        self.edges = edges
        self.readings = 0

    def reading(self) -> AbstractContextManager[Any]:
        self.readings += 1
        return nullcontext()

    def get_memory(self, mid: str) -> Memory | None:
        return self.memories.get(mid)

    def get_edge(self, src: str, dst: str, kind: str) -> Edge | None:
        return next((e for e in self.edges if e.key() == (src, dst, kind)), None)

    def edges_of(self, mid: str) -> list[Edge]:
        return [e for e in self.edges if mid in (e.src, e.dst)]

    def get_mark(self, name: str) -> tuple[int, int] | None:
        return None

    def memory(self, mid: Any) -> Memory:
        m = self.memories.get(check_id(mid))
        if m is None:
            raise NotFound(f"memory {mid} not found", field="id")
        return m

    def edges_out(self, mid: str) -> list[Edge]:
        return [e for e in self.edges if e.src == mid]

    def edges_in(self, mid: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == mid]

    def edges_out_of(self, ids: list[str]) -> list[Edge]:
        return sorted((e for e in self.edges if e.src in ids), key=Edge.key)

    def peek_memories(self, ids: list[str]) -> dict[str, Memory]:
        return {i: self.memories[i] for i in ids if i in self.memories}

    def search(self, fts_query: str, limit: int) -> list[tuple[str, float]]:
        words = {w.strip('"') for w in fts_query.split(" OR ")}
        hits = [(m.id, 1.0) for m in self.memories.values() if words & set(m.content.split())]
        return sorted(hits, key=lambda h: (-h[1], h[0]))[:limit]

    def pin_snapshot(self) -> tuple[int, str, Any]:
        view = self

        class Snap:
            closed = False

            def iter_memories(self) -> Iterator[Memory]:
                return iter(sorted(view.memories.values(), key=lambda m: m.id))

            def iter_edges(self) -> Iterator[Edge]:
                return iter(sorted(view.edges, key=Edge.key))

            def close(self) -> None:
                Snap.closed = True

        self.snap = Snap
        return 7, "d" * 64, Snap()


@pytest.fixture
def view() -> DictView:
    ms = [mem("a", "apple pie", 1.0), mem("b", "banana"), mem("c", "cherry"), mem("d", "date")]
    es = [Edge("a", "b", "k", 1.0, T), Edge("b", "c", "k", 1.0, T), Edge("d", "a", "k", -1.0, T)]
    return DictView(ms, es)


def test_queries_run_over_any_view(view: DictView) -> None:
    assert query.memory(view, "a")["content"] == "apple pie"
    with pytest.raises(NotFound):
        query.memory(view, "zz")
    got = query.neighbors(view, "a", "out", 2)
    assert [(n["depth"], n["memory"]["id"]) for n in got] == [(1, "b"), (2, "c")]
    assert [n["memory"]["id"] for n in query.neighbors(view, "a", "in", 1)] == ["d"]
    assert {n["memory"]["id"] for n in query.neighbors(view, "a")} == {"b", "d"}
    # "apple" matches a (score 1 x 1.5); a passes half of that x weight 1 to b.
    res = query.recall(view, "apple", 10)
    assert [(r["id"], r["score"], r["matched"]) for r in res] == [
        ("a", 1.5, True),
        ("b", 0.75, False),
    ]
    assert view.readings == 4  # each query read one state


def test_query_arguments_are_checked(view: DictView) -> None:
    for kw, field in (({"direction": "up"}, "direction"), ({"depth": 4}, "depth")):
        with pytest.raises(ValidationError) as e:
            query.neighbors(view, "a", **kw)
        assert e.value.field == field
    for q, limit, field in (("", 5, "query"), ("?!", 5, "query"), ("x", 0, "limit")):
        with pytest.raises(ValidationError) as e:
            query.recall(view, q, limit)
        assert e.value.field == field


def test_export_reads_the_pinned_snapshot_and_releases_it(view: DictView) -> None:
    stream = query.export(view)
    assert (stream.lsn, stream.digest) == (7, "d" * 64)
    first = next(stream)
    assert first["op"] == "create_memory" and first["id"] == "a"
    stream.close()
    assert view.snap.closed
    ops = list(query.export(view))
    assert [o["op"] for o in ops] == ["create_memory"] * 4 + ["create_edge"] * 3


def test_engine_is_a_graph_view(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600)) as e:
        e.apply([{"op": "create_memory", "id": "a", "content": "apple pie", "strength": 1.0},
                 {"op": "create_memory", "id": "b", "content": "banana"},
                 {"op": "create_edge", "src": "a", "dst": "b", "weight": 1.0}])
        assert [r["id"] for r in query.recall(e, "apple", 10)] == ["a", "b"]
        assert [n["memory"]["id"] for n in query.neighbors(e, "b", "in")] == ["a"]
        assert query.memory(e, "b")["content"] == "banana"
        snap = query.export(e)
        assert snap.lsn == e.last_lsn and len(list(snap)) == 3


def test_status_is_one_snapshot(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600)) as e:
        e.apply([{"op": "create_memory", "id": f"m{i}", "content": "x"} for i in range(3)])
        st = e.status()
        assert (st["memories"], st["edges"], st["lsn"]) == (3, 0, 3)
        assert st["digest"] == e.digest.hex and st["tiers"]["warm"]["applied_lsn"] == 0
        assert st["tiers"]["cold"] == {"stubs": 0}
        assert (st["ready"], st["failed"], st["durability"]) == (True, None, "sync")
        assert st["data_dir"] == str(tmp_path / "d")
        assert st["quiesce"] == {"quiesced": False, "until": None, "checkpoint_lsn": 0, "lsn": 3}
        assert {k: st[k] for k in e.stats()} == e.stats()
        assert e.health() == ("ready", None)
        e.quiesce(60)
        st = e.status()
        assert st["quiesce"]["quiesced"] and st["quiesce"]["checkpoint_lsn"] == 3
        state, reason = e.health()
        assert state == "blocked" and reason is not None and "engram quiesce" in reason
        assert e.resume()["was_quiesced"] is True
        assert e.health() == ("ready", None)


def test_status_never_shows_half_a_write(tmp_path: Path) -> None:
    """Counts, LSN and digest of one status belong together while writers run."""
    with Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600)) as e:
        seen: dict[int, tuple[int, str]] = {}
        stop = threading.Event()

        def write() -> None:
            for i in range(200):
                e.apply([{"op": "create_memory", "id": f"m{i}", "content": "x"}])
            stop.set()

        t = threading.Thread(target=write)
        t.start()
        while not stop.is_set():
            st = e.status()
            seen[st["lsn"]] = (st["memories"], st["digest"])
        t.join()
        for lsn, (n, _) in seen.items():
            assert n == lsn  # one memory per LSN, never one without the other
        final = e.status()
        assert final["digest"] == e.recompute_digest().hex


def test_warm_paged_scans(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600)) as e:
        ids = [f"m{i:03d}" for i in range(25)]
        e.apply([{"op": "create_memory", "id": i, "content": f"word{i}"} for i in ids])
        pairs = list(zip(ids, ids[1:], strict=False))
        e.apply([{"op": "create_edge", "src": a, "dst": b} for a, b in pairs])
        e.checkpoint()
    w = WarmTier(tmp_path / "d" / "warm" / "engram.db", readonly=True)
    try:
        pages, last = [], ""
        while page := w.memory_ids_after(last, 10):
            pages.append(page)
            last = page[-1]
        assert [len(p) for p in pages] == [10, 10, 5] and sum(pages, []) == ids
        edges, key = [], ("", "", "")
        while epage := w.edges_after(key, 7):
            edges += epage
            key = epage[-1].key()
        assert [(x.src, x.dst) for x in edges] == pairs
        assert [x.dst for x in w.edges_out_of(["m003", "m001"])] == ["m002", "m004"]
        assert w.cold_stub_count() == 0
        sample = w.sample_contents(random.Random(1), 40)
        assert sample and all(c == f"word{i}" for i, c in sample)
        assert w.pin_snapshot()[0] > 0
    finally:
        w.close()
