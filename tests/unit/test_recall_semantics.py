"""recall's ranking: independent of the limit, one step of spreading, the same in every process,
finite scores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engram.graph import Engine, EngineConfig
from engram.query import recall

# No decay (half-life 0): scores are exact and do not depend on when they are computed.
NO_DECAY = EngineConfig(half_life_s=0.0, checkpoint_interval=3600)


@pytest.fixture
def eng(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.open(tmp_path / "d", NO_DECAY)
    yield e
    e.close()


def ranking(e: Engine, query: str, limit: int) -> list[tuple[str, float]]:
    return [(r["id"], r["score"]) for r in recall(e, query, limit)]


def test_the_first_k_results_of_any_limit_are_the_same_ranking(eng: Engine) -> None:
    # Short documents match "fox" best (bm25) but are weak; one long, strong document matches
    # less well as text and ranks first once strength counts. A limit that only kept the best
    # few text matches would never see it.
    ops = [
        {"op": "create_memory", "id": f"weak{i:02d}", "content": "fox " + "x " * i,
         "strength": 0.0}
        for i in range(12)
    ]
    ops.append({"op": "create_memory", "id": "strong", "strength": 1.0,
                "content": "fox " + " ".join(f"w{i}" for i in range(7))})
    ops += [{"op": "create_memory", "id": f"other{i}", "content": f"nothing {i}"}
            for i in range(40)]  # so that "fox" is a rare word with clear text scores
    ops.append({"op": "create_edge", "src": "weak00", "dst": "other0", "weight": 0.5})
    eng.apply(ops)
    full = ranking(eng, "fox", 1000)
    text = eng.warm.search('"fox"', 1000)
    assert text[0][0] != "strong" and text[-1][1] > 0.1  # strength, not text, puts it first
    assert full[0][0] == "strong"
    scores = [s for _, s in full]
    assert scores == sorted(scores, reverse=True)
    for k in range(1, len(full) + 1):
        assert ranking(eng, "fox", k) == full[:k], k


def test_ties_go_by_id(eng: Engine) -> None:
    eng.apply([{"op": "create_memory", "id": mid, "content": "same words", "strength": 0.5}
               for mid in ("c", "a", "d", "b")])
    assert [mid for mid, _ in ranking(eng, "same", 10)] == ["a", "b", "c", "d"]
    assert [mid for mid, _ in ranking(eng, "same", 2)] == ["a", "b"]


def test_spreading_is_one_step_from_the_scores_before_spreading(eng: Engine) -> None:
    """A hand-computed graph: a and b match and point at each other, b points at c, a at d
    with a negative weight. Each match passes 0.5 x its own matched score x weight, once."""
    eng.apply([
        {"op": "create_memory", "id": "a", "content": "apple tree", "strength": 0.2},
        {"op": "create_memory", "id": "b", "content": "apple pie with cream", "strength": 1.0},
        {"op": "create_memory", "id": "c", "content": "cream", "strength": 0.9},
        {"op": "create_memory", "id": "d", "content": "dough", "strength": 0.9},
        {"op": "create_edge", "src": "a", "dst": "b", "weight": 2.0},
        {"op": "create_edge", "src": "b", "dst": "a", "weight": 0.5},
        {"op": "create_edge", "src": "b", "dst": "c", "weight": 4.0},
        {"op": "create_edge", "src": "a", "dst": "d", "weight": -3.0},
        # Documents without "apple", so that it is a rare word with a clear text score.
        *({"op": "create_memory", "id": f"z{i}", "content": f"filler {i}"} for i in range(10)),
    ])
    text = dict(eng.warm.search('"apple"', 10))
    assert set(text) == {"a", "b"} and min(text.values()) > 0.1
    base_a = text["a"] * (0.5 + 0.2)
    base_b = text["b"] * (0.5 + 1.0)
    want = {
        "a": base_a + 0.5 * base_b * 0.5,
        "b": base_b + 0.5 * base_a * 2.0,
        "c": 0.5 * base_b * 4.0,  # from b's matched score only, not from what a gave b
    }
    got = {r["id"]: r for r in recall(eng, "apple", 10)}
    assert set(got) == set(want)  # d: a negative weight passes nothing
    for mid, score in want.items():
        assert got[mid]["score"] == round(score, 6), mid
    assert got["a"]["matched"] and got["b"]["matched"] and not got["c"]["matched"]


_RECALL = """
import json, sys
from engram.graph import Engine, EngineConfig
from engram.query import recall
with Engine.open(sys.argv[1], EngineConfig(half_life_s=0.0), readonly=True) as e:
    print(json.dumps([(r["id"], r["score"]) for r in recall(e, "ring", 1000)]))
"""


def test_recall_is_the_same_under_any_hash_seed(tmp_path: Path) -> None:
    # A ring of matches (each passes score to the next) and a star: with spreading that read
    # scores already raised by other matches, the result depended on a set's iteration order,
    # which PYTHONHASHSEED changes.
    ring = [f"r{i}" for i in range(8)]
    ops: list[dict] = [
        {"op": "create_memory", "id": mid, "content": "ring " + "y " * i, "strength": i / 8}
        for i, mid in enumerate(ring)
    ]
    ops += [{"op": "create_edge", "src": a, "dst": b, "weight": 1.0 + i}
            for i, (a, b) in enumerate(zip(ring, ring[1:] + ring[:1], strict=True))]
    ops += [{"op": "create_edge", "src": "r0", "dst": mid, "weight": 0.3} for mid in ring[2:]]
    ops += [{"op": "create_memory", "content": f"filler {i}"} for i in range(20)]
    with Engine.open(tmp_path / "d", NO_DECAY) as e:
        e.apply(ops)
        here = ranking(e, "ring", 1000)
    outs = []
    for seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", _RECALL, str(tmp_path / "d")],
            capture_output=True, env=env, timeout=60, check=True,
        )
        outs.append([tuple(x) for x in json.loads(proc.stdout)])
    assert all(o == outs[0] for o in outs), outs
    assert outs[0] == here and len(here) == len(ring)


def test_scores_are_finite_at_the_extreme_weights(eng: Engine) -> None:
    hub = [{"op": "create_memory", "id": "hub", "content": "target", "strength": 1.0}]
    srcs = [{"op": "create_memory", "id": f"s{i:03d}", "content": "big", "strength": 1.0}
            for i in range(200)]
    edges = [{"op": "create_edge", "src": f"s{i:03d}", "dst": "hub", "weight": 1e6}
             for i in range(200)]
    edges += [{"op": "create_edge", "src": "hub", "dst": f"s{i:03d}", "weight": -1e6}
              for i in range(200)]
    eng.apply(hub + srcs + edges)
    res = recall(eng, "big", 1000)
    assert res[0]["id"] == "hub" and len(res) == 201
    assert all(isinstance(r["score"], float) and math.isfinite(r["score"]) for r in res)
    json.dumps(res, allow_nan=False)  # what the HTTP route does with them: no NaN, no inf
