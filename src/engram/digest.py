"""The logical digest (docs/DESIGN.md O7).

An order-independent digest of the logical graph: the sum mod 2^256 of sha256 over a canonical
encoding of each memory and each edge. Adding an item adds its hash, removing subtracts it, so the
digest is maintained per op in O(1) and recomputable from scratch in any order. Archived memories
are part of the logical graph: archiving or restoring them leaves the digest unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import msgspec

from engram.model import Edge, Memory

MOD = 1 << 256
_enc = msgspec.msgpack.Encoder(order="sorted")


def _h(payload: bytes) -> int:
    return int.from_bytes(hashlib.sha256(payload).digest(), "big")


def memory_hash(m: Memory) -> int:
    return _h(
        _enc.encode(
            (
                "m",
                m.id,
                m.content,
                m.strength,
                m.metadata,
                m.created_at,
                m.updated_at,
                m.last_activated_at,
                m.activation_count,
            )
        )
    )


def memory_rows_sum(rows: Iterable[tuple], decode_metadata: Callable[[str], dict]) -> int:
    """The sum of ``memory_hash`` over warm-tier rows (id, content, strength, metadata JSON,
    created_at, updated_at, last_activated_at, activation_count): the same bytes hashed,
    without building Memory objects, the calls inlined (a digest recompute spends its time
    here). Raises what ``decode_metadata`` raises for a metadata it cannot read."""
    enc, sha, from_bytes = _enc.encode, hashlib.sha256, int.from_bytes
    total = 0
    for mid, content, strength, meta, created, updated, activated, count in rows:
        total += from_bytes(
            sha(
                enc(
                    (
                        "m",
                        mid,
                        content,
                        strength,
                        decode_metadata(meta),
                        created,
                        updated,
                        activated,
                        count,
                    )
                )
            ).digest(),
            "big",
        )
    return total


def edge_rows_sum(rows: Iterable[tuple]) -> int:
    """The sum of ``edge_hash`` over rows whose first five values are an edge's (src, dst,
    kind, weight, created_at); further values are ignored. The same bytes hashed, without
    building Edge objects."""
    enc, sha, from_bytes = _enc.encode, hashlib.sha256, int.from_bytes
    total = 0
    for r in rows:
        total += from_bytes(sha(enc(("e", r[0], r[1], r[2], r[3], r[4]))).digest(), "big")
    return total


def edge_hash(e: Edge) -> int:
    return _h(_enc.encode(("e", e.src, e.dst, e.kind, e.weight, e.created_at)))


def item_hash(item: Memory | Edge | None) -> int:
    if item is None:
        return 0
    if isinstance(item, Memory):
        return memory_hash(item)
    return edge_hash(item)


class Digest:
    """A running digest; ``hex`` is the 64-hex-digit form stored in manifests and headers."""

    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        self.value = value % MOD

    @classmethod
    def from_hex(cls, s: str) -> Digest:
        return cls(int(s, 16))

    @property
    def hex(self) -> str:
        return format(self.value, "064x")

    def replace(self, before: Memory | Edge | None, after: Memory | Edge | None) -> None:
        self.value = (self.value - item_hash(before) + item_hash(after)) % MOD

    def copy(self) -> Digest:
        return Digest(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Digest) and other.value == self.value

    def __repr__(self) -> str:
        return f"Digest({self.hex[:16]}…)"


def compute(items: Iterable[Memory | Edge]) -> Digest:
    total = 0
    for it in items:
        total += item_hash(it)
    return Digest(total)


EMPTY = Digest(0).hex
