"""The benchmarks run: each one in its tiny ``--quick`` mode, through ``bench/run_all.py``.

This proves that every figure of the issues is measured and printed as a goal line and that
the sanity checks hold. It never looks at a timing: on a shared 2-core machine a figure is a
report, not a test.
"""

from __future__ import annotations

import json
import os
import shutil
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
    "peers": [
        "restore to ready vs restic restore",
        "restore to ready vs borg extract",
        "full backup without validation vs borg create",
        "engram backup with its default validation vs borg create",
        "engram backup with its default validation vs --no-validate",
        "extrapolated restore of 100 GB of warm tier",
    ],
    "open": [
        "engram stats, log of",
        "engram query, log of",
    ],
    "crypt": [
        "full backup with --encrypt-to vs without",
        "restore with --identity (decrypt + restore) vs without",
    ],
    "s3": [
        "push of a",
        "pull of a",
        "engram backup --full to s3:// vs the same backup to a local file",
        "engram backup --full to s3:// vs local backup + aws s3 cp of it",
        "restore --repo s3://… --latest to ready vs aws s3 cp + engram restore --from",
    ],
    "verify": [
        "GET /v1/memories/{id} p99 while the server verifies a restore vs after",
        "POST /v1/memories p99 while the server verifies a restore vs after",
    ],
}
PEER_GOALS = {"restic": GOALS["peers"][:1], "borg": GOALS["peers"][1:4]}


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


def test_peers_absent_are_skipped_with_the_install_command(tmp_path: Path) -> None:
    """Without restic and borg on the PATH, bench_peers still measures engram and tar, and
    prints each peer's goals as SKIPPED with the command that installs it."""
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("tar", "zstd"):  # what the tar baseline needs, and nothing else
        found = shutil.which(tool)
        if found is not None:
            (path / tool).symlink_to(found)
    out = tmp_path / "peers.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / "bench_peers.py"), "--quick",
         "--workdir", str(tmp_path / "work"), "--json-out", str(out)],
        capture_output=True, text=True, timeout=280, env=dict(os.environ, PATH=str(path)),
    )
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-6000:]}"
    assert r.returncode == 0, log
    res = json.loads(out.read_text())
    assert res["checks_failed"] == [], log
    goals = {g["name"]: g for g in res["goals"]}
    for tool, wanted in PEER_GOALS.items():
        why = [s for s in res["skipped"] if s.startswith(f"{tool}: ")]
        assert why and "make bench-deps" in why[0], log
        for want in wanted:
            (name,) = [n for n in goals if want in n]
            assert goals[name]["measured"] is None, log
            lines = [ln.strip() for ln in r.stdout.splitlines() if f"goal: {name} " in ln]
            assert lines and all(ln.endswith("SKIPPED") for ln in lines), log
    # engram's own goals need no peer.
    for want in ("vs --no-validate", "extrapolated restore of 100 GB"):
        (name,) = [n for n in goals if want in n]
        assert goals[name]["measured"] is not None, log
    # tar, when installed, is still measured, and restic and borg are in no figure.
    medians = res["figures"]["medians"]
    assert set(medians) == {"engram"} | ({"tar"} if (path / "zstd").exists() else set()), log


def test_s3_without_the_aws_cli_is_skipped_with_the_install_command(tmp_path: Path) -> None:
    """Without the AWS CLI, bench_s3 still measures push, pull, the backups and the restores,
    prints the goals that compare with aws as SKIPPED with the command that installs it, and
    measures the one that needs no aws (a backup to the bucket vs to a local file)."""
    out = tmp_path / "s3.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / "bench_s3.py"), "--quick", "--aws", "none",
         "--workdir", str(tmp_path / "work"), "--json-out", str(out)],
        capture_output=True, text=True, timeout=280,
    )
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-6000:]}"
    assert r.returncode == 0, log
    res = json.loads(out.read_text())
    assert res["checks_failed"] == [], log
    assert any("make bench-deps" in s for s in res["skipped"]), log
    measured = {g["name"]: g["measured"] is not None for g in res["goals"]}
    assert list(measured.values()) == [False, False, True, False, False], log
    assert res["figures"]["push_mb_s"] and res["figures"]["pull_mb_s"], log
    medians = res["figures"]["cli_medians_s"]
    assert {"s3_backup", "local_backup", "s3_restore", "s3_restore_br"} <= set(medians), log
    assert not {"aws_up", "aws_down", "copy_restore"} & set(medians), log
