"""Resources are a value decided where a command starts (``procs.Resources``) and passed down:
the validation's restore test and verify, a restore's digest recompute and a PITR's use the
cores they are given, whatever the priority of the thread that runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from engram.backup import rowscan
from engram.backup.full import full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.pitr import Target, restore_pitr
from engram.backup.restore import extract_backup, open_and_check
from engram.backup.validate import validate_backup
from engram.graph import Engine, EngineConfig
from engram.procs import MAX_SCAN_WORKERS, Resources, usable_cores

TWO = Resources(scan_workers=2)


def test_resources_for_each_priority() -> None:
    low = Resources.for_priority("low", cpu_share=0.5)
    assert (low.scan_workers, low.idle, low.cpu_share) == (1, True, 0.5)
    assert Resources.low() == Resources(scan_workers=1, idle=True, cpu_share=None)
    normal = Resources.for_priority("normal")
    assert normal == Resources.normal()
    assert (normal.idle, normal.cpu_share) == (False, None)
    assert normal.scan_workers == max(1, min(usable_cores(), MAX_SCAN_WORKERS))
    with pytest.raises(ValueError, match="low or normal"):
        Resources.for_priority("idle")
    with pytest.raises(ValueError, match="at least 1"):
        Resources(scan_workers=0)
    with pytest.raises(AttributeError):  # a value: frozen
        normal.idle = True  # type: ignore[misc]


@pytest.fixture
def helpers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The module of every scan helper process started; row scans split from 10 rows on."""
    started: list[str] = []
    real = rowscan.subprocess.Popen
    monkeypatch.setattr(rowscan, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(
        rowscan.subprocess, "Popen", lambda argv, **kw: started.append(argv[2]) or real(argv, **kw)
    )
    return started


@pytest.fixture
def backups(tmp_path: Path) -> tuple[Path, Path]:
    """A full backup of 60 memories and an incremental of 20 more after it."""
    bk = tmp_path / "bk"
    bk.mkdir()
    with Engine.open(tmp_path / "data", EngineConfig(checkpoint_interval=3600)) as e:
        e.apply([{"op": "create_memory", "id": f"m{i}", "content": f"c {i}"} for i in range(60)])
        full = bk / "full.tar.zst"
        full_backup(e, full)
        e.apply([{"op": "create_memory", "id": f"n{i}", "content": f"d {i}"} for i in range(20)])
        inc = bk / "inc.log"
        incremental_backup(e, inc, since_lsn=e.last_lsn - 19)
    return full, inc


def test_restore_recompute_uses_the_resources_given(
    tmp_path: Path, backups: tuple[Path, Path], helpers: list[str]
) -> None:
    full, _ = backups
    for n, resources in enumerate((TWO, Resources.low())):
        staging = tmp_path / f"staging{n}"
        staging.mkdir()
        manifest, _ = extract_backup(full, staging, durable=False)
        open_and_check(staging, manifest, resources=resources).close()
    assert helpers == [rowscan.MODULE]  # two workers: one helper; one worker: none


def test_validation_uses_the_resources_given(
    tmp_path: Path, backups: tuple[Path, Path], helpers: list[str]
) -> None:
    full, inc = backups
    for path in (full, inc):
        helpers.clear()
        assert validate_backup(path, level=3, record=False, resources=Resources.low()).ok
        assert helpers == []
        assert validate_backup(path, level=3, record=False, resources=TWO).ok
        assert helpers.count("engram.backup.rowcheck") == 1  # verify's row checks


def test_pitr_recompute_uses_the_resources_given(
    tmp_path: Path, backups: tuple[Path, Path], helpers: list[str]
) -> None:
    full, _ = backups
    # Replaying nothing leaves nothing uncommitted: the recompute reads the committed file.
    target = Target(lsn=60)
    restore_pitr(full, [], target, tmp_path / "low", durable=False, resources=Resources.low())
    assert helpers == []
    restore_pitr(full, [], target, tmp_path / "two", durable=False, resources=TWO)
    assert helpers == [rowscan.MODULE]
