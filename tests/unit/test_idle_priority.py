"""Idle CPU priority for work that shares a machine with a busy server: ``procs.idle_priority``
lowers the calling thread (and what it starts) and puts it back; `engram backup` validates at
the backup's priority, `engram validate-backup --priority` chooses, and the resources that
priority gives (``procs.Resources``) are decided there and passed down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import engram.backup.validate as validate_mod
from engram.cli.main import app
from engram.graph import Engine, EngineConfig
from engram.procs import Resources, idle_priority

linux = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
runner = CliRunner()
CHILD_POLICY = "import os; print(os.sched_getscheduler(0))"


@linux
def test_idle_priority_lowers_this_thread_and_what_it_starts_then_restores() -> None:
    before = os.sched_getscheduler(0)
    assert before != os.SCHED_IDLE
    seen: dict[str, int] = {}
    with idle_priority():
        seen["here"] = os.sched_getscheduler(0)
        t = threading.Thread(target=lambda: seen.__setitem__("thread", os.sched_getscheduler(0)))
        t.start()
        t.join()
        out = subprocess.run([sys.executable, "-c", CHILD_POLICY], capture_output=True,
                             text=True, check=True)
        seen["child"] = int(out.stdout)
        seen["scan_workers"] = Resources.for_priority("low").scan_workers
    assert seen == {"here": os.SCHED_IDLE, "thread": os.SCHED_IDLE, "child": os.SCHED_IDLE,
                    "scan_workers": 1}  # at low priority a scan uses one core
    assert os.sched_getscheduler(0) == before  # put back
    with idle_priority(False):
        assert os.sched_getscheduler(0) == before


@linux
def test_idle_priority_restores_after_an_error() -> None:
    before = os.sched_getscheduler(0)
    with pytest.raises(RuntimeError), idle_priority():
        raise RuntimeError("boom")
    assert os.sched_getscheduler(0) == before


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    dd = tmp_path / "data"
    e = Engine.open(dd, EngineConfig(checkpoint_interval=3600))
    e.apply([{"op": "create_memory", "id": f"m{i}", "content": f"text {i}"} for i in range(5)])
    e.close()
    return dd


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[Resources | None]]:
    """The scheduling policy each validate_backup call ran under, and the resources it got."""
    policies: list[int] = []
    resources: list[Resources | None] = []
    real = validate_mod.validate_backup

    def spy(*a: Any, **k: Any) -> Any:
        policies.append(os.sched_getscheduler(0))
        resources.append(k.get("resources"))
        return real(*a, **k)

    monkeypatch.setattr(validate_mod, "validate_backup", spy)
    return policies, resources


@pytest.fixture
def policy_seen(calls: tuple[list[int], list[Resources | None]]) -> list[int]:
    return calls[0]


@pytest.fixture
def resources_seen(calls: tuple[list[int], list[Resources | None]]) -> list[Resources | None]:
    return calls[1]


@linux
def test_backup_validates_at_the_backups_priority(
    data_dir: Path,
    tmp_path: Path,
    policy_seen: list[int],
    resources_seen: list[Resources | None],
) -> None:
    bk = tmp_path / "bk"
    bk.mkdir()
    normal_policy = os.sched_getscheduler(0)

    def backup(*args: str) -> dict[str, Any]:
        r = runner.invoke(app, ["backup", f"--data-dir={data_dir}", "--level=3", "--json", *args])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        return dict(json.loads(r.stdout))

    low = backup("--full", "--priority=low", f"--output={bk / 'low.tar.zst'}")
    normal = backup("--full", f"--output={bk / 'normal.tar.zst'}")
    assert (low["priority"], low["validation"]["priority"]) == ("low", "low")
    assert (normal["priority"], normal["validation"]["priority"]) == ("normal", "normal")
    assert low["validation"]["ok"] and normal["validation"]["ok"]
    assert policy_seen == [os.SCHED_IDLE, normal_policy]
    assert resources_seen == [Resources.low(), Resources.normal()]
    assert os.sched_getscheduler(0) == normal_policy  # the test process is put back


@linux
def test_validate_backup_priority_flag(
    data_dir: Path,
    tmp_path: Path,
    policy_seen: list[int],
    resources_seen: list[Resources | None],
) -> None:
    arch = tmp_path / "b.tar.zst"
    r = runner.invoke(app, ["backup", f"--data-dir={data_dir}", "--full", f"--output={arch}",
                            "--no-validate"])
    assert r.exit_code == 0, r.stdout
    r = runner.invoke(app, ["validate-backup", str(arch), "--level=3", "--priority=low"])
    assert r.exit_code == 0 and "validated at low priority" in r.stdout, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "PASS"
    r = runner.invoke(app, ["validate-backup", str(arch), "--level=2", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["priority"] == "normal", r.stdout
    assert policy_seen == [os.SCHED_IDLE, os.sched_getscheduler(0)]
    assert resources_seen == [Resources.low(), Resources.normal()]
    r = runner.invoke(app, ["validate-backup", str(arch), "--priority=idle"])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --priority must be low or normal, got 'idle'"
