"""A directory of backups is a repository (issue 10, item 3): listed from its catalog with every
problem flagged, the newest intact full backup chosen (falling back past a damaged or failed
one, saying why), names relative to the repository so that a copy works anywhere, sidecars in
``sha256sum`` format, and one rule for an archive without its sidecar.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engram.backup.catalog import read_info, replace_info, update_info
from engram.backup.full import full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.pitr import Target, choose_from_repo, restore_pitr
from engram.backup.repository import (
    DAMAGED,
    FILE_MISSING,
    NO_ENTRY,
    UNKNOWN,
    choose_fulls,
    list_backups,
    restore_from_repo,
)
from engram.backup.restore import restore, sidecar_absent
from engram.backup.validate import validate_backup
from engram.errors import BadArchive, RestoreError, UsageError
from engram.format.manifest import decode_sidecar, encode_sidecar
from engram.graph import Engine, EngineConfig

CFG = EngineConfig(checkpoint_interval=3600)
HEX = "ab" * 32


def _write(e: Engine, n: int, tag: str) -> None:
    for i in range(n):
        e.apply([{"op": "create_memory", "id": f"{tag}{i}", "content": f"{tag} memory {i}"}])


def _verdict(ok: bool) -> dict[str, Any]:
    return {
        "status": "passed" if ok else "failed",
        "ok": ok,
        "level": 4,
        "reason": None if ok else "restore: the backup is inconsistent",
        "at": "2025-10-24T00:00:00.000000Z",
        "warnings": [],
    }


@pytest.fixture
def repo(tmp_path: Path) -> dict[str, Any]:
    """full-1 (passed), inc-1, full-2 (not validated), inc-2, full-3 (newest): LSNs 3, 5, 7."""
    r = tmp_path / "repo"
    r.mkdir()
    with Engine.open(tmp_path / "data", CFG, create=True) as e:
        _write(e, 3, "a")
        full_backup(e, r / "full-1.tar.zst")
        _write(e, 2, "b")
        incremental_backup(e, r / "inc-1.log")
        full_backup(e, r / "full-2.tar.zst")
        digests = {"full-2": e.digest.hex}
        _write(e, 2, "c")
        incremental_backup(e, r / "inc-2.log")
        full_backup(e, r / "full-3.tar.zst")
    update_info(r / "full-1.tar.zst", validation=_verdict(True))
    return {"repo": r, "digests": digests, "tmp": tmp_path}


def _by_name(r: Path) -> dict[str, Any]:
    return {b.name: b for b in list_backups(r).backups}


# -- the sidecar ---------------------------------------------------------------------------------


def test_sidecar_is_in_sha256sum_format_and_bare_hex_still_reads() -> None:
    assert encode_sidecar(HEX, "full-1.tar.zst") == f"{HEX}  full-1.tar.zst\n".encode()
    assert encode_sidecar(HEX, "sub/x.log") == f"{HEX}  x.log\n".encode()
    # A name sha256sum would escape is escaped the same way.
    assert encode_sidecar(HEX, "a\\b\nc") == f"\\{HEX}  a\\\\b\\nc\n".encode()
    for text in (f"{HEX}\n", f"{HEX}  x\n", f"{HEX} *x\n", f"\\{HEX}  a\\\\b\n", HEX.upper()):
        assert decode_sidecar(text.encode(), "x.sha256") == HEX
    with pytest.raises(BadArchive, match="x.sha256 does not hold a sha256"):
        decode_sidecar(b"not a digest  x\n", "x.sha256")


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs GNU sha256sum")
def test_sha256sum_checks_every_sidecar_in_the_repository(repo: dict[str, Any]) -> None:
    r: Path = repo["repo"]
    sides = sorted(p.name for p in r.glob("*.sha256"))
    assert len(sides) == 5
    for side in sides:
        name = side.removesuffix(".sha256")
        want = hashlib.sha256((r / name).read_bytes()).hexdigest()
        assert (r / side).read_text() == f"{want}  {name}\n"
    ok = subprocess.run(["sha256sum", "-c", *sides], cwd=r, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count(": OK") == 5, ok.stdout + ok.stderr
    data = bytearray((r / "inc-1.log").read_bytes())
    data[-1] ^= 1
    (r / "inc-1.log").write_bytes(bytes(data))
    bad = subprocess.run(["sha256sum", "-c", "inc-1.log.sha256"], cwd=r, capture_output=True)
    assert bad.returncode == 1


# -- entries name nothing outside the repository -------------------------------------------------


def test_entries_hold_names_relative_to_the_repository(repo: dict[str, Any]) -> None:
    r: Path = repo["repo"]
    for name in ("full-1.tar.zst", "inc-1.log"):
        info = read_info(r / name)
        assert info is not None
        assert (info["path"], info["sidecar"]) == (name, name + ".sha256")


def test_a_copied_repository_restores_as_it_is(repo: dict[str, Any]) -> None:
    r, tmp = repo["repo"], repo["tmp"]
    # An entry written before names were relative (an absolute path elsewhere) still reads.
    info = read_info(r / "full-2.tar.zst")
    assert info is not None
    info |= {"path": "/elsewhere/full-2.tar.zst", "sidecar": "/elsewhere/full-2.tar.zst.sha256"}
    replace_info(r / "full-2.tar.zst", info)
    copy = tmp / "offsite" / "engram"
    shutil.copytree(r, copy)
    shutil.rmtree(r)  # nothing of the original is left to be found by a stored path
    listing = list_backups(copy)
    assert [b.name for b in listing.backups if b.flags != ["unvalidated"]] == ["full-1.tar.zst"]
    got = restore_from_repo(copy, tmp / "restored")
    assert got.backup == "full-3.tar.zst" and got.result.snapshot_lsn == 7
    assert got.result.archive == str(copy / "full-3.tar.zst")
    base, logs, _ = choose_from_repo(copy, Target(lsn=6))
    assert base == copy / "full-2.tar.zst" and logs == [copy / "inc-2.log"]
    res = restore_pitr(base, logs, Target(lsn=6), tmp / "pitr")
    assert res.reached_lsn == 6


# -- the listing ----------------------------------------------------------------------------------


def test_listing_describes_every_backup(repo: dict[str, Any]) -> None:
    listing = list_backups(repo["repo"])
    got = [(b.name, b.kind, b.from_lsn, b.to_lsn, b.validation) for b in listing.backups]
    assert got == [
        ("full-1.tar.zst", "full", 1, 3, "passed"),
        ("full-2.tar.zst", "full", 1, 5, "not validated"),  # a full before an incremental
        ("inc-1.log", "incremental", 4, 5, "not validated"),  # that ends where it does
        ("full-3.tar.zst", "full", 1, 7, "not validated"),
        ("inc-2.log", "incremental", 6, 7, "not validated"),
    ]
    b = {x.name: x for x in listing.backups}
    assert b["inc-1.log"].parent == "full-1.tar.zst" and b["inc-2.log"].parent == "inc-1.log"
    assert b["full-1.tar.zst"].size == (repo["repo"] / "full-1.tar.zst").stat().st_size
    assert all(x.sidecar and x.usable and x.problem is None for x in listing.backups)
    assert b["full-1.tar.zst"].flags == [] and b["inc-1.log"].flags == ["unvalidated"]
    j = listing.to_json()
    assert j["count"] == 5 and j["backups"][0]["id"] == "full-1.tar.zst"
    assert j["backups"][0]["age_s"] >= 0 and j["backups"][0]["to_time"].endswith("Z")
    json.dumps(j)  # plain JSON


def test_listing_flags_damaged_pending_failed_and_orphans(repo: dict[str, Any]) -> None:
    r: Path = repo["repo"]
    update_info(r / "full-2.tar.zst", validation=_verdict(False))
    update_info(r / "inc-2.log", validation={"status": "pending", "level": 4, "at": "x"})
    # A flipped field in an entry: its checksum no longer matches.
    entry = r / "full-3.tar.zst.info.json"
    entry.write_text(entry.read_text().replace('"snapshot_lsn": 7', '"snapshot_lsn": 8'))
    (r / "inc-1.log.info.json").rename(r / "stray.log.info.json")  # no entry / no file
    (r / "full-1.tar.zst.sha256").unlink()
    b = _by_name(r)
    assert (
        b["full-2.tar.zst"].flags == ["failed"]
        and "failed validation" in b["full-2.tar.zst"].why_not()
    )
    assert b["inc-2.log"].flags == ["pending"] and "pending" in b["inc-2.log"].why_not()
    f3 = b["full-3.tar.zst"]
    assert f3.flags == [DAMAGED] and f3.validation == UNKNOWN and not f3.usable
    assert "its checksum does not match" in (f3.problem or "")
    assert f3.to_lsn == 7  # what the file's own header says, not the damaged entry
    assert b["inc-1.log"].flags == [NO_ENTRY] and b["inc-1.log"].to_lsn == 5
    assert b["stray.log"].flags == [FILE_MISSING, "no sidecar"]
    assert b["full-1.tar.zst"].flags == ["no sidecar"] and b["full-1.tar.zst"].usable


def test_a_foreign_log_beside_the_backups_is_not_listed(repo: dict[str, Any]) -> None:
    """A server's own log kept in the repository is no backup; an engram log whose header was
    destroyed still is one (it has a sidecar), and is flagged, not hidden."""
    r: Path = repo["repo"]
    (r / "server.log").write_text("2026-11-29 08:00:00 INFO started\n")
    (r / "empty.log").write_bytes(b"")
    (r / "inc-1.log.info.json").unlink()
    raw = bytearray((r / "inc-1.log").read_bytes())
    raw[:8] = b"XXXXXXXX"
    (r / "inc-1.log").write_bytes(bytes(raw))
    b = _by_name(r)
    assert "server.log" not in b and "empty.log" not in b
    assert b["inc-1.log"].flags[0] == NO_ENTRY and not b["inc-1.log"].usable
    assert "header cannot be read" in (b["inc-1.log"].problem or "")


# -- choosing and restoring -----------------------------------------------------------------------


def test_latest_falls_back_past_a_failed_and_a_damaged_entry(repo: dict[str, Any]) -> None:
    r, tmp = repo["repo"], repo["tmp"]
    update_info(r / "full-3.tar.zst", validation=_verdict(False))
    choice = choose_fulls(list_backups(r))
    assert [b.name for b in choice.candidates] == ["full-2.tar.zst", "full-1.tar.zst"]
    assert [s.name for s in choice.skipped] == ["full-3.tar.zst"]
    assert "failed validation (restore: the backup is inconsistent)" in choice.skipped[0].reason
    got = restore_from_repo(r, tmp / "out")
    assert got.backup == "full-2.tar.zst" and got.result.digest == repo["digests"]["full-2"]
    assert [s.name for s in got.skipped] == ["full-3.tar.zst"]


def test_latest_falls_back_when_the_restore_refuses_the_archive(repo: dict[str, Any]) -> None:
    """Damage the catalog's cheap checks cannot see (a flipped byte inside the compressed
    body, the sidecar matching the entry): the restore refuses it, leaves the target alone, and
    the next older full backup is restored instead, with the reason."""
    r, tmp = repo["repo"], repo["tmp"]
    p = r / "full-3.tar.zst"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    assert _by_name(r)["full-3.tar.zst"].usable  # the listing reads headers only
    got = restore_from_repo(r, tmp / "out")
    assert got.backup == "full-2.tar.zst"
    assert [s.name for s in got.skipped] == ["full-3.tar.zst"]
    assert "the restore refused it: checksum mismatch" in got.skipped[0].reason
    assert sorted(x.name for x in tmp.iterdir() if x.name.startswith(".out")) == []


def test_no_intact_full_backup_is_an_error_naming_each(repo: dict[str, Any]) -> None:
    r, tmp = repo["repo"], repo["tmp"]
    for n in ("full-1.tar.zst", "full-2.tar.zst", "full-3.tar.zst"):
        update_info(r / n, validation=_verdict(False))
    with pytest.raises(RestoreError) as ei:
        restore_from_repo(r, tmp / "out")
    msg = ei.value.message
    assert msg.startswith(f"no intact full backup in {r} to restore; skipped: ")
    assert all(n in msg for n in ("full-1.tar.zst", "full-2.tar.zst", "full-3.tar.zst"))
    assert not (tmp / "out").exists()


def test_a_directory_without_backups_is_a_usage_error_and_untrusted_ones_a_failure(
    repo: dict[str, Any],
) -> None:
    """restore --latest and restore-pitr --repo agree: no backups at all is the wrong directory
    (exit 2); backups none of which can be used is a failure (exit 1), naming each."""
    empty, tmp = repo["tmp"] / "empty", repo["tmp"]
    empty.mkdir()
    with pytest.raises(UsageError, match="no full backup in") as u1:
        restore_from_repo(empty, tmp / "out")
    with pytest.raises(UsageError, match="no backups with catalog entries") as u2:
        choose_from_repo(empty, Target())
    assert u1.value.exit_code == u2.value.exit_code == 2
    r = repo["repo"]
    for n in ("full-1.tar.zst", "full-2.tar.zst", "full-3.tar.zst", "inc-1.log", "inc-2.log"):
        update_info(r / n, validation=_verdict(False))
    with pytest.raises(RestoreError, match="no usable backup in .*inc-2.log: it failed") as f:
        choose_from_repo(r, Target())
    assert f.value.exit_code == 1
    assert not (tmp / "out").exists()


def test_a_named_backup(repo: dict[str, Any]) -> None:
    r, tmp = repo["repo"], repo["tmp"]
    got = restore_from_repo(r, tmp / "a", name="full-2.tar.zst")
    assert got.backup == "full-2.tar.zst" and got.result.snapshot_lsn == 5 and got.notes == []
    with pytest.raises(UsageError, match="no backup named 'nope.tar.zst'"):
        restore_from_repo(r, tmp / "b", name="nope.tar.zst")
    with pytest.raises(UsageError, match="inc-1.log is an incremental backup"):
        restore_from_repo(r, tmp / "b", name="inc-1.log")
    update_info(r / "full-1.tar.zst", validation=_verdict(False))
    with pytest.raises(RestoreError, match="full-1.tar.zst failed validation .* with --from"):
        restore_from_repo(r, tmp / "b", name="full-1.tar.zst")
    assert not (tmp / "b").exists()


# -- one rule for an archive without its sidecar --------------------------------------------------


def test_restore_and_validate_agree_on_an_archive_without_its_sidecar(
    repo: dict[str, Any],
) -> None:
    r, tmp = repo["repo"], repo["tmp"]
    a = r / "full-2.tar.zst"
    (r / "full-2.tar.zst.sha256").unlink()
    rep = validate_backup(a, level=3, record=False, workdir=tmp)
    assert rep.ok, rep.reason
    assert rep.warnings == [sidecar_absent(a)]
    assert "full-2.tar.zst.sha256 absent" in rep.steps[1].detail
    res = restore(a, tmp / "restored")
    assert res.warnings == [sidecar_absent(a)] and not res.sidecar_checked
    assert sidecar_absent(a).startswith("sidecar absent: full-2.tar.zst.sha256 is missing")
    # Damage is still caught without it, by both: the archive's own checksums.
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 0xFF
    a.write_bytes(bytes(data))
    assert not validate_backup(a, level=3, record=False, workdir=tmp).ok
    with pytest.raises(BadArchive):
        restore(a, tmp / "again")


def test_validate_accepts_an_incremental_without_its_sidecar(repo: dict[str, Any]) -> None:
    r, tmp = repo["repo"], repo["tmp"]
    (r / "inc-2.log.sha256").unlink()
    rep = validate_backup(r / "inc-2.log", level=2, record=False, workdir=tmp)
    assert rep.ok, rep.reason
    assert rep.warnings == [
        "sidecar absent: inc-2.log.sha256 is missing, so every record's CRC was checked instead"
    ]
