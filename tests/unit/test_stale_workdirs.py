"""Leftovers of killed runs are removed by the next run (issue 8, item 7).

A restore's staging dir beside its target and a validation's work dir in $TMPDIR each hold a
full copy of a database. Each is held by its owner (an flock); a real process that made one the
way restore and validation do is killed with SIGKILL, and the next run of the command removes
it and says so, while the dir of a live run is left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engram.backup.full import full_backup
from engram.cli.main import app
from engram.graph import Engine, EngineConfig


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    e = Engine.open(tmp_path / "data", EngineConfig(checkpoint_interval=3600), create=True)
    try:
        for i in range(20):
            e.apply([{"op": "create_memory", "id": f"m{i}", "content": f"memory {i}"}])
        out = tmp_path / "full.tar.zst"
        full_backup(e, out)
    finally:
        e.close()
    return out


def _holder(code: str) -> tuple[subprocess.Popen[str], Path]:
    """A process that makes a work dir as the commands do, fills it and waits."""
    head = "import sys, time\nfrom pathlib import Path\n"
    tail = '(p / "engram.db").write_bytes(b"x" * 100000)\nprint(p, flush=True)\ntime.sleep(60)\n'
    prog = head + textwrap.dedent(code) + tail
    proc = subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, "the holder did not start"
    return proc, Path(line)


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_killed_restores_staging_dir_is_removed_by_the_next_restore(
    tmp_path: Path, archive: Path
) -> None:
    target = tmp_path / "restored"
    make = f"""
        from engram.backup.restore import staging_dir
        p = staging_dir(Path({str(target)!r}), "restore")
        """
    dead, dead_dir = _holder(make)
    live, live_dir = _holder(make.replace('"restore")', '"restore-pitr")'))
    try:
        _kill(dead)
        assert dead_dir.is_dir() and dead_dir.name.startswith(".restored.restore-")
        res = CliRunner().invoke(app, ["restore", "--from", str(archive), "--to", str(target)])
        assert res.exit_code == 0, res.output
        assert f"removed {dead_dir}, the staging dir of a restore that was killed" in res.stderr
        assert not os.path.lexists(dead_dir)
        assert live_dir.is_dir() and str(live_dir) not in res.stderr  # its owner still runs
        assert (target / "identity.json").exists()
    finally:
        if live.poll() is None:
            _kill(live)


def test_a_killed_validations_work_dir_is_removed_by_the_next_validation(
    tmp_path: Path, archive: Path
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    make = f"""
        from engram.backup.validate import _workdir
        p, owner = _workdir(Path({str(tmp)!r}))
        """
    dead, dead_dir = _holder(make)
    live, live_dir = _holder(make)
    try:
        _kill(dead)
        env = {**os.environ, "TMPDIR": str(tmp)}
        res = subprocess.run(
            [sys.executable, "-m", "engram.cli", "validate-backup", str(archive), "--level", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        assert f"removed {dead_dir}, the work dir of a validation that was killed" in res.stderr
        assert not os.path.lexists(dead_dir)
        assert live_dir.is_dir()
        assert sorted(p.name for p in tmp.iterdir()) == [live_dir.name]  # its own is gone too
    finally:
        if live.poll() is None:
            _kill(live)
