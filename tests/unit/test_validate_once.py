"""Validation proves each thing once (docs/DESIGN.md "Validation levels"): one read of the
archive, one check of the full-text index against the rows, one scan of the rows that both
checks them and recomputes the digest, and the read benchmark run beside SQLite's structure
check instead of after it — with every failure still found."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from engram.backup import rowcheck
from engram.backup.full import full_backup
from engram.backup.validate import validate_backup
from engram.backup.verify import render_text, verify_data_dir, warm_checks
from engram.graph import Engine, EngineConfig
from engram.procs import Resources
from engram.tiers import warm

TWO = Resources(scan_workers=2)
CFG = EngineConfig(checkpoint_interval=3600)


def build(root: Path) -> None:
    with Engine.open(root, CFG) as eng:
        eng.apply(
            [
                {"op": "create_memory", "id": f"m{i}", "content": f"alpha beta tag{i % 7}"}
                for i in range(300)
            ]
        )
        eng.apply([{"op": "create_edge", "src": f"m{i}", "dst": f"m{i + 1}"} for i in range(50)])


def damage_index(root: Path) -> None:
    """Take memory 1's words out of the full-text index, leaving its row: the index no
    longer matches the rows, which only FTS5's own check sees."""
    conn = sqlite3.connect(root / "warm" / "engram.db")
    content = conn.execute("SELECT content FROM memories WHERE rowid = 1").fetchone()[0]
    conn.execute(
        "INSERT INTO memories_fts(memories_fts, rowid, content) VALUES ('delete', 1, ?)",
        (content,),
    )
    conn.commit()
    conn.close()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    build(root)
    return root


def backup_of(store: Path, out: Path) -> Path:
    with Engine.open(store, CFG) as eng:
        full_backup(eng, out)
    return out


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often the full-text index is checked, the memory rows are scanned and the digest is
    recomputed by the engine, whoever does it (restore's path or verify's)."""
    seen: Counter[str] = Counter()

    def counted(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            seen[name] += 1
            return fn(*a, **kw)

        return wrapper

    monkeypatch.setattr(warm, "index_problem", counted("index", warm.index_problem))
    monkeypatch.setattr(warm_checks, "index_problem", counted("index", warm_checks.index_problem))
    monkeypatch.setattr(rowcheck, "scan", counted("row scan", rowcheck.scan))
    monkeypatch.setattr(
        Engine, "recompute_digest", counted("engine recompute", Engine.recompute_digest)
    )
    return seen


@pytest.mark.parametrize("resources", [TWO, Resources.low()], ids=["two", "low"])
def test_level_4_checks_the_index_once_and_scans_the_rows_once(
    store: Path, tmp_path: Path, calls: Counter[str], resources: Resources
) -> None:
    archive = backup_of(store, tmp_path / "full.tar.zst")
    rep = validate_backup(
        archive, level=4, bench_s=0.05, record=False, workdir=tmp_path, resources=resources
    )
    assert rep.ok, rep.reason
    assert calls == {"index": 1, "row scan": 1}
    assert [s.name for s in rep.steps] == [
        "structure",
        "checksums",
        "restore",
        "verify",
        "benchmark",
    ]
    assert "full-text index equal to the rows" in rep.steps[3].detail
    assert rep.benchmark is not None and rep.benchmark["ops"] > 0
    assert all(s.duration_s >= 0 for s in rep.steps)


def test_level_3_runs_no_benchmark(store: Path, tmp_path: Path, calls: Counter[str]) -> None:
    archive = backup_of(store, tmp_path / "full.tar.zst")
    rep = validate_backup(archive, level=3, record=False, workdir=tmp_path, resources=TWO)
    assert rep.ok, rep.reason
    assert [s.name for s in rep.steps][-1] == "verify"
    assert rep.benchmark is None
    assert calls == {"index": 1, "row scan": 1}


def test_a_damaged_index_fails_validation_in_the_backups_words(
    store: Path, tmp_path: Path, calls: Counter[str]
) -> None:
    damage_index(store)
    archive = backup_of(store, tmp_path / "full.tar.zst")
    rep = validate_backup(archive, level=4, bench_s=0.05, record=False, workdir=tmp_path)
    assert not rep.ok
    reason = rep.reason or ""
    assert reason.startswith("verify: the backup's full-text index does not match its rows (")
    assert "use another one" in reason
    assert "rebuild-index" not in reason  # the restore test's dir is gone; the backup is at fault
    assert rep.benchmark is None  # not recorded for a backup that failed verify
    assert calls["index"] == 1


def test_a_failing_benchmark_fails_validation_after_verify_passed(
    store: Path, tmp_path: Path
) -> None:
    archive = backup_of(store, tmp_path / "full.tar.zst")
    rep = validate_backup(archive, level=4, bench_s=0, record=False, workdir=tmp_path)
    assert not rep.ok
    assert [(s.name, s.ok) for s in rep.steps][-2:] == [("verify", True), ("benchmark", False)]
    assert rep.reason == "benchmark: --duration must be positive"


def test_beside_runs_while_the_structure_check_is_still_going(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The structure check waits for ``beside`` to have run: verify must call it before it
    waits for the structure check (else this waits out the guard and records False)."""
    ran = threading.Event()
    waited: list[bool] = []
    real = warm_checks.index_problem

    def gated(*a: Any, **kw: Any) -> Any:
        waited.append(ran.wait(60))
        return real(*a, **kw)

    monkeypatch.setattr(warm_checks, "index_problem", gated)
    rep = verify_data_dir(store, check_all=True, resources=TWO, beside=ran.set)
    assert waited == [True]
    assert rep.ok, render_text(rep)


def test_beside_runs_once_in_turn_and_not_for_a_missing_data_dir(
    store: Path, tmp_path: Path
) -> None:
    ran: list[int] = []
    low = verify_data_dir(
        store, check_all=True, resources=Resources.low(), beside=lambda: ran.append(1)
    )
    assert ran == [1] and low.ok
    gone = verify_data_dir(tmp_path / "nowhere", check_all=True, beside=lambda: ran.append(2))
    assert ran == [1] and not gone.ok


def test_report_names_the_index_problem_only_when_the_index_is_damaged(store: Path) -> None:
    assert verify_data_dir(store, check_all=True).index_problem is None
    damage_index(store)
    for resources in (TWO, Resources.low()):
        rep = verify_data_dir(store, check_all=True, resources=resources)
        assert rep.index_problem is not None
        assert any(p.location == warm_checks.FTS_LOCATION for p in rep.problems)
        assert "index_problem" not in rep.to_dict()  # the JSON is unchanged
    assert verify_data_dir(store, check_all=False).index_problem is None  # not checked
