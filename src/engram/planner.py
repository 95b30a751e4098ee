"""Turning requested ops into log records: validation and before/after images.

A batch is planned against the current state plus an overlay of the batch's own earlier ops, so
one batch can create two memories and link them. Nothing is written while planning: the first bad
op raises an error naming its index and field, and the batch as a whole is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from engram.errors import Conflict, EngramError, NotFound, ValidationError
from engram.model import (
    DEFAULT_BOOST,
    DEFAULT_KIND,
    DEFAULT_STRENGTH,
    Edge,
    Memory,
    OpType,
    activated,
    check_content,
    check_count,
    check_id,
    check_kind,
    check_metadata,
    check_strength,
    check_time,
    check_weight,
    edge_target,
    effective_strength,
    new_id,
    ns_to_iso,
)

OP_NAMES = (
    "create_memory",
    "update_memory",
    "activate",
    "delete_memory",
    "create_edge",
    "delete_edge",
    "mark",
)

# What an export carries beyond a client's usual fields, so that an import recreates every
# memory exactly (``model.memory_op``); absent, they are those of a memory created now.
MEMORY_TIMES = ("created_at", "updated_at", "last_activated_at", "activation_count")

_ALLOWED_FIELDS = {
    "create_memory": {"op", "id", "content", "strength", "metadata", *MEMORY_TIMES},
    "update_memory": {"op", "id", "content", "strength", "metadata"},
    "activate": {"op", "id", "boost"},
    "delete_memory": {"op", "id"},
    "create_edge": {"op", "src", "dst", "kind", "weight", "created_at"},
    "delete_edge": {"op", "src", "dst", "kind"},
    "mark": {"op", "name"},
}


@dataclass(slots=True)
class Planned:
    op: OpType
    target: str
    before: Memory | Edge | None
    after: Memory | Edge | dict | None


class StateView(Protocol):
    """What the planner needs to read; the engine provides it (under its lock)."""

    def get_memory(self, mid: str) -> Memory | None: ...

    def get_edge(self, src: str, dst: str, kind: str) -> Edge | None: ...

    def edges_of(self, mid: str) -> list[Edge]: ...

    def get_mark(self, name: str) -> tuple[int, int] | None: ...


class Planner:
    def __init__(self, state: StateView, ts_ns: int, half_life_s: float) -> None:
        self.state = state
        self.ts = ts_ns
        self.half_life_s = half_life_s
        self.mems: dict[str, Memory | None] = {}
        self.edges: dict[tuple[str, str, str], Edge | None] = {}
        self.out: list[Planned] = []
        self.results: list[dict[str, Any]] = []
        self.marks: set[str] = set()  # restore point names this batch adds

    # -- overlay reads -------------------------------------------------------------------

    def memory(self, mid: str) -> Memory | None:
        if mid in self.mems:
            return self.mems[mid]
        return self.state.get_memory(mid)

    def edge(self, src: str, dst: str, kind: str) -> Edge | None:
        k = (src, dst, kind)
        if k in self.edges:
            return self.edges[k]
        return self.state.get_edge(src, dst, kind)

    def edges_of(self, mid: str) -> list[Edge]:
        found: dict[tuple[str, str, str], Edge] = {e.key(): e for e in self.state.edges_of(mid)}
        for k, e in self.edges.items():
            if mid in (k[0], k[1]):
                if e is None:
                    found.pop(k, None)
                else:
                    found[k] = e
        return list(found.values())

    def _emit(self, op: OpType, target: str, before: Any, after: Any) -> None:
        self.out.append(Planned(op, target, before, after))
        if op in (OpType.CREATE_MEMORY, OpType.UPDATE_MEMORY, OpType.UPDATE_STRENGTH):
            self.mems[target] = after
        elif op == OpType.DELETE_MEMORY:
            self.mems[target] = None
        elif op == OpType.CREATE_EDGE:
            self.edges[after.key()] = after
        elif op == OpType.DELETE_EDGE:
            self.edges[before.key()] = None

    # -- ops -----------------------------------------------------------------------------

    def add(self, raw: Any, index: int | None = None) -> dict[str, Any]:
        """Plan one op (a dict as in POST /v1/batch); errors name the op's index."""
        try:
            if not isinstance(raw, dict):
                raise ValidationError("each op must be a JSON object", field="op")
            name = raw.get("op")
            # isinstance first: an unhashable value (a list) would make `in` raise TypeError.
            if not isinstance(name, str) or name not in _ALLOWED_FIELDS:
                raise ValidationError(
                    f"op must be one of {', '.join(OP_NAMES)}, got {name!r}", field="op"
                )
            extra = set(raw) - _ALLOWED_FIELDS[name]
            if extra:
                f = sorted(map(str, extra))[0]
                raise ValidationError(f"unknown field {f!r} for {name}", field=f)
            result = getattr(self, name)(**{k: v for k, v in raw.items() if k != "op"})
        except EngramError as e:
            if index is not None:
                e.details["index"] = index
                e.message = f"op {index}: {e.message}"
                e.args = (e.message,)
            raise
        self.results.append(result)
        return result

    def create_memory(
        self,
        content: Any = None,
        id: Any = None,
        strength: Any = None,
        metadata: Any = None,
        created_at: Any = None,
        updated_at: Any = None,
        last_activated_at: Any = None,
        activation_count: Any = None,
    ) -> dict[str, Any]:
        mid = new_id() if id is None else check_id(id)
        if content is None:
            raise ValidationError("content is required", field="content")
        content = check_content(content)
        s = DEFAULT_STRENGTH if strength is None else check_strength(strength)
        md = {} if metadata is None else check_metadata(metadata)
        created = self.ts if created_at is None else self._past(created_at, "created_at")
        updated = self.ts if updated_at is None else self._past(updated_at, "updated_at")
        if updated < created:
            raise ValidationError(
                "updated_at must not be earlier than created_at", field="updated_at"
            )
        activated_at = 0
        if last_activated_at is not None:
            activated_at = check_time(last_activated_at, "last_activated_at")
        if activated_at and not created <= activated_at <= updated:
            raise ValidationError(
                "last_activated_at must be 0 (never) or between created_at and updated_at",
                field="last_activated_at",
            )
        count = 0 if activation_count is None else check_count(activation_count, "activation_count")
        if self.memory(mid) is not None:
            raise Conflict(f"memory {mid} already exists; update it with PATCH", field="id")
        m = Memory(mid, content, s, md, created, updated, activated_at, count)
        self._emit(OpType.CREATE_MEMORY, mid, None, m)
        return {"op": "create_memory", "id": mid}

    def _past(self, value: Any, field: str) -> int:
        """A time given by the client: an int of UTC ns, not later than this op's timestamp
        (so a memory's times never run ahead of the log record that wrote it)."""
        t = check_time(value, field)
        if t > self.ts:
            raise ValidationError(
                f"{field} {ns_to_iso(t)} is later than now ({ns_to_iso(self.ts)}); "
                "check the clocks of the machines involved",
                field=field,
            )
        return t

    def _existing(self, mid: Any, field: str = "id") -> Memory:
        mid = check_id(mid, field)
        m = self.memory(mid)
        if m is None:
            raise NotFound(f"memory {mid} does not exist", field=field)
        return m

    def update_memory(
        self, id: Any = None, content: Any = None, strength: Any = None, metadata: Any = None
    ) -> dict[str, Any]:
        if id is None:
            raise ValidationError("id is required", field="id")
        m = self._existing(id)
        changes: dict[str, Any] = {"updated_at": self.ts}
        if content is not None:
            changes["content"] = check_content(content)
        # Strength is stored as of updated_at: carry the decayed value forward unless set.
        changes["strength"] = (
            check_strength(strength)
            if strength is not None
            else effective_strength(m, self.ts, self.half_life_s)
        )
        if metadata is not None:
            changes["metadata"] = check_metadata(metadata)
        after = msgspec.structs.replace(m, **changes)
        self._emit(OpType.UPDATE_MEMORY, m.id, m, after)
        return {"op": "update_memory", "id": m.id}

    def activate(self, id: Any = None, boost: Any = None) -> dict[str, Any]:
        if id is None:
            raise ValidationError("id is required", field="id")
        b = DEFAULT_BOOST if boost is None else check_strength(boost, "boost")
        m = self._existing(id)
        after = activated(m, self.ts, b, self.half_life_s)
        self._emit(OpType.UPDATE_STRENGTH, m.id, m, after)
        return {"op": "activate", "id": m.id, "strength": after.strength}

    def delete_memory(self, id: Any = None) -> dict[str, Any]:
        if id is None:
            raise ValidationError("id is required", field="id")
        m = self._existing(id)
        edges = self.edges_of(m.id)
        for e in sorted(edges, key=Edge.key):
            self._emit(OpType.DELETE_EDGE, edge_target(*e.key()), e, None)
        self._emit(OpType.DELETE_MEMORY, m.id, m, None)
        return {"op": "delete_memory", "id": m.id, "edges_deleted": len(edges)}

    def create_edge(
        self,
        src: Any = None,
        dst: Any = None,
        kind: Any = None,
        weight: Any = None,
        created_at: Any = None,
    ) -> dict[str, Any]:
        if src is None:
            raise ValidationError("src is required", field="src")
        if dst is None:
            raise ValidationError("dst is required", field="dst")
        s = self._existing(src, "src").id
        d = self._existing(dst, "dst").id
        k = DEFAULT_KIND if kind is None else check_kind(kind)
        w = 1.0 if weight is None else check_weight(weight)
        old = self.edge(s, d, k)
        if created_at is not None:
            created = self._past(created_at, "created_at")
        else:
            created = old.created_at if old else self.ts
        e = Edge(s, d, k, w, created)
        self._emit(OpType.CREATE_EDGE, edge_target(s, d, k), old, e)
        return {"op": "create_edge", "src": s, "dst": d, "kind": k}

    def delete_edge(self, src: Any = None, dst: Any = None, kind: Any = None) -> dict[str, Any]:
        s = check_id(src, "src")
        d = check_id(dst, "dst")
        k = DEFAULT_KIND if kind is None else check_kind(kind)
        old = self.edge(s, d, k)
        if old is None:
            raise NotFound(f"edge {s} -> {d} ({k}) does not exist", field="src")
        self._emit(OpType.DELETE_EDGE, edge_target(s, d, k), old, None)
        return {"op": "delete_edge", "src": s, "dst": d, "kind": k}

    def mark(self, name: Any = None) -> dict[str, Any]:
        """A named restore point. A name is unique within the history, so that it means one
        moment wherever it is looked up (the LSN of its marker record)."""
        n = check_id(name, "name")
        if n in self.marks:
            raise Conflict(
                f"restore point {n!r} is named twice in this batch; give each one its own name",
                field="name",
            )
        old = self.state.get_mark(n)
        if old is not None:
            raise Conflict(
                f"restore point {n!r} already exists (LSN {old[0]}, {ns_to_iso(old[1])}); "
                "a name means one moment, so choose another name",
                field="name",
            )
        self.marks.add(n)
        self._emit(OpType.MARKER, n, None, {"name": n})
        return {"op": "mark", "name": n}
