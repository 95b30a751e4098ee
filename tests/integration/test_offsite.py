"""Offsite copies (issue 12, item 3): `engram push`, `pull` and `sync` between any two
repositories. The copy logic runs directory -> directory and directory -> a directory object
store (the same ``ObjectBackupStore`` code S3 uses, without a server); then the commands, as an
operator runs them, against moto and SeaweedFS on 127.0.0.1 (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engram.backup import offsite
from engram.backup.catalog import read_info, update_info
from engram.backup.full import full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.repository import list_backups
from engram.backup.restore import restore
from engram.errors import EngramError
from engram.graph import Engine, EngineConfig
from engram.storage import BackupStore, LocalBackupStore, Ref, info_name, sidecar_name
from engram.storage.dirobjects import DirObjectStore
from engram.storage.faults import FaultyStore, interrupt
from engram.storage.objectbackup import ObjectBackupStore
from s3servers import BUCKET, S3Server, s3_prefix

CFG = EngineConfig(checkpoint_interval=3600)
BIN = Path(sys.executable).parent
SERVERS = {"moto": "moto_s3", "seaweedfs": "seaweed_s3"}


def _write(e: Engine, n: int, tag: str) -> None:
    for i in range(n):
        e.apply([{"op": "create_memory", "id": f"{tag}{i}", "content": f"{tag} memory {i} " * 20}])


def _verdict(ok: bool, at: str) -> dict[str, Any]:
    return {
        "status": "passed" if ok else "failed",
        "ok": ok,
        "level": 4,
        "reason": None if ok else "restore: the backup is inconsistent",
        "at": at,
        "warnings": [],
    }


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """full-1 (passed), inc-1 (its parent full-1), full-2, inc-2 (parent full-2)."""
    r = tmp_path / "repo"
    r.mkdir()
    with Engine.open(tmp_path / "data", CFG, create=True) as e:
        _write(e, 30, "a")
        full_backup(e, r / "full-1.tar.zst")
        _write(e, 5, "b")
        incremental_backup(e, r / "inc-1.log")
        full_backup(e, r / "full-2.tar.zst")
        _write(e, 5, "c")
        incremental_backup(e, r / "inc-2.log")
    update_info(r / "full-1.tar.zst", validation=_verdict(True, "2025-10-24T00:00:00.000000Z"))
    return r


@pytest.fixture(params=["dir", "objects"])
def far(request: pytest.FixtureRequest, tmp_path: Path) -> BackupStore:
    d = tmp_path / "far"
    d.mkdir()
    if request.param == "dir":
        return LocalBackupStore(d)
    return ObjectBackupStore(DirObjectStore(d), first_part=5 << 20)


def _names(store: BackupStore) -> list[str]:
    return sorted(store.list())


def _same_files(repo: Path, far: BackupStore) -> None:
    for n in LocalBackupStore(repo).list():
        assert far.read(n) == (repo / n).read_bytes(), n


# -- the copy ----------------------------------------------------------------------------------


def test_sync_copies_everything_in_chain_order_then_nothing(repo: Path, far: BackupStore) -> None:
    seen: list[str] = []
    r = offsite.sync(LocalBackupStore(repo), far, on_copy=lambda c: seen.append(c.name))
    # full-2 ends where inc-1 does: the full goes first; each incremental after its parent
    assert seen == ["full-1.tar.zst", "full-2.tar.zst", "inc-1.log", "inc-2.log"]
    assert [c.action for c in r.copies] == [offsite.COPIED] * 4
    assert r.bytes_copied == sum(os.path.getsize(repo / n) for n in seen)
    assert r.not_copied == []
    _same_files(repo, far)
    listing = list_backups(far)
    assert sorted(b.name for b in listing.backups if b.usable) == sorted(seen)
    again = offsite.sync(LocalBackupStore(repo), far)
    assert [c.action for c in again.copies] == [offsite.PRESENT] * 4
    assert again.bytes_copied == 0 and again.to_json()["copied"] == 0


def test_chain_order_puts_parents_first() -> None:
    def b(name: str, kind: str, to: int, parent: str | None = None) -> Any:
        from engram.backup.repository import Backup

        return Backup(
            name, kind, "db", None, 1, to, 1, 1, 1, parent, "passed", None, None, None, True
        )

    got = offsite.chain_order(
        [
            b(
                "z-inc.log", "incremental", 5, "a-inc.log"
            ),  # an empty one ending where its parent does
            b("a-inc.log", "incremental", 5, "full"),
            b("full", "full", 3),
            b("full-late", "full", 5),
        ]
    )
    assert [x.name for x in got] == ["full", "full-late", "a-inc.log", "z-inc.log"]


def test_dry_run_copies_nothing(repo: Path, far: BackupStore) -> None:
    r = offsite.sync(LocalBackupStore(repo), far, dry_run=True)
    assert [c.action for c in r.copies] == [offsite.WOULD_COPY] * 4
    assert _names(far) == []


def test_damaged_failed_and_pending_backups_stay_home_and_are_named(
    repo: Path, far: BackupStore
) -> None:
    update_info(repo / "full-2.tar.zst", validation=_verdict(False, "2025-10-25T00:00:00.000000Z"))
    update_info(repo / "inc-1.log", validation={"status": "pending", "level": 3, "at": "x"})
    entry = json.loads((repo / "inc-2.log.info.json").read_text())
    entry["digest"] = "0" * 64  # the entry no longer agrees with its file (nor its checksum)
    (repo / "inc-2.log.info.json").write_text(json.dumps(entry))
    r = offsite.sync(LocalBackupStore(repo), far)
    assert [c.name for c in r.copies] == ["full-1.tar.zst"]
    why = dict(r.not_copied)
    assert set(why) == {"inc-1.log", "full-2.tar.zst", "inc-2.log"}
    assert "failed validation" in why["full-2.tar.zst"]
    assert "pending" in why["inc-1.log"]
    assert "not trusted" in why["inc-2.log"]
    with pytest.raises(offsite.NotCopied, match="failed validation"):
        offsite.push([Ref(LocalBackupStore(repo), "full-2.tar.zst")], far)
    (repo / "full-1.tar.zst.sha256").unlink()
    with pytest.raises(offsite.NotCopied, match="no sidecar"):
        offsite.check_source(Ref(LocalBackupStore(repo), "full-1.tar.zst"))


def test_a_newer_verdict_is_carried_over_an_older_one_is_not(repo: Path, far: BackupStore) -> None:
    offsite.sync(LocalBackupStore(repo), far)
    update_info(repo / "full-2.tar.zst", validation=_verdict(True, "2025-10-26T00:00:00.000000Z"))
    r = offsite.sync(LocalBackupStore(repo), far)
    updated = r.of(offsite.ENTRY_UPDATED)
    assert [c.name for c in updated] == ["full-2.tar.zst"]
    assert updated[0].note == "validation not validated -> passed"
    assert far.read(info_name("full-2.tar.zst")) == (repo / "full-2.tar.zst.info.json").read_bytes()
    # The far side validated it later (a newer verdict there): a sync keeps it.
    far_ref = Ref(far, "full-2.tar.zst")
    update_info(far_ref, validation=_verdict(True, "2025-10-27T00:00:00.000000Z"))
    update_info(repo / "full-2.tar.zst", validation=_verdict(True, "2025-10-26T12:00:00.000000Z"))
    r = offsite.sync(LocalBackupStore(repo), far)
    assert r.of(offsite.ENTRY_UPDATED) == []
    assert (read_info(far_ref) or {})["validation"]["at"] == "2025-10-27T00:00:00.000000Z"


def test_the_same_backup_there_is_fine_another_is_refused(repo: Path, far: BackupStore) -> None:
    src = Ref(LocalBackupStore(repo), "full-1.tar.zst")
    [c] = offsite.push([src], far)
    assert c.action == offsite.COPIED
    [c] = offsite.push([src], far)
    assert c.action == offsite.PRESENT and c.bytes_copied == 0
    other = Ref(LocalBackupStore(repo), "full-2.tar.zst")
    with pytest.raises(offsite.NameTaken, match="already holds another backup") as e:
        offsite.copy_backup(other, far, "full-1.tar.zst")
    assert e.value.exit_code == 3
    assert far.read("full-1.tar.zst") == (repo / "full-1.tar.zst").read_bytes()


def test_a_copy_cut_short_leaves_nothing_and_the_next_run_finishes(
    repo: Path, far: BackupStore
) -> None:
    for step in ("archive", "sidecar", "info"):
        faulty = FaultyStore(far, at_step=step, fault=interrupt)  # type: ignore[arg-type]
        with pytest.raises(KeyboardInterrupt):
            offsite.sync(LocalBackupStore(repo), faulty)
        assert faulty.fired
        assert [n for n in _names(far) if not n.startswith("histories/")] == [], step
    # A kill after the file was published (nothing ran to remove it): the next run completes it.
    far_dir = Path(far.describe())
    if isinstance(far, LocalBackupStore):
        shutil.copyfile(repo / "full-1.tar.zst", far_dir / "full-1.tar.zst")
    else:
        far.create("full-1.tar.zst", (repo / "full-1.tar.zst").read_bytes())
    r = offsite.sync(LocalBackupStore(repo), far)
    first = r.copies[0]
    assert (first.name, first.action) == ("full-1.tar.zst", offsite.COMPLETED)
    assert set(first.created) == {sidecar_name("full-1.tar.zst"), info_name("full-1.tar.zst")}
    _same_files(repo, far)


def test_bytes_that_do_not_match_the_sidecar_are_never_published(
    repo: Path, far: BackupStore
) -> None:
    p = repo / "full-1.tar.zst"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, same header: only the hash can tell
    p.write_bytes(bytes(data))
    with pytest.raises(offsite.CopyCorrupt, match="nothing was published"):
        offsite.push([Ref(LocalBackupStore(repo), "full-1.tar.zst")], far)
    assert _names(far) == []


def test_pull_into_a_directory_restores(repo: Path, far: BackupStore, tmp_path: Path) -> None:
    offsite.sync(LocalBackupStore(repo), far)
    home = tmp_path / "home"
    home.mkdir()
    [c] = offsite.push([Ref(far, "full-2.tar.zst")], LocalBackupStore(home))
    assert c.action == offsite.COPIED
    assert sorted(os.listdir(home)) == [
        "full-2.tar.zst",
        "full-2.tar.zst.info.json",
        "full-2.tar.zst.sha256",
    ]
    restore(home / "full-2.tar.zst", tmp_path / "restored")
    assert (tmp_path / "restored" / "identity.json").exists()


# -- the commands, against S3 servers ------------------------------------------------------------


def _engram(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    return subprocess.run(
        [str(BIN / "engram"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(params=list(SERVERS))
def s3(request: pytest.FixtureRequest) -> S3Server:
    return request.getfixturevalue(SERVERS[request.param])  # type: ignore[no-any-return]


def test_sync_push_and_pull_through_s3(repo: Path, s3: S3Server, tmp_path: Path) -> None:
    prefix = s3_prefix()
    url = f"s3://{BUCKET}/{prefix}"
    opts = ["--endpoint-url", s3.endpoint, "--s3-path-style"]
    dry = _engram(tmp_path, "sync", "--repo", str(repo), "--to", url, "--dry-run", *opts)
    assert dry.returncode == 0, dry.stderr
    assert "would copy 4 backups" in dry.stdout
    p = _engram(tmp_path, "sync", "--repo", str(repo), "--to", url, "--json", *opts)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["copied"] == 4 and out["not_copied"] == []
    c = s3.client()
    got = c.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    assert sorted(o["Key"][len(prefix) :] for o in got) == sorted(LocalBackupStore(repo).list())
    assert c.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", []) == []
    again = _engram(tmp_path, "sync", "--repo", str(repo), "--to", url, *opts)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("nothing to copy: 4 backups")
    # push: the same file is fine; another file under a taken name is refused (exit 3)
    p = _engram(tmp_path, "push", str(repo / "full-1.tar.zst"), "--to", url, *opts)
    assert p.returncode == 0 and p.stdout.startswith("already there:"), p.stderr
    clash = tmp_path / "clash"
    clash.mkdir()
    for n in ("full-2.tar.zst", "full-2.tar.zst.sha256", "full-2.tar.zst.info.json"):
        shutil.copyfile(repo / n, clash / n.replace("full-2", "full-1"))
    p = _engram(tmp_path, "push", str(clash / "full-1.tar.zst"), "--to", url, *opts)
    assert p.returncode == 3 and "already holds another backup" in p.stderr, p.stderr
    # pull back and restore from the pulled copy
    home = tmp_path / "home"
    home.mkdir()
    p = _engram(tmp_path, "pull", f"{url}full-2.tar.zst", str(home), *opts)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("copied s3://")
    assert (home / "full-2.tar.zst").read_bytes() == (repo / "full-2.tar.zst").read_bytes()
    p = _engram(
        tmp_path,
        "restore",
        "--from",
        str(home / "full-2.tar.zst"),
        "--to",
        str(tmp_path / "restored"),
    )
    assert p.returncode == 0, p.stderr
    # the whole repository back from the bucket (the runbook's scenario 1, step 2)
    back = tmp_path / "back"
    back.mkdir()
    p = _engram(tmp_path, "sync", "--repo", url, "--to", str(back), *opts)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(back)) == sorted(LocalBackupStore(repo).list())
    _same_files(repo, LocalBackupStore(back))


def test_bad_input(repo: Path, moto_s3: S3Server, tmp_path: Path) -> None:
    opts = ["--endpoint-url", moto_s3.endpoint, "--s3-path-style"]
    p = _engram(tmp_path, "sync", "--repo", str(repo), "--to", "s3://no-such-bucket-x/p/", *opts)
    assert p.returncode == 2 and "no-such-bucket-x does not exist" in p.stderr
    p = _engram(tmp_path, "push", str(repo / "missing.tar.zst"), "--to", str(tmp_path), *opts)
    assert p.returncode == 1 and p.stderr.startswith("error:") and p.stderr.count("\n") == 1
    p = _engram(tmp_path, "sync", "--repo", str(repo), "--to", str(tmp_path / "nope"))
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = _engram(tmp_path, "sync", "--help")
    assert "--delete" in p.stdout and "prune" in p.stdout


def test_copies_go_only_into_a_repository_and_come_only_from_one(
    repo: Path, tmp_path: Path
) -> None:
    """A destination that holds things engram did not write (a mistyped prefix or directory)
    is refused before anything is copied into it; so is a source that holds no backups but
    other things. An empty destination, or one already holding backups, is fine."""
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8 not a backup")
    for args in (
        ["sync", "--repo", str(repo), "--to", str(other)],
        ["push", str(repo / "full-1.tar.zst"), "--to", str(other)],
        ["sync", "--repo", str(other), "--to", str(tmp_path / "empty")],
    ):
        (tmp_path / "empty").mkdir(exist_ok=True)
        p = _engram(tmp_path, *args)
        assert p.returncode == 2 and "is not an engram repository" in p.stderr, (args, p.stderr)
        assert "cat.jpg" in p.stderr
    assert sorted(os.listdir(other)) == ["cat.jpg"]
    assert os.listdir(tmp_path / "empty") == []
    p = _engram(tmp_path, "sync", "--repo", str(repo), "--to", str(tmp_path / "empty"))
    assert p.returncode == 0, p.stderr


def test_a_damaged_object_is_never_pulled(repo: Path, tmp_path: Path) -> None:
    d = tmp_path / "objects"
    d.mkdir()
    far = ObjectBackupStore(DirObjectStore(d))
    offsite.sync(LocalBackupStore(repo), far)
    obj = d / "full-1.tar.zst"
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF  # its sidecar and entry still name the good bytes
    os.chmod(obj, 0o600)
    obj.write_bytes(bytes(data))
    home = tmp_path / "home"
    home.mkdir()
    # A small archive is caught by the check of its header (read whole), a large one at the end
    # of the copy: either way nothing reaches the destination.
    with pytest.raises(EngramError, match="does not hash to the SHA-256"):
        offsite.push([Ref(far, "full-1.tar.zst")], LocalBackupStore(home))
    assert os.listdir(home) == []
