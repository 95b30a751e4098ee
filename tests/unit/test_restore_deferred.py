"""A restore of a validated backup is ready once every hash is checked; the digest recompute
and the index check run in the next server that opens it (``engram.verifying``)."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from pathlib import Path

import pytest

from engram.backup.catalog import read_info, update_info
from engram.backup.full import full_backup
from engram.backup.restore import restore
from engram.backup.validate import validate_backup
from engram.backup.verify import verify_data_dir
from engram.errors import UsageError
from engram.graph import Engine, EngineConfig
from engram.verifying import (
    MARKER,
    CheckNotStarted,
    DamagedMarker,
    Marker,
    Verification,
    VerificationFailed,
    at_open,
    complete_by_verify,
    read_marker,
    write_marker,
)

CFG = EngineConfig(checkpoint_interval=3600)


def _backup(tmp_path: Path, name: str = "full.tar.zst", validate: int | None = 3) -> Path:
    src, bk = tmp_path / "src", tmp_path / "bk"
    bk.mkdir(exist_ok=True)
    with Engine.open(src, CFG) as e:
        if e.last_lsn == 0:
            e.apply(
                [{"op": "create_memory", "id": f"m{i}", "content": f"c {i}"} for i in range(50)]
            )
            e.apply([{"op": "create_edge", "src": "m1", "dst": "m2"}])
        full_backup(e, bk / name)
    if validate is not None:
        assert validate_backup(bk / name, level=validate).ok
    return bk / name


@pytest.fixture
def validated(tmp_path: Path) -> Path:
    return _backup(tmp_path)


def _open_server(path: Path) -> Engine:
    """Open ``path`` as a server does: a pending check starts."""
    return Engine.open(path, CFG, create=False, verify_pending=True)


def _wait(eng: Engine) -> None:
    assert eng.verification is not None
    assert eng.verification.done.wait(30)


def test_a_validated_backup_is_restored_with_the_check_deferred(
    tmp_path: Path, validated: Path
) -> None:
    res = restore(validated, tmp_path / "to")
    assert res.verification == "deferred"
    assert "passed validation at level 3" in res.verify_why
    m = read_marker(tmp_path / "to")
    assert m is not None
    assert (m.lsn, m.digest, m.backup) == (res.snapshot_lsn, res.digest, validated.name)
    assert m.backup_sha256 == read_info(validated)["sha256"]  # type: ignore[index]
    assert res.to_json()["verification"] == "deferred"


def test_before_ready_recomputes_first_and_leaves_no_marker(
    tmp_path: Path, validated: Path
) -> None:
    res = restore(validated, tmp_path / "to", verify="before-ready")
    assert (res.verification, res.verify_why) == ("before-ready", "--verify=before-ready")
    assert not (tmp_path / "to" / MARKER).exists()


def test_a_bad_verify_mode_is_a_usage_error(tmp_path: Path, validated: Path) -> None:
    with pytest.raises(UsageError, match="before-ready"):
        restore(validated, tmp_path / "to", verify="later")
    assert not (tmp_path / "to").exists()


@pytest.mark.parametrize(
    "spoil, why",
    [
        (lambda p: p.with_name(p.name + ".info.json").unlink(), "no catalog entry"),
        (lambda p: p.with_name(p.name + ".sha256").unlink(), "no sidecar"),
        (lambda p: update_info(p, validation=None), "'not validated'"),
        (
            lambda p: update_info(p, validation={"status": "failed", "ok": False, "level": 3}),
            "'failed'",
        ),
        (lambda p: update_info(p, validation={"status": "pending", "level": 3}), "'pending'"),
        (
            lambda p: update_info(p, validation={"status": "passed", "ok": True, "level": 2}),
            "level 2",
        ),
        (lambda p: _edit_entry(p, sha256="0" * 64), "cannot be trusted"),
    ],
)
def test_anything_short_of_a_passed_validation_recomputes_before_ready(
    tmp_path: Path, validated: Path, spoil: object, why: str
) -> None:
    spoil(validated)  # type: ignore[operator]
    res = restore(validated, tmp_path / "to")
    assert res.verification == "before-ready"
    assert why in res.verify_why
    assert not (tmp_path / "to" / MARKER).exists()


def _edit_entry(backup: Path, **fields: object) -> None:
    """Change fields of the entry without fixing its checksum (damage)."""
    p = backup.with_name(backup.name + ".info.json")
    d = json.loads(p.read_text())
    d.update(fields)
    p.write_text(json.dumps(d))


def test_the_next_server_verifies_while_serving_then_clears_the_marker(
    tmp_path: Path, validated: Path
) -> None:
    to = tmp_path / "to"
    res = restore(validated, to)
    with _open_server(to) as eng:
        assert eng.verification is not None
        assert eng.verification.lsn == res.snapshot_lsn
        eng.apply([{"op": "create_memory", "id": "new", "content": "while verifying"}])
        _wait(eng)
        assert eng.health() == ("ready", None)
        assert eng.status()["verification"]["state"] == "verified"
    assert not (to / MARKER).exists()
    with Engine.open(to, CFG, create=False, verify_pending=True) as eng:
        assert eng.verification is None


def _tamper(root: Path) -> None:
    """Change one row's content behind the engine's back (the digest no longer matches)."""
    con = sqlite3.connect(root / "warm" / "engram.db")
    with con:
        con.execute("UPDATE memories SET content = 'tampered' WHERE id = 'm7'")
    con.close()


def test_a_mismatch_stops_writes_and_is_reported(
    tmp_path: Path, validated: Path, caplog: pytest.LogCaptureFixture
) -> None:
    to = tmp_path / "to"
    restore(validated, to)
    _tamper(to)
    with caplog.at_level(logging.ERROR, logger="engram"), _open_server(to) as eng:
        _wait(eng)
        state, reason = eng.health()
        assert state == "verification_failed"
        assert reason is not None and "does not match full.tar.zst" in reason
        with pytest.raises(VerificationFailed) as err:
            eng.apply([{"op": "create_memory", "content": "refused"}])
        assert err.value.http_status == 503
        assert err.value.code == "verification_failed"
        assert eng.status()["verification"]["state"] == "failed"
        assert eng.get_memory("m1") is not None  # reads go on
    assert "VERIFICATION FAILED" in caplog.text
    assert (to / MARKER).exists()  # still pending: the next start checks again


def test_a_digest_at_the_marker_lsn_other_than_the_backups_fails_at_once(
    tmp_path: Path, validated: Path
) -> None:
    to = tmp_path / "to"
    restore(validated, to)
    m = read_marker(to)
    assert m is not None
    other = Marker(m.lsn, "1" * 64, m.backup, m.backup_sha256, 3, "", "")
    write_marker(to, other)
    with _open_server(to) as eng:
        _wait(eng)
        assert eng.health()[0] == "verification_failed"


def test_a_one_shot_open_says_the_check_is_pending(
    tmp_path: Path, validated: Path, caplog: pytest.LogCaptureFixture
) -> None:
    to = tmp_path / "to"
    restore(validated, to)
    with caplog.at_level(logging.WARNING, logger="engram"), Engine.open(to, CFG) as eng:
        assert eng.verification is not None
        assert eng.verification.state == "pending"
        assert eng.health() == ("verifying", None)
        eng.apply([{"op": "create_memory", "id": "x", "content": "one-shot write"}])
    assert "is pending" in caplog.text and "engram verify --check-all" in caplog.text
    # Written to since: the server checks at its own LSN against the digest stored there.
    with _open_server(to) as eng:
        _wait(eng)
        assert eng.health() == ("ready", None)
    assert not (to / MARKER).exists()


def test_verify_check_all_finishes_the_pending_check(tmp_path: Path, validated: Path) -> None:
    to = tmp_path / "to"
    res = restore(validated, to)
    rep = verify_data_dir(to, check_all=True)
    assert rep.ok
    assert complete_by_verify(to, rep.applied_lsn, "2" * 64) is None  # not the backup's digest
    assert (to / MARKER).exists()
    said = complete_by_verify(to, rep.applied_lsn, rep.digest_recomputed)
    assert said is not None and MARKER in said
    assert not (to / MARKER).exists()
    assert complete_by_verify(to, res.snapshot_lsn, res.digest) is None  # nothing pending


def test_a_damaged_marker_is_refused_by_the_reader_and_still_checked(
    tmp_path: Path, validated: Path
) -> None:
    to = tmp_path / "to"
    restore(validated, to)
    p = to / MARKER
    d = json.loads(p.read_text())
    d["lsn"] += 1
    p.write_text(json.dumps(d))
    with pytest.raises(DamagedMarker, match="checksum"):
        read_marker(to)
    p.write_text("not json")
    with pytest.raises(DamagedMarker, match="damaged"):
        read_marker(to)
    with _open_server(to) as eng:  # checked against the digest the data dir stores
        _wait(eng)
        assert eng.health() == ("ready", None)
    assert not p.exists()


def test_closing_while_verifying_keeps_the_marker(tmp_path: Path, validated: Path) -> None:
    to = tmp_path / "to"
    restore(validated, to)
    eng = _open_server(to)
    eng.close()
    v = eng.verification
    assert v is not None
    assert v.state in ("verifying", "verified")
    assert (to / MARKER).exists() == (v.state == "verifying")


def test_the_helper_pins_before_the_first_write(tmp_path: Path, validated: Path) -> None:
    to = tmp_path / "to"
    res = restore(validated, to)
    with _open_server(to) as eng:
        # Committed to the warm tier at once: a check that had not pinned yet would see it.
        eng.apply([{"op": "create_memory", "id": "new", "content": "right after open"}])
        eng.checkpoint()
        _wait(eng)
        v = eng.verification
        assert v is not None
        assert v.lsn == res.snapshot_lsn < eng.last_lsn
        assert v.state == "verified", v.reason
    assert not (to / MARKER).exists()


def test_the_check_runs_in_a_helper_process_that_ends_with_it(
    tmp_path: Path, validated: Path
) -> None:
    import os

    to = tmp_path / "to"
    restore(validated, to)
    eng = _open_server(to)
    v = eng.verification
    assert v is not None
    pid = v.pid
    assert pid is not None and pid != os.getpid()
    eng.close()
    assert v.pid is None
    with pytest.raises(ProcessLookupError):  # reaped: ended with the engine
        os.kill(pid, 0)


# A helper that pins, as the real one does, then dies before its result.
_DIES = (
    "import os, signal, sys; from engram.verifying import helper_main; "
    "helper_main(sys.argv[1:], after_pin=lambda: os.kill(os.getpid(), signal.SIGKILL))"
)


def _verification(root: Path) -> Verification:
    return Verification(root, read_marker(root), None)


def test_a_killed_helper_is_a_failed_check_that_keeps_the_marker(
    tmp_path: Path, validated: Path, caplog: pytest.LogCaptureFixture
) -> None:
    to = tmp_path / "to"
    res = restore(validated, to)
    v = _verification(to)
    with caplog.at_level(logging.ERROR, logger="engram"):
        db = to / "warm" / "engram.db"
        v.start(db, [sys.executable, "-c", _DIES, str(db)])
        assert v.lsn == res.snapshot_lsn
        assert v.done.wait(30)
    assert v.state == "failed"
    assert v.reason is not None
    assert "did not run" in v.reason and "killed by signal 9" in v.reason
    assert "restart engram" in v.reason
    with pytest.raises(VerificationFailed):
        v.check_writable()
    assert "VERIFICATION FAILED" in caplog.text
    assert (to / MARKER).exists()


@pytest.mark.parametrize(
    "command, why",
    [
        (["/nonexistent/engram-helper"], "could not start: No such file"),
        ([sys.executable, "-c", "pass"], "did not pin the data to check: pid"),
        ([sys.executable, "-c", "import sys; sys.exit('no database here')"], "no database here"),
        ([sys.executable, "-c", 'print(\'{"error": "unreadable"}\')'], "unreadable"),
    ],
)
def test_a_helper_that_cannot_start_refuses_writes_until_a_check_passes(
    tmp_path: Path, validated: Path, command: list[str], why: str
) -> None:
    to = tmp_path / "to"
    restore(validated, to)
    with pytest.raises(CheckNotStarted, match="restart engram to check again") as err:
        _verification(to).start(to / "warm" / "engram.db", command)
    assert why in err.value.message
    v = at_open(to, to / "warm" / "engram.db", run=True, command=command)
    assert v is not None and v.state == "failed" and v.done.is_set()
    assert v.reason is not None and why in v.reason
    with pytest.raises(VerificationFailed):
        v.check_writable()
    assert (to / MARKER).exists()
    with _open_server(to) as eng:  # the next start checks again, with the real helper
        _wait(eng)
        assert eng.health() == ("ready", None)
    assert not (to / MARKER).exists()


def test_an_index_that_does_not_match_the_rows_fails_the_check(
    tmp_path: Path, validated: Path
) -> None:
    to = tmp_path / "to"
    restore(validated, to)
    con = sqlite3.connect(to / "warm" / "engram.db")
    with con:  # an index entry for no row: the rows, and so the digest, are untouched
        con.execute("INSERT INTO memories_fts(rowid, content) VALUES (999999, 'ghost')")
    con.close()
    with _open_server(to) as eng:
        _wait(eng)
        state, reason = eng.health()
        assert state == "verification_failed"
        assert reason is not None and "the full-text index" in reason
    assert (to / MARKER).exists()
