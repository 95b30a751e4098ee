"""The benchmarks run: each one in its tiny ``--quick`` mode, through ``bench/run_all.py``.

This proves that every figure of issues 2 and 3 is measured and printed as a goal line and that
the sanity checks hold. It never looks at a timing: on a shared 2-core machine a figure is a
report, not a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

# Each goal of the issues' "Performance" sections, as a fragment of its goal line's name.
GOALS = {
    "core": [
        "durable POST /v1/batch throughput",
        "POST /v1/memories, 32 clients",
        "POST /v1/memories p99, 32 clients",
        "POST /v1/memories vs SQLite one-txn-per-write (HTTP",
        "engine writes vs SQLite one-txn-per-write (in-process",
        "GET /v1/memories/{id}",
        "recovery replay rate",
    ],
    "backup": [
        "writer stall while the cut is taken, p99 (small store)",
        "writer stall while the cut is taken, p99 (large store)",
        "full backup throughput vs tar+zstd",
        "write p99 during a full backup vs without",
        "restore throughput vs tar -x, extraction phase",
        "restore throughput vs tar -x, whole restore",
        "PITR replay vs raw SQLite executemany upserts",
        "PITR replay rate",
        "incremental of 1,000 records (small store)",
        "incremental of 1,000 records (large store)",
        "validate-backup level 3 vs restore + quick_check",
    ],
    "repo": [
        "engram backups --repo over",
        "base selection for restore-pitr --repo over",
        "restore --repo --latest's choice over",
        "--target-name's base selection vs the same target by LSN",
    ],
    "open": [
        "engram stats, log of",
        "engram query, log of",
    ],
}


@pytest.mark.parametrize("bench", sorted(GOALS))
def test_benchmark_runs_in_quick_mode(bench: str, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--only", bench,
         "--workdir", str(tmp_path / "work"), "--json-out", str(out)],
        capture_output=True, text=True, timeout=280,
    )
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-6000:]}"
    assert r.returncode == 0, log
    assert "Traceback" not in r.stdout + r.stderr, log
    res = json.loads(out.read_text())[bench]
    assert res["checks_failed"] == [], log
    names = [g["name"] for g in res["goals"]]
    for want in GOALS[bench]:
        found = [g for g in res["goals"] if want in g["name"]]
        assert found, f"no goal line for {want!r} in {names}\n{log}"
        # A goal is unmeasured only when its baseline is skipped, and then it says why.
        assert all(g["measured"] is not None for g in found) or res["skipped"], log
    # Every goal is printed as "goal: ..., measured: ... (met|NOT met)" for a reader.
    lines = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("goal: ")]
    assert len(lines) >= 2 * len(GOALS[bench]), log  # as measured, and again in the summary
    assert all(ln.rstrip().endswith(("(met)", "(NOT met)", "SKIPPED")) for ln in lines), log
    # The work dir is removed unless --keep.
    assert not any((tmp_path / "work").iterdir()), log
