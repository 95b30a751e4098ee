"""Graph queries: one memory, neighbours, recall and export, over a ``GraphView``.

A query reads one state (README "Consistency"): it holds ``view.reading()`` for as long as it
reads, so no write is applied in the middle of it. An export instead pins a SQLite read
snapshot and reads it without holding anything (``GraphView.pin_snapshot``). The engine is the
view the server and the CLI use (``engram.graph.Engine``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Generator, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from engram.errors import ValidationError
from engram.model import Edge, ExportStream, Memory, edge_op, effective_strength, memory_op
from engram.planner import StateView

_WORD = re.compile(r"\w+", re.UNICODE)
# How many of the best text matches a recall ranks (with their out-neighbours), whatever its
# limit: as many as the largest limit, so any limit is a prefix of one ranking, and strength
# reorders all the matches a recall can return.
RECALL_POOL = 1000
MAX_DEPTH = 3
MAX_LIMIT = 1000


class Snapshot(Protocol):
    """A pinned read state of the whole graph; ``close`` releases it."""

    def iter_memories(self) -> Iterator[Memory]: ...

    def iter_edges(self) -> Iterator[Edge]: ...

    def close(self) -> None: ...


class GraphView(StateView, Protocol):
    """What queries read, beyond the planner's view."""

    @property
    def half_life_s(self) -> float: ...

    def reading(self) -> AbstractContextManager[Any]:
        """Held while a query reads: every read inside sees one state."""
        ...

    def memory(self, mid: Any) -> Memory:
        """The memory ``mid`` (a checked id), or NotFound."""
        ...

    def edges_out(self, mid: str) -> list[Edge]: ...

    def edges_in(self, mid: str) -> list[Edge]: ...

    def edges_out_of(self, ids: list[str]) -> list[Edge]:
        """The out-edges of every memory in ``ids``, in (src, dst, kind) order."""
        ...

    def peek_memories(self, ids: list[str]) -> dict[str, Memory]:
        """The current version of each of ``ids`` that exists, without caching it."""
        ...

    def search(self, fts_query: str, limit: int) -> list[tuple[str, float]]:
        """Full-text matches (id, score, higher is better), best first, ties by id."""
        ...

    def pin_snapshot(self) -> tuple[int, str, Snapshot]:
        """(LSN, digest, snapshot) of the state after every write applied so far."""
        ...


def memory_json(m: Memory, half_life_s: float) -> dict[str, Any]:
    """A memory as the API shows it, its strength decayed to now."""
    return m.to_json(time.time_ns(), half_life_s)


def memory(view: GraphView, mid: Any) -> dict[str, Any]:
    """The memory ``mid`` as the API shows it; NotFound when there is none."""
    return memory_json(view.memory(mid), view.half_life_s)


def neighbors(
    view: GraphView, mid: Any, direction: str = "both", depth: int = 1
) -> list[dict[str, Any]]:
    """The memories within ``depth`` edges of ``mid`` (breadth first, each once, at its
    shortest depth) along out-edges, in-edges or both, with the edge that reached each."""
    if direction not in ("out", "in", "both"):
        raise ValidationError("direction must be out, in or both", field="direction")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ValidationError(f"depth must be an integer from 1 to {MAX_DEPTH}", field="depth")
    hl = view.half_life_s
    with view.reading():
        start = view.memory(mid).id
        seen = {start}
        frontier = [start]
        out: list[dict[str, Any]] = []
        for d in range(1, depth + 1):
            nxt = []
            for cur in frontier:
                edges: list[tuple[Edge, str]] = []
                if direction in ("out", "both"):
                    edges += [(e, e.dst) for e in view.edges_out(cur)]
                if direction in ("in", "both"):
                    edges += [(e, e.src) for e in view.edges_in(cur)]
                for e, other in edges:
                    if other in seen:
                        continue
                    seen.add(other)
                    m = view.get_memory(other)
                    if m is None:
                        continue
                    out.append({"depth": d, "edge": e.to_json(), "memory": memory_json(m, hl)})
                    nxt.append(other)
            frontier = nxt
        return out


def recall(view: GraphView, query: Any, limit: int = 10) -> list[dict[str, Any]]:
    """Full-text match, ranked by text score x (0.5 + strength), plus one step of spreading
    activation: each match passes half its own score (as matched, before any spreading),
    scaled by edge weight, to its out-neighbours; negative weights pass nothing.

    The ranking does not depend on ``limit``: it covers the ``RECALL_POOL`` best text matches
    (bm25, then id) and their out-neighbours, and ties go by id, so the results of any limit
    are the first ``limit`` of the same list. Addition runs in id order, so the scores are the
    same in every process.
    """
    if not isinstance(query, str) or not query.strip():
        raise ValidationError("query must be a non-empty string", field="query")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(f"limit must be an integer from 1 to {MAX_LIMIT}", field="limit")
    words = _WORD.findall(query)
    if not words:
        raise ValidationError("query has no searchable words", field="query")
    fts = " OR ".join('"' + w.replace('"', "") + '"' for w in words[:32])
    now = time.time_ns()
    hl = view.half_life_s
    with view.reading():
        hits = view.search(fts, RECALL_POOL)
        found = view.peek_memories([mid for mid, _ in hits])
        matched: dict[str, float] = {}
        for mid, text_score in hits:
            m = found.get(mid)
            if m is not None:
                matched[mid] = max(text_score, 1e-6) * (0.5 + effective_strength(m, now, hl))
        spread: dict[str, float] = {}
        for e in view.edges_out_of(sorted(matched)):
            if e.weight > 0:
                spread[e.dst] = spread.get(e.dst, 0.0) + 0.5 * matched[e.src] * e.weight
        scores = dict(matched)
        for mid, s in spread.items():
            scores[mid] = scores.get(mid, 0.0) + s
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        out = []
        for mid, score in ranked[:limit]:
            m = view.get_memory(mid)
            if m is None:
                continue
            j = memory_json(m, hl)
            j["score"] = round(score, 6)
            j["matched"] = mid in matched
            out.append(j)
        return out


def export(view: GraphView) -> ExportStream:
    """The graph as ops that rebuild it exactly: every memory, then every edge (so edges find
    both ends), with every field, times included (``model.memory_op``).

    The ops describe one state the log passed through, the one after the stream's ``lsn``,
    read from a snapshot the view pins; writes go on meanwhile. The snapshot is released when
    the stream is exhausted or closed.
    """
    lsn, digest, snap = view.pin_snapshot()
    return ExportStream(lsn, digest, _snapshot_ops(snap))


def _snapshot_ops(snap: Snapshot) -> Generator[dict[str, Any], None, None]:
    try:
        for m in snap.iter_memories():
            yield memory_op(m)
        for e in snap.iter_edges():
            yield edge_op(e)
    finally:
        snap.close()
