"""Memories, edges, ids and strength math. Pure: no I/O.

Strength decays lazily: the stored ``strength`` is exact as of ``updated_at`` and the effective
strength at time ``t`` is ``strength * 0.5 ** ((t - updated_at) / half_life)``. Decay therefore
writes nothing and never touches the log or the digest; activation records the decayed-then-raised
value as an after-image, so replay is deterministic.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Generator
from typing import Any

import msgspec

from engram.errors import ValidationError

# Used with fullmatch: "$" alone would also accept a trailing newline.
ID_RE = re.compile(r"[A-Za-z0-9\-_.:@/]{1,256}")
KIND_RE = re.compile(r"[A-Za-z0-9\-_.:@/]{1,64}")
DEFAULT_KIND = "related"
DEFAULT_STRENGTH = 0.5
DEFAULT_BOOST = 0.1
MAX_CONTENT_BYTES = 1 << 20
MAX_METADATA_BYTES = 1 << 20
# Edge weights lie in [-MAX_WEIGHT, MAX_WEIGHT]. The bound keeps every recall score a finite
# number: a score is a bounded text score times at most 1.5, plus at most one contribution of
# 0.5 x score x weight per matched memory of a bounded candidate pool (graph.RECALL_POOL).
MAX_WEIGHT = 1e6
# Times are UTC nanoseconds stored as SQLite INTEGER and msgpack ints: signed 64 bits.
MAX_TIME_NS = (1 << 63) - 1


class OpType(enum.IntEnum):
    CREATE_MEMORY = 1
    UPDATE_MEMORY = 2
    UPDATE_STRENGTH = 3
    DELETE_MEMORY = 4
    CREATE_EDGE = 5
    DELETE_EDGE = 6
    ARCHIVE_MEMORIES = 7
    RESTORE_MEMORIES = 8
    MARKER = 9


MEMORY_OPS = frozenset(
    {OpType.CREATE_MEMORY, OpType.UPDATE_MEMORY, OpType.UPDATE_STRENGTH, OpType.DELETE_MEMORY}
)
EDGE_OPS = frozenset({OpType.CREATE_EDGE, OpType.DELETE_EDGE})


# gc=False: memories and edges hold only strings, numbers and JSON metadata, so they can never
# be part of a reference cycle; untracked, a fast tier of a million memories adds nothing to a
# full garbage collection, which stops every thread while it runs.
class Memory(msgspec.Struct, array_like=True, gc=False):
    """A memory. Encoded as a msgpack array (field order is part of the format)."""

    id: str
    content: str
    strength: float
    metadata: dict[str, Any]
    created_at: int  # UTC ns
    updated_at: int
    last_activated_at: int
    activation_count: int

    def to_json(self, now_ns: int | None = None, half_life_s: float | None = None) -> dict:
        out = {
            "id": self.id,
            "content": self.content,
            "strength": self.strength,
            "metadata": self.metadata,
            "created_at": ns_to_iso(self.created_at),
            "updated_at": ns_to_iso(self.updated_at),
            "last_activated_at": (
                ns_to_iso(self.last_activated_at) if self.last_activated_at else None
            ),
            "activation_count": self.activation_count,
        }
        if now_ns is not None and half_life_s is not None:
            out["effective_strength"] = effective_strength(self, now_ns, half_life_s)
        return out


class Edge(msgspec.Struct, array_like=True, gc=False):
    src: str
    dst: str
    kind: str
    weight: float
    created_at: int

    def key(self) -> tuple[str, str, str]:
        return (self.src, self.dst, self.kind)

    def to_json(self) -> dict:
        return {
            "src": self.src,
            "dst": self.dst,
            "kind": self.kind,
            "weight": self.weight,
            "created_at": ns_to_iso(self.created_at),
        }


def memory_op(m: Memory) -> dict[str, Any]:
    """The ``create_memory`` op that recreates ``m`` exactly: ``strength`` is the stored value,
    exact as of ``updated_at``, and times are ints of UTC ns, so decay continues where it was."""
    return {
        "op": "create_memory",
        "id": m.id,
        "content": m.content,
        "strength": m.strength,
        "metadata": m.metadata,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "last_activated_at": m.last_activated_at,
        "activation_count": m.activation_count,
    }


def edge_op(e: Edge) -> dict[str, Any]:
    """The ``create_edge`` op that recreates ``e`` exactly."""
    return {
        "op": "create_edge",
        "src": e.src,
        "dst": e.dst,
        "kind": e.kind,
        "weight": e.weight,
        "created_at": e.created_at,
    }


class ExportStream:
    """The ops of one export, describing the graph exactly as it was after ``lsn`` (whose
    logical digest is ``digest``): every memory, then every edge. An iterator; ``close()``
    releases what it holds (a read snapshot, a connection) when it is not read to the end."""

    def __init__(self, lsn: int, digest: str, ops: Generator[dict[str, Any], None, None]) -> None:
        self.lsn = lsn
        self.digest = digest
        self._ops = ops

    def __iter__(self) -> ExportStream:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._ops)

    def close(self) -> None:
        self._ops.close()


def edge_target(src: str, dst: str, kind: str) -> str:
    # '|' is outside the id and kind alphabets, so the target string is unambiguous.
    return f"{src}|{dst}|{kind}"


def parse_edge_target(target: str) -> tuple[str, str, str]:
    src, dst, kind = target.split("|")
    return src, dst, kind


def new_id() -> str:
    return str(uuid.uuid4())


def check_id(value: Any, field: str = "id") -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string", field=field)
    if not ID_RE.fullmatch(value):
        if len(value) > 256:
            raise ValidationError(f"{field} is longer than 256 characters", field=field)
        raise ValidationError(
            f"{field} must be 1-256 characters of letters, digits and -_.:@/", field=field
        )
    return value


def check_kind(value: Any, field: str = "kind") -> str:
    if not isinstance(value, str) or not KIND_RE.fullmatch(value):
        raise ValidationError(
            f"{field} must be 1-64 characters of letters, digits and -_.:@/", field=field
        )
    return value


def check_strength(value: Any, field: str = "strength") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{field} must be a number in [0, 1]", field=field)
    try:
        v = float(value)
    except OverflowError:  # an int too large for a float
        raise ValidationError(f"{field} must be in [0, 1], got {value}", field=field) from None
    if not (0.0 <= v <= 1.0):
        raise ValidationError(f"{field} must be in [0, 1], got {value}", field=field)
    return v + 0.0  # -0.0 becomes 0.0: SQLite stores it as 0.0, the digest must agree


def check_weight(value: Any, field: str = "weight") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{field} must be a number in [-1e6, 1e6]", field=field)
    try:
        v = float(value)
    except OverflowError:
        msg = f"{field} must be in [-1e6, 1e6], got a larger number"
        raise ValidationError(msg, field=field) from None
    if not -MAX_WEIGHT <= v <= MAX_WEIGHT:  # also refuses NaN
        raise ValidationError(f"{field} must be in [-1e6, 1e6], got {value}", field=field)
    return v + 0.0  # -0.0 becomes 0.0, as in check_strength


def check_time(value: Any, field: str) -> int:
    """A time given by a client (``import`` of an export): an int of UTC nanoseconds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(
            f"{field} must be an integer of nanoseconds since 1970-01-01 UTC", field=field
        )
    if not 0 <= value <= MAX_TIME_NS:
        raise ValidationError(f"{field} must be in [0, 2^63), got {value}", field=field)
    return value


def check_count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIME_NS:
        raise ValidationError(f"{field} must be a non-negative integer", field=field)
    return value


def check_content(value: Any, field: str = "content") -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string", field=field)
    if len(value.encode("utf-8", "surrogatepass")) > MAX_CONTENT_BYTES:
        raise ValidationError(f"{field} is larger than {MAX_CONTENT_BYTES} bytes", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{field} is not valid UTF-8 text", field=field) from None
    return value


def check_metadata(value: Any, field: str = "metadata") -> dict[str, Any]:
    """A plain-JSON copy of ``value``.

    The log stores metadata as msgpack and the warm tier as JSON; both must give back exactly
    the same object or the digest and replay disagree. So only values that survive a JSON round
    trip unchanged (string keys, finite numbers, lists, ints that fit 64 bits) are accepted, and
    the stored copy is detached from the caller's object.
    """
    if not isinstance(value, dict):
        raise ValidationError(f"{field} must be a JSON object", field=field)
    try:
        raw = msgspec.json.encode(value)
        plain = msgspec.json.decode(raw)
        msgspec.msgpack.encode(plain)
        same = plain == value
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.MsgspecError) as e:
        raise ValidationError(f"{field} is not encodable as JSON: {e}", field=field) from None
    if len(raw) > MAX_METADATA_BYTES:  # keeps every record far below the reader's limit
        raise ValidationError(
            f"{field} is larger than {MAX_METADATA_BYTES} bytes as JSON", field=field
        )
    if not same:
        raise ValidationError(
            f"{field} must be plain JSON: string keys, finite numbers, lists and objects",
            field=field,
        )
    return plain


def effective_strength(m: Memory, now_ns: int, half_life_s: float) -> float:
    if half_life_s <= 0:
        return m.strength
    age_s = max(0, now_ns - m.updated_at) / 1e9
    return m.strength * 0.5 ** (age_s / half_life_s)


def activated(m: Memory, now_ns: int, boost: float, half_life_s: float) -> Memory:
    """The memory after one activation at ``now_ns``: decay, then raise by ``boost`` (cap 1)."""
    s = min(1.0, effective_strength(m, now_ns, half_life_s) + boost)
    return msgspec.structs.replace(
        m,
        strength=s,
        updated_at=now_ns,
        last_activated_at=now_ns,
        activation_count=m.activation_count + 1,
    )


def ns_to_iso(ns: int) -> str:
    import datetime as _dt

    secs, rem = divmod(ns, 1_000_000_000)
    d = _dt.datetime.fromtimestamp(secs, tz=_dt.UTC).replace(microsecond=rem // 1000)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
