"""Catalog entries are checked against the files they describe (issue 8, items 8 and 6).

A flipped bit in an entry is reported and never trusted: validate-backup says so and rebuilds
the entry from the file's header, the next incremental starts right after the true end, and
restore-pitr --repo leaves the backup out of its choice. A verdict that cannot be recorded (a
full disk) is printed, the error says what state the entry was left in, and the backup is never
chosen while its entry says "pending".
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engram.backup.catalog import (
    LOCAL,
    CatalogError,
    check_entry,
    file_facts,
    info_path,
    read_catalog,
    read_info,
    write_info,
)
from engram.backup.full import full_backup
from engram.backup.incremental import chain_of, incremental_backup
from engram.backup.pitr import Target, choose_from_repo
from engram.backup.validate import validate_backup
from engram.cli.backups import _check_recorded
from engram.cli.main import app
from engram.graph import Engine, EngineConfig
from engram.oplog.reader import read_header

CFG = EngineConfig(checkpoint_interval=3600)


def _write(e: Engine, n: int, tag: str) -> None:
    for i in range(n):
        e.apply([{"op": "create_memory", "id": f"{tag}{i}", "content": f"{tag} memory {i}"}])


@pytest.fixture
def repo(tmp_path: Path) -> dict[str, Any]:
    """A full backup and two incrementals in one directory, and the engine still open."""
    backups = tmp_path / "backups"
    backups.mkdir()
    e = Engine.open(tmp_path / "data", CFG, create=True)
    _write(e, 5, "a")
    full = backups / "full.tar.zst"
    full_backup(e, full)
    _write(e, 4, "b")
    inc1 = backups / "inc1.log"
    incremental_backup(e, inc1)
    _write(e, 3, "c")
    inc2 = backups / "inc2.log"
    incremental_backup(e, inc2)
    yield {"engine": e, "dir": backups, "full": full, "inc1": inc1, "inc2": inc2}
    e.close()


def _flip_up(text: str, key: str) -> str:
    """``text`` (an entry) with one bit flipped in the value of ``key``: for a number, one that
    makes it larger; for a string, one that keeps it a different printable string."""
    start = text.index(f'"{key}": ') + len(key) + 4
    end = start
    while text[end] not in ",\n}":
        end += 1
    value = text[start:end]
    for pos in reversed(range(len(value))):
        ch = value[pos]
        for bit in range(4):
            new = chr(ord(ch) ^ (1 << bit))
            if ch.isdigit() and new.isdigit() and new > ch:
                return text[: start + pos] + new + text[start + pos + 1 :]
            if not ch.isdigit() and ch.isalnum() and new.isalnum():
                return text[: start + pos] + new + text[start + pos + 1 :]
    raise AssertionError(f"no bit to flip in {key}={value}")


FIELDS = ("from_lsn", "snapshot_lsn", "from_time_ns", "snapshot_time_ns", "database_id")


@pytest.mark.parametrize("key", FIELDS)
def test_a_flipped_bit_in_an_incremental_entry_is_reported_and_repaired(
    repo: dict[str, Any], key: str
) -> None:
    inc1, inc2, d = repo["inc1"], repo["inc2"], repo["dir"]
    true_end = read_header(inc2)["to_lsn"]
    good = info_path(inc2).read_text()
    info_path(inc2).write_text(_flip_up(good, key))

    cat = read_catalog(d)
    assert [p.path for p in cat.problems] == [inc2]
    assert key in cat.problems[0].reason or "checksum" in cat.problems[0].reason
    assert inc2 not in [e.path for e in cat.entries]
    # The next incremental's start comes from the file's own header.
    after = chain_of(d, repo["engine"].database_id)
    assert after is not None and after.name == inc2.name and after.to_lsn == true_end

    # restore-pitr --repo leaves it out, says why, and still chooses the rest correctly.
    base, incs, says = choose_from_repo(d, Target(lsn=read_header(inc1)["to_lsn"]))
    assert (base, incs) == (repo["full"], [inc1])
    assert "skipped" in says and info_path(inc2).name in says

    # validate-backup reports it, rebuilds the entry from the file, and records its verdict.
    res = CliRunner().invoke(app, ["validate-backup", str(inc2), "--level", "2"])
    assert res.exit_code == 0, res.output
    assert "WARNING: the catalog entry inc2.log.info.json disagreed with the file" in res.output
    assert "rebuilt from the file's header" in res.output and "PASS" in res.output
    info = read_info(inc2)
    assert info is not None and check_entry(inc2, info, file_facts(inc2)) == []
    assert info["snapshot_lsn"] == true_end and info["validation"]["status"] == "passed"
    assert read_catalog(d).problems == []


def test_the_next_incremental_starts_after_the_true_end(repo: dict[str, Any]) -> None:
    e, d, inc2 = repo["engine"], repo["dir"], repo["inc2"]
    true_end = read_header(inc2)["to_lsn"]
    info_path(inc2).write_text(_flip_up(info_path(inc2).read_text(), "snapshot_lsn"))
    assert json.loads(info_path(inc2).read_text())["snapshot_lsn"] > true_end
    _write(e, 2, "d")
    inc3 = d / "inc3.log"
    incremental_backup(e, inc3)
    assert read_header(inc3)["from_lsn"] == true_end + 1  # no LSN skipped


def test_write_info_never_replaces_an_entry(repo: dict[str, Any]) -> None:
    before = info_path(repo["inc1"]).read_bytes()
    with pytest.raises(FileExistsError):
        write_info(repo["inc1"], {"kind": "incremental"})
    assert info_path(repo["inc1"]).read_bytes() == before


class FullDisk:
    """Writes catalog entries like the real writer until ``fail_after`` writes, then fails as
    a full disk does."""

    def __init__(self, fail_after: int) -> None:
        self.left = fail_after

    def _spend(self) -> None:
        if self.left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= 1

    def create(self, path: Path, data: bytes) -> None:
        self._spend()
        LOCAL.create(path, data)

    def replace(self, path: Path, data: bytes) -> None:
        self._spend()
        LOCAL.replace(path, data)


def test_a_verdict_that_cannot_be_recorded_is_printed_and_never_listed_good(
    repo: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    full, d = repo["full"], repo["dir"]
    # The "pending" mark is written, then the disk is full when the verdict comes.
    rep = validate_backup(full, level=2, entries=FullDisk(fail_after=1))
    assert rep.ok and rep.recorded is False
    assert rep.record_error is not None and rep.record_error.startswith("disk full while ")
    assert '"pending"' in rep.record_error and "validate-backup" in rep.record_error
    assert read_info(full)["validation"]["status"] == "pending"  # type: ignore[index]
    with pytest.raises(CatalogError, match="disk full"):
        _check_recorded(rep.to_json())
    # Never chosen while pending, with the reason said.
    with pytest.raises(Exception, match="validation is pending"):
        choose_from_repo(d, Target(lsn=read_header(repo["inc2"])["to_lsn"]))
    # A rerun with room records the verdict; the backup is chosen again.
    assert validate_backup(full, level=2).recorded is True
    base, _, says = choose_from_repo(d, Target(lsn=read_header(repo["inc2"])["to_lsn"]))
    assert base == full and "skipped" not in says


def test_a_full_disk_before_validation_changes_nothing(repo: dict[str, Any]) -> None:
    full = repo["full"]
    before = info_path(full).read_bytes()
    with pytest.raises(CatalogError, match="disk full while marking validation as pending"):
        validate_backup(full, level=2, entries=FullDisk(fail_after=0))
    assert info_path(full).read_bytes() == before
