"""The planner: validation, before/after images, the in-batch overlay (engram.planner)."""

from __future__ import annotations

from typing import Any

import pytest

from engram.errors import Conflict, EngramError, NotFound, ValidationError
from engram.model import Edge, Memory, OpType, edge_target
from engram.planner import Planner

T0 = 1_000_000_000_000


class State:
    """A StateView over plain dicts."""

    def __init__(self, mems: list[Memory] = (), edges: list[Edge] = ()) -> None:  # type: ignore[assignment]
        self.mems = {m.id: m for m in mems}
        self.edges = {e.key(): e for e in edges}

    def get_memory(self, mid: str) -> Memory | None:
        return self.mems.get(mid)

    def get_edge(self, src: str, dst: str, kind: str) -> Edge | None:
        return self.edges.get((src, dst, kind))

    def edges_of(self, mid: str) -> list[Edge]:
        return [e for k, e in self.edges.items() if mid in (k[0], k[1])]

    def get_mark(self, name: str) -> tuple[int, int] | None:
        return None


def mem(mid: str, strength: float = 0.5, updated_at: int = T0) -> Memory:
    return Memory(mid, f"content {mid}", strength, {"k": mid}, T0, updated_at, 0, 0)


def plan(ops: list[Any], state: State | None = None, ts: int = T0 + 10, hl: float = 0.0):  # type: ignore[no-untyped-def]
    p = Planner(state or State(), ts, hl)  # type: ignore[arg-type]
    for i, op in enumerate(ops):
        p.add(op, i if len(ops) > 1 else None)
    return p


def test_create_memory_defaults() -> None:
    p = plan([{"op": "create_memory", "id": "a", "content": "hi"}])
    (out,) = p.out
    assert out.op is OpType.CREATE_MEMORY and out.target == "a" and out.before is None
    assert out.after == Memory("a", "hi", 0.5, {}, T0 + 10, T0 + 10, 0, 0)
    assert p.results == [{"op": "create_memory", "id": "a"}]


def test_create_memory_generates_an_id() -> None:
    p = plan([{"op": "create_memory", "content": "hi", "strength": 1, "metadata": {"x": [1]}}])
    m = p.out[0].after
    assert isinstance(m, Memory) and len(m.id) == 36 and p.results[0]["id"] == m.id
    assert m.strength == 1.0 and isinstance(m.strength, float) and m.metadata == {"x": [1]}


def test_update_memory_keeps_unset_fields() -> None:
    st = State([mem("a", strength=0.8)])
    p = plan([{"op": "update_memory", "id": "a", "content": "new"}], st)
    out = p.out[0]
    assert out.op is OpType.UPDATE_MEMORY and out.before == st.mems["a"]
    assert out.after.content == "new" and out.after.metadata == {"k": "a"}
    assert out.after.strength == 0.8 and out.after.updated_at == T0 + 10
    assert out.after.created_at == T0


def test_update_memory_carries_the_decayed_strength_forward() -> None:
    st = State([mem("a", strength=0.8)])
    p = plan([{"op": "update_memory", "id": "a", "metadata": {}}], st, ts=T0 + 10 * 10**9, hl=10.0)
    assert p.out[0].after.strength == pytest.approx(0.4)
    assert p.out[0].after.metadata == {}


def test_activate_decays_then_raises_and_caps() -> None:
    st = State([mem("a", strength=0.8), mem("b", strength=0.95)])
    p = plan(
        [{"op": "activate", "id": "a", "boost": 0.25}, {"op": "activate", "id": "b", "boost": 0.6}],
        st, ts=T0 + 20 * 10**9, hl=20.0,
    )
    a, b = p.out
    assert a.op is OpType.UPDATE_STRENGTH and a.after.strength == pytest.approx(0.65)
    assert a.after.activation_count == 1 and a.after.last_activated_at == T0 + 20 * 10**9
    assert b.after.strength == 1.0
    assert p.results[0] == {"op": "activate", "id": "a", "strength": a.after.strength}


def test_activate_default_boost() -> None:
    p = plan([{"op": "activate", "id": "a"}], State([mem("a", strength=0.5)]))
    assert p.out[0].after.strength == pytest.approx(0.6)


def test_batch_sees_its_own_earlier_ops() -> None:
    p = plan([
        {"op": "create_memory", "id": "a", "content": "1"},
        {"op": "create_memory", "id": "b", "content": "2"},
        {"op": "create_edge", "src": "a", "dst": "b", "kind": "k", "weight": 2},
        {"op": "activate", "id": "a"},
        {"op": "activate", "id": "a"},
        {"op": "delete_edge", "src": "a", "dst": "b", "kind": "k"},
        {"op": "create_edge", "src": "b", "dst": "a"},
        {"op": "delete_memory", "id": "b"},
    ])
    ops = [o.op for o in p.out]
    assert ops == [
        OpType.CREATE_MEMORY, OpType.CREATE_MEMORY, OpType.CREATE_EDGE, OpType.UPDATE_STRENGTH,
        OpType.UPDATE_STRENGTH, OpType.DELETE_EDGE, OpType.CREATE_EDGE, OpType.DELETE_EDGE,
        OpType.DELETE_MEMORY,
    ]
    assert p.out[4].before.activation_count == 1 and p.out[4].after.activation_count == 2
    assert p.out[7].target == edge_target("b", "a", "related")
    assert p.results[-1] == {"op": "delete_memory", "id": "b", "edges_deleted": 1}


def test_delete_memory_takes_every_edge_in_sorted_order() -> None:
    st = State(
        [mem("a"), mem("b"), mem("c")],
        [Edge("a", "b", "k", 1, T0), Edge("c", "a", "k", 1, T0), Edge("a", "a", "self", 1, T0),
         Edge("b", "c", "k", 1, T0)],
    )
    p = plan([{"op": "delete_memory", "id": "a"}], st)
    *edges, last = p.out
    assert [e.target for e in edges] == ["a|a|self", "a|b|k", "c|a|k"]
    assert all(e.op is OpType.DELETE_EDGE and e.after is None for e in edges)
    assert last.op is OpType.DELETE_MEMORY and last.before == st.mems["a"] and last.after is None
    assert p.results == [{"op": "delete_memory", "id": "a", "edges_deleted": 3}]


def test_create_edge_twice_updates_the_weight_and_keeps_created_at() -> None:
    old = Edge("a", "b", "related", 1.0, T0 - 5)
    p = plan([{"op": "create_edge", "src": "a", "dst": "b", "weight": -0.5}],
             State([mem("a"), mem("b")], [old]))
    assert p.out[0].before == old
    assert p.out[0].after == Edge("a", "b", "related", -0.5, T0 - 5)


def test_mark() -> None:
    p = plan([{"op": "mark", "name": "before-upgrade"}])
    assert p.out[0].op is OpType.MARKER and p.out[0].after == {"name": "before-upgrade"}


BAD: list[tuple[dict, type[EngramError], str | None]] = [
    ({"op": "create_memory", "id": "a"}, ValidationError, "content"),
    ({"op": "create_memory", "id": "a b", "content": "x"}, ValidationError, "id"),
    ({"op": "create_memory", "id": "a\n", "content": "x"}, ValidationError, "id"),
    ({"op": "create_memory", "id": "", "content": "x"}, ValidationError, "id"),
    ({"op": "create_memory", "id": "x" * 257, "content": "x"}, ValidationError, "id"),
    ({"op": "create_memory", "id": 5, "content": "x"}, ValidationError, "id"),
    ({"op": "create_memory", "content": 5}, ValidationError, "content"),
    ({"op": "create_memory", "content": "\udc80"}, ValidationError, "content"),
    ({"op": "create_memory", "content": "x", "strength": 1.01}, ValidationError, "strength"),
    ({"op": "create_memory", "content": "x", "strength": -0.0001}, ValidationError, "strength"),
    ({"op": "create_memory", "content": "x", "strength": True}, ValidationError, "strength"),
    ({"op": "create_memory", "content": "x", "strength": "0.5"}, ValidationError, "strength"),
    ({"op": "create_memory", "content": "x", "strength": float("nan")}, ValidationError,
     "strength"),
    ({"op": "create_memory", "content": "x", "strength": 10**400}, ValidationError, "strength"),
    ({"op": "create_memory", "content": "x", "metadata": []}, ValidationError, "metadata"),
    ({"op": "create_memory", "content": "x", "metadata": {1: 2}}, ValidationError, "metadata"),
    ({"op": "create_memory", "content": "x", "metadata": {"a": float("inf")}}, ValidationError,
     "metadata"),
    ({"op": "create_memory", "content": "x", "metadata": {"a": 2**70}}, ValidationError,
     "metadata"),
    ({"op": "create_memory", "content": "x", "metadata": {"a": object()}}, ValidationError,
     "metadata"),
    ({"op": "create_memory", "id": "e", "content": "x"}, Conflict, "id"),
    ({"op": "create_memory", "content": "x", "colour": "red"}, ValidationError, "colour"),
    ({"op": "update_memory"}, ValidationError, "id"),
    ({"op": "update_memory", "id": "nope"}, NotFound, "id"),
    ({"op": "update_memory", "id": "e", "strength": 2}, ValidationError, "strength"),
    ({"op": "activate", "id": "nope"}, NotFound, "id"),
    ({"op": "activate", "id": "e", "boost": -1}, ValidationError, "boost"),
    ({"op": "delete_memory", "id": "nope"}, NotFound, "id"),
    ({"op": "create_edge", "src": "e", "dst": "nope"}, NotFound, "dst"),
    ({"op": "create_edge", "src": "nope", "dst": "e"}, NotFound, "src"),
    ({"op": "create_edge", "dst": "e"}, ValidationError, "src"),
    ({"op": "create_edge", "src": "e", "dst": "e", "kind": "a|b"}, ValidationError, "kind"),
    ({"op": "create_edge", "src": "e", "dst": "e", "kind": "k\n"}, ValidationError, "kind"),
    ({"op": "create_edge", "src": "e", "dst": "e", "weight": float("inf")}, ValidationError,
     "weight"),
    ({"op": "create_edge", "src": "e", "dst": "e", "weight": 10**400}, ValidationError, "weight"),
    # Weights are bounded so that recall scores stay finite numbers.
    ({"op": "create_edge", "src": "e", "dst": "e", "weight": 1.79e308}, ValidationError, "weight"),
    ({"op": "create_edge", "src": "e", "dst": "e", "weight": 1_000_001}, ValidationError,
     "weight"),
    ({"op": "create_edge", "src": "e", "dst": "e", "weight": -1e6 - 1}, ValidationError,
     "weight"),
    ({"op": "create_edge", "src": "e", "dst": "e", "weight": float("nan")}, ValidationError,
     "weight"),
    # Times an import carries: ints of UTC ns, ordered, never later than the op itself.
    ({"op": "create_memory", "content": "x", "created_at": "2024-01-01T00:00:00Z"},
     ValidationError, "created_at"),
    ({"op": "create_memory", "content": "x", "created_at": 1.5}, ValidationError, "created_at"),
    ({"op": "create_memory", "content": "x", "created_at": True}, ValidationError, "created_at"),
    ({"op": "create_memory", "content": "x", "created_at": -1}, ValidationError, "created_at"),
    ({"op": "create_memory", "content": "x", "created_at": 2**63}, ValidationError, "created_at"),
    ({"op": "create_memory", "content": "x", "created_at": T0 + 11}, ValidationError,
     "created_at"),
    ({"op": "create_memory", "content": "x", "updated_at": T0 + 11}, ValidationError,
     "updated_at"),
    ({"op": "create_memory", "content": "x", "created_at": T0 + 5, "updated_at": T0 + 4},
     ValidationError, "updated_at"),
    ({"op": "create_memory", "content": "x", "created_at": T0, "updated_at": T0 + 5,
      "last_activated_at": T0 + 6}, ValidationError, "last_activated_at"),
    ({"op": "create_memory", "content": "x", "created_at": T0, "last_activated_at": T0 - 1},
     ValidationError, "last_activated_at"),
    ({"op": "create_memory", "content": "x", "activation_count": -1}, ValidationError,
     "activation_count"),
    ({"op": "create_memory", "content": "x", "activation_count": "3"}, ValidationError,
     "activation_count"),
    ({"op": "create_edge", "src": "e", "dst": "e", "created_at": T0 + 11}, ValidationError,
     "created_at"),
    ({"op": "create_edge", "src": "e", "dst": "e", "created_at": None, "updated_at": T0},
     ValidationError, "updated_at"),
    ({"op": "update_memory", "id": "e", "created_at": T0}, ValidationError, "created_at"),
    ({"op": "delete_edge", "src": "e", "dst": "e"}, NotFound, "src"),
    ({"op": "delete_edge", "src": None, "dst": "e"}, ValidationError, "src"),
    ({"op": "mark", "name": "not ok"}, ValidationError, "name"),
    ({"op": "explode"}, ValidationError, "op"),
    ({"op": ["create_memory"]}, ValidationError, "op"),
    ({"op": {"x": 1}}, ValidationError, "op"),
    ({}, ValidationError, "op"),
    ({"op": "delete_memory", "id": "e", 3: 4}, ValidationError, "3"),
    ("create_memory", ValidationError, "op"),
]


@pytest.mark.parametrize(("op", "err", "field"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_ops_are_refused_with_the_field(op: Any, err: type, field: str | None) -> None:
    with pytest.raises(err) as ei:
        plan([op], State([mem("e")]))
    e = ei.value
    assert e.details.get("field") == field
    assert "index" not in e.details
    assert "\n" not in e.message and e.message


@pytest.mark.parametrize("index", [0, 1, 3])
def test_errors_in_a_batch_name_the_index(index: int) -> None:
    ops: list[Any] = [{"op": "create_memory", "id": f"m{i}", "content": "x"} for i in range(4)]
    ops[index] = {"op": "activate", "id": "missing"}
    st = State()
    p = Planner(st, T0, 0.0)  # type: ignore[arg-type]
    with pytest.raises(NotFound) as ei:
        for i, op in enumerate(ops):
            p.add(op, i)
    assert ei.value.details["index"] == index
    assert str(ei.value).startswith(f"op {index}: ")
    assert ei.value.to_dict()["index"] == index
    assert st.mems == {}  # planning never writes


def test_metadata_is_copied_not_shared() -> None:
    md = {"a": [1, 2]}
    p = plan([{"op": "create_memory", "id": "a", "content": "x", "metadata": md}])
    md["a"].append(3)
    assert p.out[0].after.metadata == {"a": [1, 2]}


def test_metadata_size_is_bounded() -> None:
    with pytest.raises(ValidationError) as ei:
        plan([{"op": "create_memory", "content": "x", "metadata": {"a": "x" * (1 << 20)}}])
    assert ei.value.field == "metadata" and "larger" in ei.value.message


def test_weights_at_the_bounds_are_accepted() -> None:
    p = plan([
        {"op": "create_edge", "src": "e", "dst": "f", "weight": 1e6},
        {"op": "create_edge", "src": "f", "dst": "e", "weight": -1_000_000},
    ], State([mem("e"), mem("f")]))
    assert [o.after.weight for o in p.out] == [1e6, -1e6]  # type: ignore[union-attr]


def test_create_memory_and_edge_keep_the_times_they_are_given() -> None:
    """What an import of an export relies on: every field comes back as it was."""
    p = plan([
        {"op": "create_memory", "id": "a", "content": "x", "strength": 0.04,
         "created_at": T0 - 30, "updated_at": T0 - 10, "last_activated_at": T0 - 20,
         "activation_count": 7},
        {"op": "create_memory", "id": "b", "content": "y", "created_at": 0, "updated_at": 0},
        {"op": "create_edge", "src": "a", "dst": "b", "weight": 2.5, "created_at": T0 - 5},
    ])
    a, b, e = (o.after for o in p.out)
    assert a == Memory("a", "x", 0.04, {}, T0 - 30, T0 - 10, T0 - 20, 7)
    assert b == Memory("b", "y", 0.5, {}, 0, 0, 0, 0)
    assert e == Edge("a", "b", "related", 2.5, T0 - 5)


def test_a_given_created_at_only_leaves_updated_at_now() -> None:
    (out,) = plan([{"op": "create_memory", "id": "a", "content": "x", "created_at": T0}]).out
    assert out.after == Memory("a", "x", 0.5, {}, T0, T0 + 10, 0, 0)
