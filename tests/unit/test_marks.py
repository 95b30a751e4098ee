"""Named restore points (issue 8, item 9): a name is used once in a data dir's history and means
the LSN of its marker record; PITR stops right after the transaction holding it.

- a second `engram mark` with a used name is refused (Conflict, exit 1) naming the LSN and time
  of the first, after a restart, a crash (recovery replays the marker), apply-log and PITR too;
- the runbook's sequence (`engram mark before-migration`, `backup --full`, incrementals) is
  recoverable by name through `--repo` and `--base-backup`, replaying nothing;
- a name below the base's snapshot is refused naming both LSNs;
- a data dir written before marks were kept gets them from its log on first open.
(Through a server, 409: tests/integration/test_marks_server.py.)
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engram.backup.catalog import read_info, replace_info
from engram.backup.full import full_backup
from engram.backup.pitr import Target, apply_log, choose_from_repo, restore_pitr
from engram.cli.main import app
from engram.errors import Conflict, UsageError
from engram.graph import Engine, EngineConfig
from engram.model import ns_to_iso

CFG = EngineConfig(checkpoint_interval=3600)
runner = CliRunner()


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


def ok(*args: str) -> Any:
    res = cli(*args)
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr)
    return res


def fails(code: int, *args: str) -> str:
    res = cli(*args)
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return str(lines[0])


def put(e: Engine, prefix: str, n: int) -> None:
    for i in range(n):
        e.apply([{"op": "create_memory", "id": f"{prefix}{i}", "content": f"{prefix} {i}"}])


def mark(e: Engine, name: str) -> tuple[int, int]:
    res = e.apply([{"op": "mark", "name": name}])
    return res.lsn, e.last_ts


def refused(e: Engine, name: str, lsn: int, ts: int) -> Conflict:
    with pytest.raises(Conflict) as ei:
        e.apply([{"op": "mark", "name": name}])
    msg = ei.value.message
    assert f"LSN {lsn}" in msg and ns_to_iso(ts) in msg and repr(name) in msg, msg
    assert ei.value.http_status == 409 and ei.value.exit_code == 1
    return ei.value


# -- uniqueness ------------------------------------------------------------------------------------


def test_a_used_name_is_refused_with_its_lsn_and_time(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "d", CFG) as e:
        put(e, "m", 2)
        lsn, ts = mark(e, "before-migration")
        put(e, "n", 2)
        last = e.last_lsn
        refused(e, "before-migration", lsn, ts)
        assert e.last_lsn == last, "a refused mark writes nothing"
        assert e.get_mark("before-migration") == (lsn, ts)
        with pytest.raises(Conflict, match="named twice in this batch"):
            e.apply([{"op": "mark", "name": "x"}, {"op": "mark", "name": "x"}])
        assert e.get_mark("x") is None and e.last_lsn == last
        mark(e, "other")  # other names are still free
    with Engine.open(tmp_path / "d", CFG) as e:  # after a restart (committed)
        refused(e, "before-migration", lsn, ts)


CRASHER = textwrap.dedent(
    """
    import os, sys
    from engram.graph import Engine, EngineConfig
    e = Engine.open(sys.argv[1], EngineConfig(checkpoint_interval=3600))
    r = e.apply([{"op": "mark", "name": "p"}])
    print(r.lsn, e.last_ts, flush=True)
    os._exit(0)  # no checkpoint: the marker is only in the log
    """
)


def test_a_mark_replayed_by_recovery_is_still_taken(tmp_path: Path) -> None:
    d = tmp_path / "d"
    with Engine.open(d, CFG) as e:
        put(e, "m", 3)
    p = subprocess.run([sys.executable, "-c", CRASHER, str(d)], capture_output=True, text=True,
                       timeout=60, check=True)
    lsn, ts = map(int, p.stdout.split())
    with Engine.open(d, CFG) as e:
        assert e.checkpoint_lsn == lsn  # recovery replayed it
        refused(e, "p", lsn, ts)


def test_the_cli_refuses_a_used_name_with_exit_1(tmp_path: Path) -> None:
    dd = f"--data-dir={tmp_path / 'd'}"
    ok("init", dd)
    out = json.loads(ok("mark", "before-migration", dd, "--json").stdout)
    line = fails(1, "mark", "before-migration", dd)
    assert "already exists" in line and f"LSN {out['lsn']}" in line


# -- the runbook's sequence ------------------------------------------------------------------------


def _runbook(root: Path) -> dict[str, Any]:
    """`engram mark before-migration`, `backup --full`, writes, incrementals (through the CLI,
    on a data dir no server holds)."""
    d, repo = root / "d", root / "repo"
    repo.mkdir()
    dd = f"--data-dir={d}"
    ok("init", dd)
    for i in range(5):
        ok("put", f"--id=m{i}", f"--content=memory {i}", dd)
    at = json.loads(ok("mark", "before-migration", dd, "--json").stdout)["lsn"]
    ok("backup", "--full", f"--output={repo / 'full.tar.zst'}", "--no-validate", dd)
    for i in range(3):
        ok("put", f"--id=after{i}", "--content=migrated", dd)
    ok("mark", "after-migration", dd)
    ok("backup", "--incremental", f"--output={repo / 'inc-1.log'}", "--no-validate", dd)
    ok("delete", "--id=m0", dd)
    ok("backup", "--incremental", f"--output={repo / 'inc-2.log'}", "--no-validate", dd)
    with Engine.open(d, CFG, readonly=True) as e:
        after = e.get_mark("after-migration")
    assert after is not None
    return {"d": d, "repo": repo, "at": at, "after": after[0]}


@pytest.fixture(scope="module")
def runbook(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _runbook(tmp_path_factory.mktemp("runbook"))


def _pitr(*args: str) -> dict[str, Any]:
    return dict(json.loads(ok("restore-pitr", *args, "--json").stdout))


def _ids(d: Path) -> set[str]:
    with Engine.open(d, CFG, create=False) as e:
        return {m.id for m in e.iter_memories()}


def test_the_runbook_mark_is_found_through_repo(runbook: dict[str, Any], tmp_path: Path) -> None:
    repo, at = runbook["repo"], runbook["at"]
    assert read_info(repo / "full.tar.zst")["marks"]["before-migration"]["lsn"] == at  # type: ignore[index]
    res = _pitr(f"--repo={repo}", "--target-name=before-migration", f"--output={tmp_path / 'o'}")
    assert res["base"].endswith("full.tar.zst") and res["logs"] == []
    assert res["reached_lsn"] == res["base_lsn"] == at and res["records"] == 0
    assert _ids(tmp_path / "o") == {f"m{i}" for i in range(5)}
    # The same LSN by number chooses the same base and lands in the same place.
    base, logs, _ = choose_from_repo(repo, Target(lsn=at))
    assert (base.name, logs) == ("full.tar.zst", [])


def test_the_runbook_mark_is_found_in_the_base(runbook: dict[str, Any], tmp_path: Path) -> None:
    repo, at = runbook["repo"], runbook["at"]
    res = _pitr(f"--base-backup={repo / 'full.tar.zst'}", f"--operation-log={repo}",
                "--target-name=before-migration", f"--output={tmp_path / 'o'}")
    assert res["reached_lsn"] == at and res["records"] == 0
    assert "before-migration" in res["target"]
    # Without any log, too: the base alone is the answer.
    res = _pitr(f"--base-backup={repo / 'full.tar.zst'}", "--target-name=before-migration",
                f"--output={tmp_path / 'o2'}")
    assert res["reached_lsn"] == at


def test_a_name_means_the_same_lsn_through_repo_and_base(runbook: dict[str, Any],
                                                         tmp_path: Path) -> None:
    repo, after = runbook["repo"], runbook["after"]
    a = _pitr(f"--repo={repo}", "--target-name=after-migration", f"--output={tmp_path / 'a'}")
    b = _pitr(f"--base-backup={repo / 'full.tar.zst'}", f"--operation-log={repo}",
              "--target-name=after-migration", f"--output={tmp_path / 'b'}")
    assert a["reached_lsn"] == b["reached_lsn"] == after
    assert a["digest"] == b["digest"]
    assert "m0" in _ids(tmp_path / "a") and "after2" in _ids(tmp_path / "a")


def test_an_incremental_entry_records_the_marks_in_its_range(runbook: dict[str, Any]) -> None:
    repo, after = runbook["repo"], runbook["after"]
    inc1, inc2 = read_info(repo / "inc-1.log"), read_info(repo / "inc-2.log")
    assert inc1 is not None and inc2 is not None
    assert set(inc1["marks"]) == {"after-migration"}  # not the one before its range
    assert inc1["marks"]["after-migration"]["lsn"] == after
    assert inc2["marks"] == {}


def _copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_name_resolves_from_the_catalog_without_reading_the_incrementals(
    runbook: dict[str, Any], tmp_path: Path
) -> None:
    """inc-2's records are damaged (same size, so its entry is still trusted): a name resolved
    from the catalog never reads them, and the target's path does not include inc-2."""
    repo = _copy_repo(runbook["repo"], tmp_path / "repo")
    inc2 = repo / "inc-2.log"
    raw = bytearray(inc2.read_bytes())
    raw[-5] ^= 0xFF
    inc2.write_bytes(bytes(raw))
    base, logs, _ = choose_from_repo(repo, Target(name="after-migration"))
    assert (base.name, [p.name for p in logs]) == ("full.tar.zst", ["inc-1.log"])


def test_an_entry_without_marks_is_scanned(runbook: dict[str, Any], tmp_path: Path) -> None:
    """An incremental's entry from before entries kept marks (or rebuilt from its file) has no
    ``marks``: its records are scanned for the name instead."""
    repo = _copy_repo(runbook["repo"], tmp_path / "repo")
    for name in ("inc-1.log", "inc-2.log"):
        info = read_info(repo / name)
        assert info is not None
        del info["marks"]
        replace_info(repo / name, info)
    base, logs, _ = choose_from_repo(repo, Target(name="after-migration"))
    assert (base.name, [p.name for p in logs]) == ("full.tar.zst", ["inc-1.log"])
    res = _pitr(f"--repo={repo}", "--target-name=after-migration", f"--output={tmp_path / 'o'}")
    assert res["reached_lsn"] == runbook["after"]
    with pytest.raises(UsageError, match="no restore point named 'nowhere'"):
        choose_from_repo(repo, Target(name="nowhere"))


def test_a_mark_inside_the_base_is_refused(tmp_path: Path) -> None:
    d, repo = tmp_path / "d", tmp_path / "repo"
    repo.mkdir()
    with Engine.open(d, CFG) as e:
        lsn, _ = mark(e, "early")
        put(e, "m", 3)
        full_backup(e, repo / "full.tar.zst")
        s = e.last_lsn
    line = fails(2, "restore-pitr", f"--base-backup={repo / 'full.tar.zst'}",
                 "--target-name=early", f"--output={tmp_path / 'o'}")
    assert "inside the base backup" in line and "use an older base" in line
    assert f"LSN {lsn} " in line and f"LSN {s} " in line
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="no full backup"):  # --repo: no base old enough
        choose_from_repo(repo, Target(name="early"))


# -- every replay path keeps the table -------------------------------------------------------------


def test_apply_log_and_pitr_keep_the_marks(runbook: dict[str, Any], tmp_path: Path) -> None:
    repo, at, after = runbook["repo"], runbook["at"], runbook["after"]
    restore_pitr(repo / "full.tar.zst", [], Target(lsn=at), tmp_path / "o")
    apply_log(tmp_path / "o", [repo / "inc-1.log", repo / "inc-2.log"], Target())
    restore_pitr(repo / "full.tar.zst", [repo], Target(name="after-migration"), tmp_path / "p")
    for d in ("o", "p"):
        with Engine.open(tmp_path / d, CFG, create=False) as e:
            assert e.get_mark("before-migration") is not None
            assert e.get_mark("after-migration") is not None
            assert e.get_mark("after-migration")[0] == after  # type: ignore[index]
            refused(e, "after-migration", *e.get_mark("after-migration"))  # type: ignore[misc]


def test_a_name_the_data_dir_is_past_is_refused_by_apply_log(runbook: dict[str, Any],
                                                             tmp_path: Path) -> None:
    repo, at = runbook["repo"], runbook["at"]
    restore_pitr(repo / "full.tar.zst", [repo], Target(lsn=runbook["after"] + 1), tmp_path / "o")
    with pytest.raises(UsageError, match="restore an older backup") as ei:
        apply_log(tmp_path / "o", [repo], Target(name="before-migration"))
    assert f"LSN {at} " in ei.value.message


# -- a data dir from before the table --------------------------------------------------------------


def _forget_marks(d: Path) -> None:
    """Make ``d`` look like a data dir written before marks were kept."""
    conn = sqlite3.connect(d / "warm" / "engram.db")
    try:
        conn.execute("DROP TABLE marks")
        conn.execute("DELETE FROM meta WHERE key = 'marks_kept'")
        conn.commit()
    finally:
        conn.close()


def test_an_older_data_dir_gets_its_marks_from_its_log(tmp_path: Path) -> None:
    d = tmp_path / "d"
    with Engine.open(d, CFG) as e:
        put(e, "m", 2)
        a = mark(e, "a")
        e.apply([{"op": "create_memory", "id": "x", "content": "x"}, {"op": "mark", "name": "b"},
                 {"op": "create_memory", "id": "y", "content": "y"}])
        b = (e.last_lsn - 1, e.last_ts)
    _forget_marks(d)
    # A marker after the warm tier's LSN too (recovery replays it): written by a process that
    # dies before its checkpoint.
    p = subprocess.run([sys.executable, "-c", CRASHER, str(d)], capture_output=True, text=True,
                       timeout=60, check=True)
    c = tuple(map(int, p.stdout.split()))
    with sqlite3.connect(d / "warm" / "engram.db") as conn:  # p is in the log only
        assert conn.execute("SELECT 1 FROM marks WHERE name = 'p'").fetchone() is None
    _forget_marks(d)
    with Engine.open(d, CFG) as e:
        assert e.get_mark("a") == a and e.get_mark("b") == b and e.get_mark("p") == c
        refused(e, "a", *a)
        refused(e, "p", *c)  # type: ignore[arg-type]
    with Engine.open(d, CFG) as e:  # once: the table is now kept
        assert e.warm.marks_kept and e.get_mark("b") == b


def test_a_name_marked_twice_before_means_its_first_marker(tmp_path: Path) -> None:
    """Older data dirs may hold a name twice (it was allowed): the first marker keeps it, in
    the filled table and in PITR's scan of the logs alike."""
    d = tmp_path / "d"
    with Engine.open(d, CFG) as e:
        put(e, "m", 2)
        full_backup(e, tmp_path / "full.tar.zst")
        first = mark(e, "twice")
        put(e, "n", 2)
        e.warm.conn.execute("DELETE FROM marks")  # as if the first were never recorded
        second = mark(e, "twice")
        assert second[0] > first[0]
        put(e, "o", 1)
    _forget_marks(d)
    with Engine.open(d, CFG) as e:
        assert e.get_mark("twice") == first
    res = restore_pitr(tmp_path / "full.tar.zst", [d / "oplog"], Target(name="twice"),
                       tmp_path / "o")
    assert res.reached_lsn == first[0]
