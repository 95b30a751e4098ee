"""Backups are never replaced, and a killed backup's temp file does not stay (issue 8, items 1
and 7; docs/FORMAT.md "Write order").

Two backups racing for one name — held at a barrier until both are writing, so both passed the
early "already exists" check and the race is decided where it counts, at publish — end with
exactly one winner: the loser fails with "already exists", leaves nothing, and never removes
the winner's files, which are intact and validate. The same with real `engram backup`
processes. A temp file whose backup was SIGKILLed is removed by the next backup into that
directory, with a warning naming it; one whose backup is alive is left alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engram.backup.full import BackupResult, full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.validate import validate_backup
from engram.errors import EngramError, Refused
from engram.graph import Engine, EngineConfig
from engram.storage import BackupStore, LocalBackupStore, Ref
from engram.storage.faults import FaultyStore

ENGRAM = str(Path(sys.executable).with_name("engram"))


def _engine(root: Path, n: int = 60) -> Engine:
    e = Engine.open(root, EngineConfig(checkpoint_interval=3600))
    for i in range(n):
        e.apply([{"op": "create_memory", "id": f"m{i}", "content": os.urandom(800).hex()}])
    e.checkpoint()
    e.apply([{"op": "activate", "id": "m1"}])
    return e


def _held_store(directory: Path, barrier: threading.Barrier) -> BackupStore:
    """The local store of ``directory``, whose temp objects wait at ``barrier`` at their first
    write: both backups are then writing their temp files, so both got past the early check."""
    waited: list[bool] = []

    def hold() -> None:
        if not waited:
            waited.append(True)
            barrier.wait(timeout=30)

    return FaultyStore(LocalBackupStore(directory), on_write=hold)


def _race(directory: Path, run: Callable[[BackupStore], BackupResult]) -> list[Any]:
    """Run two backups into ``directory`` at once; their results or errors."""
    barrier = threading.Barrier(2)
    out: list[Any] = [None, None]

    def one(k: int) -> None:
        try:
            out[k] = run(_held_store(directory, barrier))
        except EngramError as e:
            out[k] = e

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _one_winner(results: list[Any], path: Path) -> BackupResult:
    wins = [r for r in results if isinstance(r, BackupResult)]
    losses = [r for r in results if isinstance(r, EngramError)]
    assert len(wins) == 1 and len(losses) == 1, results
    err = losses[0]
    assert isinstance(err, Refused) and err.exit_code != 0
    assert err.message == (
        f"{path} already exists; choose a new name (backups are never overwritten)"
    )
    return wins[0]


def _check_winner(win: BackupResult, path: Path, level: int = 3) -> None:
    """The winner's three files are there, agree with its result, and validate; nothing else
    (no temp file of the loser) is in the directory."""
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name, path.name + ".sha256", path.name + ".info.json"]
    )
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == win.sha256 and len(data) == win.size
    assert path.with_name(path.name + ".sha256").read_text() == f"{win.sha256}  {path.name}\n"
    info = json.loads(path.with_name(path.name + ".info.json").read_text())
    assert info["sha256"] == win.sha256 and info["path"] == path.name
    v = validate_backup(path, level=level, record=False)
    assert v.ok, v.verdict


@pytest.mark.parametrize("ext", [".tar.zst", ".tar.gz"])
def test_two_full_backups_to_one_name(tmp_path: Path, ext: str) -> None:
    e = _engine(tmp_path / "data")
    try:
        bk = tmp_path / "bk"
        bk.mkdir()
        path = bk / f"full{ext}"
        results = _race(bk, lambda s: full_backup(e, Ref(s, path.name)))
        win = _one_winner(results, path)
        assert e.cuts.held == 0
    finally:
        e.close()
    _check_winner(win, path)


def test_two_incrementals_to_one_name(tmp_path: Path) -> None:
    e = _engine(tmp_path / "data")
    try:
        bk = tmp_path / "bk"
        bk.mkdir()
        path = bk / "inc.log"
        results = _race(bk, lambda s: incremental_backup(e, Ref(s, path.name), since_lsn=1))
        win = _one_winner(results, path)
    finally:
        e.close()
    _check_winner(win, path, level=2)  # checksums and records (a restore needs a full one)


def test_a_stray_sidecar_or_entry_is_never_replaced(tmp_path: Path) -> None:
    """A name whose sidecar or catalog entry exists (without the archive) is refused, and the
    stray file is left as it was."""
    e = _engine(tmp_path / "data", n=5)
    try:
        for stray in ("a.tar.zst.sha256", "b.tar.zst.info.json"):
            bk = tmp_path / stray.split(".")[0]
            bk.mkdir()
            (bk / stray).write_text("someone else's\n")
            path = bk / (stray.split(".")[0] + ".tar.zst")
            with pytest.raises(Refused, match="already exists"):
                full_backup(e, path)
            assert sorted(os.listdir(bk)) == [stray]
            assert (bk / stray).read_text() == "someone else's\n"
    finally:
        e.close()


def _engram(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    return subprocess.Popen([ENGRAM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_two_offline_cli_backups_to_one_name(tmp_path: Path) -> None:
    """Two `engram backup --full` processes (each on its own copy of the data dir, which one
    process at a time can hold) to one --output: one exits 0, the other 2 with one line."""
    _engine(tmp_path / "a", n=400).close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    bk = tmp_path / "bk"
    bk.mkdir()
    out = bk / "full-20251024.tar.zst"
    procs = [
        _engram("backup", "--full", f"--output={out}", f"--data-dir={tmp_path / d}",
                "--no-validate", "--json")
        for d in ("a", "b")
    ]
    done = [(p.wait(120), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in done)
    assert codes == [0, 3], done
    (win,) = [json.loads(o) for rc, o, _ in done if rc == 0]
    (err,) = [e for rc, _, e in done if rc != 0]
    assert err.strip().splitlines() == [
        f"error: {out} already exists; choose a new name (backups are never overwritten)"
    ]
    res = BackupResult(**{k: v for k, v in win.items() if k != "catalog"})
    _check_winner(res, out)


# -- temp files of killed backups ----------------------------------------------------------


def _stopped_backup(data: Path, out: Path) -> subprocess.Popen[str]:
    """A real full backup of ``data`` to ``out``, stopped mid-write (its temp file exists and
    holds some of the archive), as a process the test can SIGKILL."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from engram.backup.full import full_backup
        from engram.graph import Engine, EngineConfig
        e = Engine.open(Path({str(data)!r}), EngineConfig(checkpoint_interval=3600))
        def stop(done, total):
            print("writing", flush=True)
            time.sleep(600)
        full_backup(e, Path({str(out)!r}), progress=stop)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "writing"
    return p


def test_a_killed_backups_temp_file_is_removed_by_the_next_backup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _engine(tmp_path / "killed", n=300).close()
    _engine(tmp_path / "live", n=300).close()
    bk = tmp_path / "bk"
    bk.mkdir()
    killed = _stopped_backup(tmp_path / "killed", bk / "full-1.tar.zst")
    live = _stopped_backup(tmp_path / "live", bk / "full-2.tar.zst")
    try:
        temps = sorted(n for n in os.listdir(bk) if ".tmp-" in n)
        stale = [n for n in temps if n.startswith(f".full-1.tar.zst.tmp-{killed.pid}-")]
        alive = [n for n in temps if n.startswith(f".full-2.tar.zst.tmp-{live.pid}-")]
        assert len(stale) == 1 and len(alive) == 1 and len(temps) == 2, temps
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        e = _engine(tmp_path / "data", n=3)
        try:
            with caplog.at_level(logging.WARNING, logger="engram"):
                full_backup(e, bk / "full-3.tar.zst")
        finally:
            e.close()
        left = sorted(os.listdir(bk))
        assert stale[0] not in left, "the killed backup's temp file is still there"
        assert alive[0] in left, "the live backup's temp file was removed"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert f"removed {stale[0]} left by a killed backup (pid {killed.pid})" in warnings
        assert not any(alive[0] in w for w in warnings)
        assert {"full-3.tar.zst", "full-3.tar.zst.sha256", "full-3.tar.zst.info.json"} <= set(
            left
        )
    finally:
        for p in (killed, live):
            if p.poll() is None:
                p.kill()
                p.wait()
