"""The read benchmark (validation level 4, `engram benchmark`): bounded by the operations it
is asked for as well as by time, read-only, and refusing bounds it cannot keep."""

from __future__ import annotations

from pathlib import Path

import pytest

from engram.backup import readbench
from engram.errors import EngramError
from engram.graph import Engine


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    with Engine.open(root) as eng:
        eng.apply(
            [
                {"op": "create_memory", "id": f"m{i}", "content": f"alpha beta memory {i}"}
                for i in range(50)
            ]
        )
        eng.apply([{"op": "create_edge", "src": f"m{i}", "dst": f"m{i + 1}"} for i in range(49)])
    return root


def test_stops_after_the_operations_asked_for(data_dir: Path) -> None:
    r = readbench.run_benchmark(data_dir, duration_s=600.0, max_ops=300)
    assert r.ops == 300 == sum(r.by_kind.values())
    assert r.memories == 50
    assert 0 < r.p50_ms <= r.p95_ms <= r.p99_ms
    assert r.duration_s < 600.0


def test_validation_benchmark_makes_enough_operations_for_a_p99(data_dir: Path) -> None:
    r = readbench.validation_benchmark(data_dir, max_s=600.0)
    assert r.ops == readbench.VALIDATION_OPS >= 1000
    assert set(r.by_kind) == {"lookup", "neighbors", "recall"} and min(r.by_kind.values()) > 0


def test_bad_bounds_are_refused(data_dir: Path) -> None:
    with pytest.raises(EngramError, match="at least one operation"):
        readbench.run_benchmark(data_dir, 1.0, max_ops=0)
    with pytest.raises(EngramError, match="--duration must be positive"):
        readbench.run_benchmark(data_dir, 0.0)
