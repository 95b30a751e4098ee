"""Histories (docs/DESIGN.md "Histories"): a recovery's first write starts a new history, and
nothing ever combines records of two histories.

The first test is issue 10's reproducer, run through the CLI as the issue runs it: before
histories, ``restore-pitr --repo --target-lsn=6`` after a recovery replayed the abandoned
history's incremental for LSN 3..5 and the new one's after it, a graph that never existed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engram.backup.catalog import read_catalog
from engram.backup.full import full_backup
from engram.backup.history import read_tree, tree_report
from engram.backup.incremental import incremental_backup
from engram.backup.pitr import Target, apply_log, choose_path, restore_pitr
from engram.backup.restore import restore
from engram.backup.validate import validate_backup
from engram.cli.main import app
from engram.datadir import read_identity
from engram.errors import ForeignLog
from engram.format import history as hist
from engram.graph import Engine
from engram.oplog.reader import list_segments, read_header

runner = CliRunner()


def ok(*args: str, env: dict[str, str]) -> Any:
    res = runner.invoke(app, list(args), env=env)
    assert res.exit_code == 0, (args, res.exit_code, res.stdout, res.stderr)
    return res


def ids(data_dir: Path) -> set[str]:
    with Engine.open(data_dir, create=False) as eng:
        return {m.id for m in eng.iter_memories()}


def state(data_dir: Path) -> tuple[int, str, set[str]]:
    with Engine.open(data_dir, create=False) as eng:
        return eng.last_lsn, eng.digest.hex, {m.id for m in eng.iter_memories()}


def test_the_issue_reproducer_gives_the_new_history(tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    repo.mkdir()
    env = {"ENGRAM_DATA_DIR": str(data)}
    ok("init", env=env)
    ok("put", "--id", "a", "--content", "base", env=env)
    ok("backup", "--full", f"--output={repo}/full.tar.zst", "--no-validate", env=env)
    ok("mark", "m", env=env)  # LSN 2
    for i in (1, 2, 3):  # LSN 3..5
        ok("put", "--id", f"old{i}", "--content", "old", env=env)
    ok(
        "backup",
        "--incremental",
        "--since-lsn=1",
        f"--output={repo}/inc-1.log",
        "--no-validate",
        env=env,
    )
    old = read_identity(data).history
    ok("restore-pitr", f"--repo={repo}", "--target-name=m", f"--output={data}", "--force", env=env)
    assert read_identity(data).history == old  # nothing of its own written yet
    for i in range(1, 6):  # LSN 3..7 again, on a new history
        ok("put", "--id", f"new{i}", "--content", "new", env=env)
    ident = read_identity(data)
    new = ident.lineage[-1]
    assert (new.parent, new.branch_lsn, new.command) == (old, 2, "restore-pitr")
    assert new.target == "restore point 'm' (LSN 2)"
    ok(
        "backup",
        "--incremental",
        "--since=5m",
        f"--output={repo}/inc-2.log",
        "--no-validate",
        env=env,
    )
    h2 = read_header(repo / "inc-2.log")
    assert h2["history"] == new.id and h2["parent"] == "inc-1.log"
    assert hist.header_lineage(h2) == ident.lineage
    # Every segment the data dir wrote after the branch names the new history.
    assert read_header(list_segments(data / "oplog")[-1][1])["history"] == new.id

    ok("restore-pitr", f"--repo={repo}", "--target-lsn=6", f"--output={tmp_path}/check", env=env)
    got = state(tmp_path / "check")
    assert got[2] == {"a", "new1", "new2", "new3", "new4"}  # the new history, nothing of old*
    restore_pitr(repo / "full.tar.zst", [repo / "inc-2.log"], Target(lsn=6), tmp_path / "ref")
    assert got == state(tmp_path / "ref")  # what the issue's "done when" compares with

    # --history chooses the abandoned one: its own records, never the new ones.
    ok(
        "restore-pitr",
        f"--repo={repo}",
        "--target-lsn=5",
        f"--history={old}",
        f"--output={tmp_path}/old",
        env=env,
    )
    assert ids(tmp_path / "old") == {"a", "old1", "old2", "old3"}

    # The tree: both histories, the backups on each, the newest marked.
    res = ok("history", f"--repo={repo}", "--json", env=env)
    tree = json.loads(res.stdout)
    assert tree["newest"] == new.id
    by_id = {h["id"]: h for h in tree["histories"]}
    assert [b["name"] for b in by_id[old]["backups"]] == ["full.tar.zst", "inc-1.log"]
    assert [b["name"] for b in by_id[new.id]["backups"]] == ["inc-2.log"]
    assert by_id[new.id]["parent"] == old and by_id[new.id]["branch_lsn"] == 2
    assert by_id[new.id]["began"] == {"command": "restore-pitr", "target": new.target}
    assert (repo / "histories" / f"{new.id}.json").is_file()
    text = ok("history", f"--repo={repo}", env=env).stdout
    assert new.id in text and "after LSN 2" in text and "(newest)" in text

    # The incremental after the recovery validates: chained on its own history's path.
    v = validate_backup(repo / "inc-2.log", level=3)
    assert v.ok, v.reason


def _repo_with_a_recovery(tmp_path: Path) -> dict[str, Any]:
    """src: a, m, old1..3 with a full and an incremental; a recovery to m; new1..5 after it."""
    src, repo = tmp_path / "src", tmp_path / "repo"
    repo.mkdir()
    with Engine.open(src) as eng:
        eng.apply([{"op": "create_memory", "id": "a", "content": "base"}])
        full_backup(eng, repo / "full.tar.zst")
        eng.apply([{"op": "mark", "name": "m"}])
        for i in (1, 2, 3):
            eng.apply([{"op": "create_memory", "id": f"old{i}", "content": "old"}])
        incremental_backup(eng, repo / "inc-1.log")
        old = eng.history
    c = choose_path(repo, Target(name="m"))
    restore_pitr(c.base, c.logs, Target(name="m"), src, force=True, lineage=c.lineage)
    with Engine.open(src) as eng:
        for i in range(1, 6):
            eng.apply([{"op": "create_memory", "id": f"new{i}", "content": "new"}])
        new = eng.history
        r = incremental_backup(eng, repo / "inc-2.log")  # no --since: continues the chain
    return {"src": src, "repo": repo, "old": old, "new": new, "inc2": r}


def test_an_incremental_after_a_recovery_starts_at_the_new_history(tmp_path: Path) -> None:
    r = _repo_with_a_recovery(tmp_path)
    # The newest backup on the new history's path is inc-1 up to the branch (LSN 2): the
    # first write after the recovery (LSN 3) is in the next incremental.
    assert (r["inc2"].from_lsn, r["inc2"].snapshot_lsn) == (3, 7)
    assert read_header(r["repo"] / "inc-2.log")["parent"] == "inc-1.log"
    assert validate_backup(r["repo"] / "inc-2.log", level=3).ok
    cat = read_catalog(r["repo"])
    assert {e.name: e.history for e in cat.entries} == {
        "full.tar.zst": r["old"],
        "inc-1.log": r["old"],
        "inc-2.log": r["new"],
    }
    tree = read_tree(r["repo"])
    assert tree.lineage(r["new"])[-1].parent == r["old"]
    report = tree_report(r["repo"], cat.entries)
    assert report["newest"] == r["new"] and not report["problems"]


def test_every_target_resolves_on_the_chosen_history(tmp_path: Path) -> None:
    r = _repo_with_a_recovery(tmp_path)
    repo, out = r["repo"], tmp_path / "out"
    want_new = {2: {"a"}, 3: {"a", "new1"}, 7: {"a", *(f"new{i}" for i in range(1, 6))}}
    for lsn, want in want_new.items():
        c = choose_path(repo, Target(lsn=lsn))
        restore_pitr(c.base, c.logs, Target(lsn=lsn), out, lineage=c.lineage)
        assert ids(out) == want, lsn
        shutil.rmtree(out)
    for lsn, want in {3: {"a", "old1"}, 5: {"a", "old1", "old2", "old3"}}.items():
        c = choose_path(repo, Target(lsn=lsn), r["old"])
        restore_pitr(c.base, c.logs, Target(lsn=lsn), out, lineage=c.lineage)
        assert ids(out) == want, lsn
        shutil.rmtree(out)
    # A directory holding both histories' logs, without --repo: the longest lineage is
    # followed and the abandoned history's records after the branch are never used.
    restore_pitr(repo / "full.tar.zst", [repo], Target(lsn=5), out)
    assert ids(out) == {"a", "new1", "new2", "new3"}


def test_apply_log_refuses_another_history_before_applying_anything(tmp_path: Path) -> None:
    r = _repo_with_a_recovery(tmp_path)
    repo = r["repo"]
    # A copy of the abandoned history at LSN 5 that wrote on: a third history.
    c = choose_path(repo, Target(lsn=5), r["old"])
    other = tmp_path / "other"
    restore_pitr(c.base, c.logs, Target(lsn=5), other, lineage=c.lineage)
    with Engine.open(other) as eng:
        eng.apply([{"op": "create_memory", "id": "third", "content": "x"}])
        third = eng.history
    before = state(other)
    seg_names = sorted(p.name for p in (other / "oplog").iterdir())
    with pytest.raises(ForeignLog) as ei:
        apply_log(other, [repo / "inc-2.log"], Target())
    assert r["new"] in ei.value.message and third in ei.value.message
    assert state(other) == before
    assert sorted(p.name for p in (other / "oplog").iterdir()) == seg_names


def test_apply_log_follows_a_history_from_a_restored_base(tmp_path: Path) -> None:
    """Scenario 1 after a recovery: restore the old full, apply every incremental in order:
    the data dir lands on the new history (the abandoned records are never applied)."""
    r = _repo_with_a_recovery(tmp_path)
    d = tmp_path / "restored"
    restore(r["repo"] / "full.tar.zst", d)
    apply_log(d, [r["repo"] / "inc-1.log", r["repo"] / "inc-2.log"], Target())
    assert ids(d) == {"a", *(f"new{i}" for i in range(1, 6))}
    ident = read_identity(d)
    assert ident.history == r["new"] and ident.recovered is not None
    assert [read_header(p)["history"] for _, p in list_segments(d / "oplog")][-1] == r["new"]
    # Its own first write starts yet another history, branching from the new one.
    with Engine.open(d) as eng:
        eng.apply([{"op": "create_memory", "id": "after", "content": "x"}])
        assert eng.lineage[-1].parent == r["new"] and eng.lineage[-1].branch_lsn == 7


def test_apply_log_of_the_whole_directory_follows_the_newest_history(tmp_path: Path) -> None:
    """docs/RUNBOOK.md scenario 1 gives apply-log the backup directory: the abandoned history's
    incremental is used up to the branch only, the newest history's after it."""
    r = _repo_with_a_recovery(tmp_path)
    d = tmp_path / "restored"
    restore(r["repo"] / "full.tar.zst", d)
    apply_log(d, [r["repo"]], Target())
    assert ids(d) == {"a", *(f"new{i}" for i in range(1, 6))}
    assert read_identity(d).history == r["new"]


def test_restore_pitr_latest_recovers_the_end_of_a_history(tmp_path: Path) -> None:
    """`restore-pitr --repo R --latest`: the last record of the newest history, or of the one
    --history names; a target beside it, or no --repo, is a usage error."""
    r = _repo_with_a_recovery(tmp_path)
    env: dict[str, str] = {}
    repo = str(r["repo"])
    ok("restore-pitr", f"--repo={repo}", "--latest", f"--output={tmp_path / 'newest'}", env=env)
    assert ids(tmp_path / "newest") == {"a", *(f"new{i}" for i in range(1, 6))}
    ok("restore-pitr", f"--repo={repo}", "--latest", f"--history={r['old']}",
       f"--output={tmp_path / 'old'}", env=env)
    assert ids(tmp_path / "old") == {"a", "old1", "old2", "old3"}
    both = runner.invoke(app, ["restore-pitr", f"--repo={repo}", "--latest", "--target-lsn=3",
                               f"--output={tmp_path / 'x'}"])
    alone = runner.invoke(app, ["restore-pitr", "--latest", f"--output={tmp_path / 'x'}"])
    assert (both.exit_code, alone.exit_code) == (2, 2) and not (tmp_path / "x").exists()


def test_a_crash_between_the_identity_and_the_segment_is_repaired(tmp_path: Path) -> None:
    """A new history is recorded in identity.json before its first segment exists: opening
    such a data dir starts the segment, so no record of the new history lands in the old one's
    segment."""
    d = tmp_path / "d"
    with Engine.open(d) as eng:
        eng.apply([{"op": "create_memory", "id": "a", "content": "x"}])
        eng.mark_recovered("restore", "test")
    ident = read_identity(d)
    new = hist.new_history(ident.history, 1, "restore", "test")
    from engram.datadir import write_identity

    write_identity(d, type(ident)(ident.database_id, ident.created_at, 1, (*ident.lineage, new)))
    with Engine.open(d) as eng:
        eng.apply([{"op": "create_memory", "id": "b", "content": "y"}])
    segs = list_segments(d / "oplog")
    assert read_header(segs[-1][1])["history"] == new.id
    assert segs[-1][0] == 2
    assert ids(d) == {"a", "b"}


def test_files_without_a_history_are_on_the_original_one(tmp_path: Path) -> None:
    assert hist.history_of({"database_id": "db"}) == "db"
    assert hist.header_lineage({"database_id": "db"}) == (hist.original("db"),)
    lin = (hist.original("db"), hist.History("h1", "db", 4, 1, "restore-pitr", "LSN 4"))
    assert hist.caps(lin) == {"db": 4, "h1": None}
    assert hist.owner(lin, 4).id == "db" and hist.owner(lin, 5).id == "h1"
    assert hist.agree(lin, (hist.original("db"),), 4)
    assert not hist.agree(lin, (hist.original("db"),), 5)
    data = hist.encode_history_file(lin[1], "db")
    assert hist.decode_history_file(data) == (lin[1], "db")
    with pytest.raises(ValueError):
        hist.decode_history_file(data.replace(b'"branch_lsn": 4', b'"branch_lsn": 5'))
