"""Hostile and damaged archives are refused by restore, by `engram restore` and by
validate-backup, with the reason (and the offending member) named and nothing written anywhere:
the target does not exist afterwards (or is unchanged), no staging dir is left beside it, and no
file appears anywhere else (docs/FORMAT.md "Restore"; issue 3, item 4 and "Tests that must
exist").

Two sources of archives: the committed fixtures of tests/fixtures/archives/ (built by
tests/fixtures/make_archives.py) and archives crafted here from a real backup of a small data dir
(members re-packed with tarfile, manifests edited, streams cut or flipped).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import make_archives as MA
import pytest
import zstandard
from typer.testing import CliRunner

from engram.backup.full import full_backup
from engram.backup.restore import restore
from engram.backup.validate import validate_backup
from engram.cli.main import app
from engram.errors import BadArchive, CorruptData, EngramError
from engram.graph import Engine, EngineConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ARCHIVES = FIXTURES / "archives"
EVIL = b"#!/bin/sh\necho pwned\n"
OTHER_DB = "00000000-0000-4000-8000-00000000beef"
# Words one of which a refusal of a damaged stream must use to say why.
DAMAGE_WORDS = (
    "truncated",
    "damaged",
    "checksum mismatch",
    "does not match the manifest",
    "invalid tar header",
    "not valid JSON",
    "neither zstd- nor gzip-compressed",
    "inconsistent",
)


runner = CliRunner()


# -- what was written --------------------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (links not followed) with its kind and content hash."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            elif p.is_file():
                out[rel] = ("file", st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", st.st_mode)
    return out


@dataclass
class Scene:
    """A restore attempt: ``root`` is the test's whole tmp dir, ``to`` the target inside
    ``root/work`` (so that ``../x`` from the staging dir lands in ``work`` and ``../../x`` in
    ``root``: both are watched)."""

    root: Path
    work: Path
    to: Path
    before: dict[str, tuple[Any, ...]]
    outside: list[Path]

    @classmethod
    def make(cls, root: Path, existing_target: bool = False, outside: list[Path] | None = None
             ) -> Scene:
        work = root / "work"
        work.mkdir(exist_ok=True)
        to = work / "target"
        if existing_target:
            (to / "oplog").mkdir(parents=True)
            (to / "identity.json").write_text('{"database_id": "precious"}\n')
            (to / "oplog" / "0000000000000001.log").write_bytes(b"precious bytes")
        outs = list(outside or [])
        for p in outs:
            assert not p.exists(), f"{p} exists before the test; remove it"
        return cls(root, work, to, tree(root), outs)

    def check_untouched(self) -> None:
        after = tree(self.root)
        assert after == self.before, {
            "new": sorted(set(after) - set(self.before)),
            "gone": sorted(set(self.before) - set(after)),
            "changed": sorted(k for k in after if k in self.before and after[k] != self.before[k]),
        }
        staging = [p.name for p in self.work.iterdir() if p.name.startswith(".target.")]
        assert staging == [], f"staging dirs left beside the target: {staging}"
        aside = [p.name for p in self.work.iterdir() if ".before-restore-" in p.name]
        assert aside == [], f"the target was moved aside although the restore failed: {aside}"
        for p in self.outside:
            assert not os.path.lexists(p), f"{p} was written outside the temp dir"


def refused(
    archive: Path, scene: Scene, exc: type[EngramError], *needles: str, force: bool = False
) -> EngramError:
    with pytest.raises(exc) as ei:
        restore(archive, scene.to, force=force)
    msg = ei.value.message
    for n in needles:
        assert n in msg, f"{n!r} not in the refusal: {msg}"
    assert "\n" not in msg
    scene.check_untouched()
    # The read-ahead thread stops with the extraction, whatever refused it.
    assert not [t for t in threading.enumerate() if t.name == "engram-decompress"]
    return ei.value


def cli_refused(archive: Path, scene: Scene, *needles: str, code: int = 1) -> str:
    res = runner.invoke(app, ["restore", f"--from={archive}", f"--to={scene.to}"])
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    scene.check_untouched()
    return lines[0]


# -- a real backup, and re-packing it -------------------------------------------------------------


Member = tuple[tarfile.TarInfo, bytes | None]


@dataclass
class Source:
    root: Path
    archives: dict[str, Path]  # "zst"/"gz" -> a clean full backup
    members: dict[str, list[tuple[str, bytes]]]
    digest: str
    snapshot_lsn: int
    database_id: str


def decompress(data: bytes) -> bytes:
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        ).read()
    return gzip.decompress(data)


def read_members(archive: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(decompress(archive.read_bytes()))) as tf:
        out = []
        for ti in tf.getmembers():
            f = tf.extractfile(ti)
            assert f is not None
            out.append((ti.name, f.read()))
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    root = tmp_path_factory.mktemp("source")
    e = Engine.open(root / "data", EngineConfig(checkpoint_interval=3600))
    try:
        for i in range(8):
            e.apply([{"op": "create_memory", "id": f"m{i}", "content": f"memory {i} " * 20,
                      "metadata": {"i": i}}])
        e.apply([{"op": "create_edge", "src": "m0", "dst": f"m{i}"} for i in range(1, 5)])
        e.checkpoint()  # W > 0, so the archive holds a WAL and a log segment (W, S]
        e.apply([{"op": "activate", "id": "m1"}, {"op": "mark", "name": "p"}])
        e.apply([{"op": "update_memory", "id": "m2", "content": "changed"}])
        e.apply([{"op": "delete_memory", "id": "m7"}])
        bk = root / "bk"
        bk.mkdir()
        archives = {"zst": bk / "good.tar.zst", "gz": bk / "good.tar.gz"}
        for p in archives.values():
            full_backup(e, p)
        digest, lsn, db = e.digest.hex, e.last_lsn, e.database_id
    finally:
        e.close()
    members = {k: read_members(p) for k, p in archives.items()}
    names = [n for n, _ in members["zst"]]
    assert names[0] == "identity.json" and names[-1] == "manifest.json"
    assert any(n.startswith("oplog/") for n in names) and "warm/engram.db-wal" in names
    return Source(root, archives, members, digest, lsn, db)


def reg(name: str, data: bytes) -> Member:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o600, 1_700_000_000
    return ti, data


def special(name: str, type_: bytes, **kw: Any) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = type_, 0o600, 1_700_000_000
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, None


def pack(members: list[Member], compression: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    tar = buf.getvalue()
    if compression == "zst":
        return zstandard.ZstdCompressor(level=1).compress(tar)
    return gzip.compress(tar, mtime=0)


def write_archive(dest_dir: Path, name: str, data: bytes, sidecar: bool | bytes = True) -> Path:
    """``data`` at ``dest_dir/name``; with a correct sidecar (True), none (False) or the given
    sidecar bytes."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    p = dest_dir / name
    p.write_bytes(data)
    side = p.with_name(p.name + ".sha256")
    if sidecar is True:
        side.write_text(hashlib.sha256(data).hexdigest() + "\n")
    elif sidecar is not False:
        side.write_bytes(sidecar)
    return p


def manifest_of(members: list[tuple[str, bytes]]) -> dict[str, Any]:
    return json.loads(dict(members)["manifest.json"])


def with_manifest(members: list[tuple[str, bytes]], m: dict[str, Any] | bytes) -> list[Member]:
    raw = m if isinstance(m, bytes) else (json.dumps(m, indent=2, sort_keys=True) + "\n").encode()
    return [reg(n, raw if n == "manifest.json" else d) for n, d in members]


def rehashed(members: list[tuple[str, bytes]]) -> list[Member]:
    """The members with a manifest whose ``files`` match them exactly (so that only the attack
    under test is wrong)."""
    m = manifest_of(members)
    m["files"] = {
        n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in members
        if n != "manifest.json"
    }
    return with_manifest(members, m)


def as_members(members: list[tuple[str, bytes]]) -> list[Member]:
    return [reg(n, d) for n, d in members]


def insert_after_identity(members: list[tuple[str, bytes]], extra: Member) -> list[Member]:
    out = as_members(members)
    return out[:1] + [extra] + out[1:]


def replace(members: list[tuple[str, bytes]], name: str, new: Member) -> list[Member]:
    return [new if n == name else reg(n, d) for n, d in members]


# -- the baseline -------------------------------------------------------------------------------


@pytest.mark.parametrize("comp", ["zst", "gz"])
def test_baseline_real_backup_restores(source: Source, tmp_path: Path, comp: str) -> None:
    """The attacks below start from this archive; untouched, it restores to its snapshot."""
    res = restore(source.archives[comp], tmp_path / "restored")
    assert (res.snapshot_lsn, res.digest) == (source.snapshot_lsn, source.digest)
    assert res.sidecar_checked
    # Re-packed by this test's own packer with nothing changed, it restores too: the refusals
    # below come from the attack, not from the re-packing.
    a = write_archive(tmp_path / "in", f"repacked.tar.{comp}",
                      pack(as_members(source.members[comp]), comp))
    res = restore(a, tmp_path / "restored2")
    assert (res.snapshot_lsn, res.digest) == (source.snapshot_lsn, source.digest)


# -- committed fixtures --------------------------------------------------------------------------


def test_fixtures_are_current() -> None:
    """The committed fixtures hold exactly the tars make_archives.py builds."""
    assert sorted(p.name for p in ARCHIVES.iterdir()) == sorted(MA.EXPECT)
    built = MA.build()
    for name in MA.EXPECT:
        data = (ARCHIVES / name).read_bytes()
        tar = MA.expected_tar(name)
        if tar is None:
            assert data == built[name], name
        else:
            assert decompress(data) == tar, f"{name} is stale; run tests/fixtures/make_archives.py"


@pytest.mark.parametrize("name", sorted(MA.EXPECT))
def test_fixture_refused_by_restore(name: str, tmp_path: Path) -> None:
    evil_paths = [tmp_path / "evil", tmp_path / "work" / "evil", Path(MA.ABSOLUTE_TARGET)]
    scene = Scene.make(tmp_path, outside=evil_paths)
    refused(ARCHIVES / name, scene, BadArchive, *MA.EXPECT[name])


@pytest.mark.parametrize("name", sorted(MA.EXPECT))
def test_fixture_refused_by_cli(name: str, tmp_path: Path) -> None:
    evil_paths = [tmp_path / "evil", tmp_path / "work" / "evil", Path(MA.ABSOLUTE_TARGET)]
    scene = Scene.make(tmp_path, outside=evil_paths)
    cli_refused(ARCHIVES / name, scene, *MA.EXPECT[name])


@pytest.mark.parametrize(
    "name", ["traversal_dotdot.tar.zst", "symlink.tar.gz", "after_end.tar.zst"]
)
def test_fixture_refused_with_force_leaves_existing_target(name: str, tmp_path: Path) -> None:
    scene = Scene.make(tmp_path, existing_target=True, outside=[tmp_path / "work" / "evil"])
    refused(ARCHIVES / name, scene, BadArchive, *MA.EXPECT[name], force=True)


def test_cli_subprocess_refuses_traversal(tmp_path: Path) -> None:
    """The installed entry point: exit 1, one `error:` line, no traceback."""
    exe = Path(sys.executable).with_name("engram")
    if not exe.exists():
        pytest.skip(f"{exe} is not installed")
    scene = Scene.make(tmp_path, outside=[tmp_path / "work" / "evil"])
    a = ARCHIVES / "traversal_dotdot.tar.zst"
    p = subprocess.run([str(exe), "restore", f"--from={a}", f"--to={scene.to}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'../evil'" in lines[0]
    assert "Traceback" not in p.stderr
    scene.check_untouched()


# -- structural attacks crafted from the real backup ----------------------------------------------

SEG = "cold/" + "ab" * 32 + ".seg"


Builder = Callable[[list[tuple[str, bytes]]], list[Member]]


def _structural_cases(root: Path) -> dict[str, tuple[Builder, type[EngramError], tuple[str, ...]]]:
    absolute = str(root / "abs-evil")
    return {
        "traversal_dotdot": (
            lambda ms: insert_after_identity(ms, reg("../evil", EVIL)),
            BadArchive, ("'../evil'", "'..'"),
        ),
        "traversal_two_up": (
            lambda ms: insert_after_identity(ms, reg("../../evil", EVIL)),
            BadArchive, ("'../../evil'",),
        ),
        "traversal_nested": (
            lambda ms: insert_after_identity(ms, reg("warm/../../evil", EVIL)),
            BadArchive, ("'warm/../../evil'",),
        ),
        "traversal_as_last_member": (
            lambda ms: as_members(ms) + [reg("oplog/../../evil", EVIL)],
            BadArchive, ("'oplog/../../evil'",),
        ),
        "absolute": (
            lambda ms: insert_after_identity(ms, reg(absolute, EVIL)),
            BadArchive, (repr(absolute), "absolute"),
        ),
        "symlink_replaces_db": (
            lambda ms: replace(ms, "warm/engram.db",
                               special("warm/engram.db", tarfile.SYMTYPE, linkname="/etc/passwd")),
            BadArchive, ("'warm/engram.db'", "symbolic link"),
        ),
        "symlink_dir_then_file": (
            lambda ms: insert_after_identity(
                ms, special("warm", tarfile.SYMTYPE, linkname=str(root))),
            BadArchive, ("'warm'", "symbolic link"),
        ),
        "hardlink": (
            lambda ms: insert_after_identity(
                ms, special("warm/engram.db-wal", tarfile.LNKTYPE, linkname="identity.json")),
            BadArchive, ("'warm/engram.db-wal'", "hard link"),
        ),
        "chardev": (
            lambda ms: replace(ms, "fast/hot.json", special(
                "fast/hot.json", tarfile.CHRTYPE, devmajor=1, devminor=5)),
            BadArchive, ("'fast/hot.json'", "character device"),
        ),
        "blockdev": (
            lambda ms: replace(ms, "warm/engram.db", special(
                "warm/engram.db", tarfile.BLKTYPE, devmajor=8, devminor=0)),
            BadArchive, ("'warm/engram.db'", "block device"),
        ),
        "fifo": (
            lambda ms: insert_after_identity(ms, special("fast/hot.json", tarfile.FIFOTYPE)),
            BadArchive, ("'fast/hot.json'", "FIFO"),
        ),
        "directory": (
            lambda ms: insert_after_identity(ms, special("oplog", tarfile.DIRTYPE, mode=0o700)),
            BadArchive, ("'oplog'", "directory"),
        ),
        "not_allowed_journal": (
            lambda ms: insert_after_identity(ms, reg("warm/engram.db-journal", EVIL)),
            BadArchive, ("'warm/engram.db-journal'", "not part of an engram backup"),
        ),
        "not_allowed_segment_name": (
            lambda ms: insert_after_identity(ms, reg("cold/evil.seg", EVIL)),
            BadArchive, ("'cold/evil.seg'", "not part of an engram backup"),
        ),
        "duplicate_db": (
            lambda ms: as_members(ms)[:-1] + [reg("warm/engram.db", EVIL)] + as_members(ms)[-1:],
            BadArchive, ("'warm/engram.db'", "twice"),
        ),
        "duplicate_manifest": (
            lambda ms: as_members(ms) + [as_members(ms)[-1]],
            BadArchive, ("'manifest.json'", "twice"),
        ),
        "missing_manifest": (
            lambda ms: as_members(ms)[:-1],
            BadArchive, ("manifest.json",),
        ),
        "member_not_in_manifest": (
            lambda ms: as_members(ms)[:-1] + [reg(SEG, EVIL)] + as_members(ms)[-1:],
            BadArchive, (repr(SEG), "not in the manifest"),
        ),
        "member_content_changed": (
            lambda ms: replace(ms, "fast/hot.json", reg("fast/hot.json", b'{"ids": ["m0"]}')),
            BadArchive, ("fast/hot.json", "does not match the manifest"),
        ),
        "identity_missing": (
            lambda ms: as_members(ms)[1:],
            BadArchive, ("identity.json", "missing"),
        ),
        "identity_of_other_database": (
            lambda ms: rehashed([(n, json.dumps({"database_id": OTHER_DB, "created_at": "x",
                                                 "format_version": 1}).encode()
                                  if n == "identity.json" else d) for n, d in ms]),
            BadArchive, (OTHER_DB, "identity.json"),
        ),
        "identity_unreadable": (
            lambda ms: rehashed([(n, b"not json" if n == "identity.json" else d) for n, d in ms]),
            EngramError, ("identity.json",),
        ),
        "log_member_dropped": (
            lambda ms: rehashed([(n, d) for n, d in ms if not n.startswith("oplog/")]),
            CorruptData, ("LSN",),
        ),
        "log_member_emptied_of_records": (
            lambda ms: rehashed([(n, d[: _header_size(d)] if n.startswith("oplog/") else d)
                                 for n, d in ms]),
            CorruptData, ("LSN",),
        ),
    }


def _header_size(segment: bytes) -> int:
    from engram.format import record as fmt

    return fmt.decode_file_header(segment, "segment")[2]


STRUCTURAL = sorted(_structural_cases(Path("/x")))


@pytest.mark.parametrize("comp", ["zst", "gz"])
@pytest.mark.parametrize("case", STRUCTURAL)
def test_crafted_structure_refused(source: Source, tmp_path: Path, case: str, comp: str) -> None:
    build, exc, needles = _structural_cases(tmp_path)[case]
    data = pack(build(source.members[comp]), comp)
    a = write_archive(tmp_path / "in", f"{case}.tar.{comp}", data)
    scene = Scene.make(tmp_path, outside=[tmp_path / "evil", tmp_path / "work" / "evil",
                                          tmp_path / "abs-evil"])
    refused(a, scene, exc, *needles)


@pytest.mark.parametrize("case", ["traversal_two_up", "absolute", "symlink_dir_then_file",
                                  "missing_manifest", "member_not_in_manifest"])
def test_crafted_structure_refused_by_cli(source: Source, tmp_path: Path, case: str) -> None:
    build, _, needles = _structural_cases(tmp_path)[case]
    a = write_archive(tmp_path / "in", f"{case}.tar.zst", pack(build(source.members["zst"]), "zst"))
    scene = Scene.make(tmp_path, outside=[tmp_path / "evil", tmp_path / "abs-evil"])
    cli_refused(a, scene, *needles)


@pytest.mark.parametrize("case", ["traversal_nested", "hardlink", "log_member_dropped"])
def test_crafted_structure_refused_with_force(source: Source, tmp_path: Path, case: str) -> None:
    build, exc, needles = _structural_cases(tmp_path)[case]
    a = write_archive(tmp_path / "in", f"{case}.tar.gz", pack(build(source.members["gz"]), "gz"))
    scene = Scene.make(tmp_path, existing_target=True, outside=[tmp_path / "evil"])
    refused(a, scene, exc, *needles, force=True)


# -- malformed manifests -----------------------------------------------------------------------


def _manifest_cases() -> dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any] | bytes],
                                          type[EngramError], tuple[str, ...]]]:
    def edit(fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def go(m: dict[str, Any]) -> dict[str, Any]:
            fn(m)
            return m

        return go

    def set_(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return edit(lambda m: m.__setitem__(key, value))

    def file_entry(name: str, key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return edit(lambda m: m["files"][name].__setitem__(key, value))

    return {
        "not_json": (lambda m: b"{not json", BadArchive, ("manifest.json", "not valid JSON")),
        "not_utf8": (lambda m: b"\xff\xfe\x00{}", BadArchive, ("manifest.json", "not valid JSON")),
        "empty": (lambda m: b"", BadArchive, ("manifest.json", "not valid JSON")),
        "array": (lambda m: b"[1, 2, 3]", BadArchive, ("manifest.json", "not a JSON object")),
        "format_version_2": (set_("format_version", 2), BadArchive,
                             ("format_version 2", "not supported")),
        "format_version_string": (set_("format_version", "1"), BadArchive,
                                  ("format_version '1'", "not supported")),
        "format_version_missing": (edit(lambda m: m.pop("format_version")), BadArchive,
                                   ("format_version None",)),
        "snapshot_lsn_string": (set_("snapshot_lsn", "12"), BadArchive, ("'snapshot_lsn'",)),
        "snapshot_lsn_bool": (set_("snapshot_lsn", True), BadArchive, ("'snapshot_lsn'",)),
        "snapshot_lsn_missing": (edit(lambda m: m.pop("snapshot_lsn")), BadArchive,
                                 ("'snapshot_lsn'", "missing")),
        "database_id_number": (set_("database_id", 7), BadArchive, ("'database_id'",)),
        "files_list": (set_("files", []), BadArchive, ("'files'",)),
        "counts_null": (set_("counts", None), BadArchive, ("'counts'",)),
        "digest_short": (set_("digest", "abc"), BadArchive, ("digest", "64 hex")),
        "file_size_string": (file_entry("identity.json", "size", "123"), BadArchive,
                             ("'identity.json'", "size or sha256")),
        "file_sha_uppercase": (
            edit(lambda m: m["files"]["identity.json"].__setitem__(
                "sha256", m["files"]["identity.json"]["sha256"].upper())),
            BadArchive, ("'identity.json'", "size or sha256"),
        ),
        "file_entry_not_object": (edit(lambda m: m["files"].__setitem__("identity.json", "x")),
                                  BadArchive, ("'identity.json'",)),
        "names_traversal": (
            edit(lambda m: m["files"].__setitem__("../evil", {"size": 1, "sha256": "0" * 64})),
            BadArchive, ("'../evil'", "unexpected file"),
        ),
        "lists_absent_file": (
            edit(lambda m: m["files"].__setitem__(SEG, {"size": 1, "sha256": "0" * 64})),
            BadArchive, (SEG, "listed in the manifest but missing"),
        ),
        "omits_present_file": (
            edit(lambda m: m["files"].pop("fast/hot.json")),
            BadArchive, ("'fast/hot.json'", "not in the manifest"),
        ),
        "omits_identity": (edit(lambda m: m["files"].pop("identity.json")), BadArchive,
                           ("identity.json",)),
        "wrong_sha256": (file_entry("warm/engram.db", "sha256", "0" * 64), BadArchive,
                         ("warm/engram.db", "does not match the manifest")),
        "wrong_size": (
            edit(lambda m: m["files"]["fast/hot.json"].__setitem__(
                "size", m["files"]["fast/hot.json"]["size"] + 1)),
            BadArchive, ("fast/hot.json", "does not match the manifest"),
        ),
        "other_database": (set_("database_id", OTHER_DB), BadArchive, (OTHER_DB,)),
        "wrong_digest": (set_("digest", "1" * 64), CorruptData, ("digest",)),
        "wrong_snapshot_lsn": (edit(lambda m: m.__setitem__("snapshot_lsn", m["snapshot_lsn"] + 1)),
                               CorruptData, ("LSN",)),
    }


MANIFEST_CASES = sorted(_manifest_cases())


@pytest.mark.parametrize("comp", ["zst", "gz"])
@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_malformed_manifest_refused(source: Source, tmp_path: Path, case: str, comp: str) -> None:
    mutate, exc, needles = _manifest_cases()[case]
    members = source.members[comp]
    a = write_archive(tmp_path / "in", f"{case}.tar.{comp}",
                      pack(with_manifest(members, mutate(manifest_of(members))), comp))
    scene = Scene.make(tmp_path)
    refused(a, scene, exc, *needles)


@pytest.mark.parametrize("case", ["not_json", "format_version_2", "lists_absent_file",
                                  "wrong_sha256"])
def test_malformed_manifest_refused_by_cli(source: Source, tmp_path: Path, case: str) -> None:
    mutate, _, needles = _manifest_cases()[case]
    members = source.members["gz"]
    a = write_archive(tmp_path / "in", f"{case}.tar.gz",
                      pack(with_manifest(members, mutate(manifest_of(members))), "gz"))
    scene = Scene.make(tmp_path)
    cli_refused(a, scene, *needles)


# -- damaged streams: truncated, one flipped byte, appended bytes --------------------------------


def _cut_points(n: int) -> list[int]:
    return sorted({0, 1, 3, 4, 9, 20, n // 4, n // 3, n // 2, 2 * n // 3, n - 200, n - 40})


@pytest.mark.parametrize("with_sidecar", [True, False], ids=["sidecar", "no-sidecar"])
@pytest.mark.parametrize("comp", ["zst", "gz"])
def test_truncated_archive_refused(source: Source, tmp_path: Path, comp: str,
                                   with_sidecar: bool) -> None:
    data = source.archives[comp].read_bytes()
    side = source.archives[comp].with_name(source.archives[comp].name + ".sha256").read_bytes()
    for cut in _cut_points(len(data)):
        d = tmp_path / f"cut{cut}"
        a = write_archive(d / "in", f"t.tar.{comp}", data[:cut],
                          sidecar=side if with_sidecar else False)
        scene = Scene.make(d)
        e = refused(a, scene, BadArchive)
        assert any(w in e.message for w in DAMAGE_WORDS), (cut, e.message)


def _truncated_tail(source: Source, tmp_path: Path, comp: str) -> None:
    data = source.archives[comp].read_bytes()
    for short in range(1, 17):
        d = tmp_path / f"short{short}"
        a = write_archive(d / "in", f"t.tar.{comp}", data[:-short], sidecar=False)
        scene = Scene.make(d)
        e = refused(a, scene, BadArchive)
        assert any(w in e.message for w in DAMAGE_WORDS), (short, e.message)


def test_truncated_tail_refused_without_sidecar_gzip(source: Source, tmp_path: Path) -> None:
    """The last 1..16 bytes cut off (the gzip trailer, the end of the deflate stream)."""
    _truncated_tail(source, tmp_path, "gz")


def test_truncated_tail_refused_without_sidecar_zstd(source: Source, tmp_path: Path) -> None:
    _truncated_tail(source, tmp_path, "zst")


@pytest.mark.parametrize("comp", ["zst", "gz"])
def test_truncated_tail_refused_with_sidecar(source: Source, tmp_path: Path, comp: str) -> None:
    data = source.archives[comp].read_bytes()
    side = source.archives[comp].with_name(source.archives[comp].name + ".sha256").read_bytes()
    for short in (1, 2, 4, 8, 9, 16):
        d = tmp_path / f"short{short}"
        a = write_archive(d / "in", f"t.tar.{comp}", data[:-short], sidecar=side)
        scene = Scene.make(d)
        e = refused(a, scene, BadArchive)
        assert any(w in e.message for w in DAMAGE_WORDS), (short, e.message)


def _flip_offsets(n: int) -> list[int]:
    return sorted({0, 1, 4, 5, 12, 40, n // 5, n // 3, n // 2, 3 * n // 4, n - 30, n - 8,
                   n - 5, n - 1})


@pytest.mark.parametrize("comp", ["zst", "gz"])
def test_flipped_byte_with_sidecar_refused(source: Source, tmp_path: Path, comp: str) -> None:
    data = source.archives[comp].read_bytes()
    side = source.archives[comp].with_name(source.archives[comp].name + ".sha256").read_bytes()
    for off in _flip_offsets(len(data)):
        for mask in (0x01, 0x80):
            b = bytearray(data)
            b[off] ^= mask
            d = tmp_path / f"flip{off}-{mask}"
            a = write_archive(d / "in", f"f.tar.{comp}", bytes(b), sidecar=side)
            scene = Scene.make(d)
            e = refused(a, scene, EngramError)
            assert any(w in e.message for w in DAMAGE_WORDS), (off, mask, e.message)


@pytest.mark.parametrize("comp", ["zst", "gz"])
def test_flipped_byte_without_sidecar_refused_at_chosen_offsets(
    source: Source, tmp_path: Path, comp: str
) -> None:
    """Flips inside member data and tar headers (found by decompressing) are refused even with
    no sidecar to compare against."""
    data = source.archives[comp].read_bytes()
    orig = decompress(data)
    chosen = 0
    for off in _flip_offsets(len(data))[2:-1]:
        b = bytearray(data)
        b[off] ^= 0x01
        try:
            changed = decompress(bytes(b)) != orig
        except (zstandard.ZstdError, OSError, EOFError, ValueError, zlib.error):
            changed = True
        if not changed:
            continue  # this flip is invisible after decompression (e.g. a gzip header mtime)
        chosen += 1
        d = tmp_path / f"flip{off}"
        a = write_archive(d / "in", f"f.tar.{comp}", bytes(b), sidecar=False)
        scene = Scene.make(d)
        e = refused(a, scene, EngramError)
        assert any(w in e.message for w in DAMAGE_WORDS), (off, e.message)
    assert chosen >= 5


def _unhashed_regions(tar: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(free, guarded) byte ranges of a tar: free = what no member sha256 and no tar header
    checksum covers (manifest.json's data, member padding, the closing blocks); guarded = the
    rest."""
    free = []
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = tf.getmembers()
    last = 0
    for ti in members:
        end = ti.offset_data + ti.size
        last = ti.offset_data + (ti.size + 511) // 512 * 512
        if ti.name == "manifest.json":
            free.append((ti.offset_data, end))
        free.append((end, last))
    free.append((last, len(tar)))
    guarded, p = [], 0
    for a, b in free:
        guarded.append((p, a))
        p = b
    return free, guarded


def _flips_into_unhashed_bytes(data: bytes) -> list[int]:
    """Offsets of the compressed stream whose one-bit flip still decompresses, to a tar of the
    same length that differs only in bytes no member hash or header checksum covers."""
    orig = decompress(data)
    _, guarded = _unhashed_regions(orig)
    out = []
    for off in range(len(data)):
        b = bytearray(data)
        b[off] ^= 0x01
        try:
            tar = decompress(bytes(b))
        except (zstandard.ZstdError, OSError, EOFError, ValueError, zlib.error):
            continue
        if len(tar) == len(orig) and tar != orig and all(
            tar[x:y] == orig[x:y] for x, y in guarded
        ):
            out.append(off)
    return out


def _accepted_flips(source: Source, tmp_path: Path, comp: str) -> list[tuple[int, str]]:
    """Flips of the compressed stream landing in bytes only a frame checksum (or the sidecar,
    absent here) protects, that restore nevertheless accepts. Flips into member data are
    refused by the member hashes and flips into tar headers by the header checksum (both
    tested above); these are the rest."""
    # Precondition (a plain failure, not the expected one): the clean archive restores, so
    # that every acceptance counted below is real.
    restore(source.archives[comp], tmp_path / "clean")
    data = source.archives[comp].read_bytes()
    accepted = []
    for off in _flips_into_unhashed_bytes(data):
        b = bytearray(data)
        b[off] ^= 0x01
        d = tmp_path / f"f{off}"
        a = write_archive(d, f"f.tar.{comp}", bytes(b), sidecar=False)
        try:
            res = restore(a, d / "out")
        except EngramError:
            assert not (d / "out").exists()
            continue
        now = dict(read_members(a))["manifest.json"]
        was = dict(source.members[comp])["manifest.json"]
        what = "manifest.json" if now != was else "tar padding"
        accepted.append((off, f"{what}; restored counts {res.counts}"))
    return accepted


def test_every_content_changing_flip_refused_without_sidecar_gzip(
    source: Source, tmp_path: Path
) -> None:
    """gzip's CRC-32 covers the whole tar: any flip that changes it fails decompression."""
    assert _accepted_flips(source, tmp_path, "gz") == []


def test_every_content_changing_flip_refused_without_sidecar_zstd(
    source: Source, tmp_path: Path
) -> None:
    assert _accepted_flips(source, tmp_path, "zst") == []


# Zero bytes after a gzip member are legal padding (gzip(1) ignores them too), and the archive
# they follow is intact: not a damage gzip can be asked to refuse.
@pytest.mark.parametrize(
    ("comp", "tail"),
    [("zst", b"\0" * 16), ("zst", b"garbage!"), ("zst", bytes(range(256))),
     ("gz", b"garbage!"), ("gz", bytes(range(256))), ("gz", b"\0\0\0\0\x1f\x8b")],
    ids=["zst-zeros", "zst-text", "zst-bytes", "gz-text", "gz-bytes", "gz-zeros-then-magic"],
)
def test_appended_bytes_refused_without_sidecar(source: Source, tmp_path: Path, comp: str,
                                                tail: bytes) -> None:
    data = source.archives[comp].read_bytes() + tail
    a = write_archive(tmp_path / "in", f"a.tar.{comp}", data, sidecar=False)
    scene = Scene.make(tmp_path)
    e = refused(a, scene, EngramError)
    assert any(w in e.message for w in DAMAGE_WORDS + ("after",)), e.message


# -- sidecars --------------------------------------------------------------------------------------


@pytest.mark.parametrize("comp", ["zst", "gz"])
@pytest.mark.parametrize(
    "sidecar",
    [
        ("0" * 64 + "\n").encode(),
        ("f" * 64).encode(),
        ("1" * 64 + "  good.tar.zst\n").encode(),
    ],
    ids=["zeros", "no-newline", "sha256sum-format"],
)
def test_wrong_sidecar_refused(source: Source, tmp_path: Path, comp: str, sidecar: bytes) -> None:
    a = write_archive(tmp_path / "in", f"a.tar.{comp}", source.archives[comp].read_bytes(),
                      sidecar=sidecar)
    scene = Scene.make(tmp_path)
    refused(a, scene, BadArchive, "checksum mismatch", f"a.tar.{comp}.sha256")


@pytest.mark.parametrize(
    "sidecar",
    [b"", b"\n", b"not a hash\n", b"abc123\n", ("g" * 64).encode(), b"\xff" * 64,
     ("0" * 63 + "\n").encode(), ("0" * 65 + "\n").encode()],
    ids=["empty", "newline", "words", "short", "non-hex", "binary", "63-digits", "65-digits"],
)
def test_malformed_sidecar_refused(source: Source, tmp_path: Path, sidecar: bytes) -> None:
    a = write_archive(tmp_path / "in", "a.tar.zst", source.archives["zst"].read_bytes(),
                      sidecar=sidecar)
    scene = Scene.make(tmp_path)
    refused(a, scene, BadArchive, "a.tar.zst.sha256", "sha256")


def test_sidecar_in_sha256sum_format_accepted(source: Source, tmp_path: Path) -> None:
    data = source.archives["zst"].read_bytes()
    side = f"{hashlib.sha256(data).hexdigest().upper()}  a.tar.zst\n".encode()
    a = write_archive(tmp_path / "in", "a.tar.zst", data, sidecar=side)
    res = restore(a, tmp_path / "out")
    assert res.sidecar_checked and res.digest == source.digest


def test_wrong_sidecar_refused_by_cli(source: Source, tmp_path: Path) -> None:
    a = write_archive(tmp_path / "in", "a.tar.gz", source.archives["gz"].read_bytes(),
                      sidecar=b"0" * 64 + b"\n")
    scene = Scene.make(tmp_path)
    cli_refused(a, scene, "checksum mismatch")


# -- not archives at all ---------------------------------------------------------------------------


def _garbage_cases(source: Source) -> dict[str, tuple[str, bytes, tuple[str, ...]]]:
    rnd = random.Random(7)
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for ti, d in as_members(source.members["zst"]):
            tf.addfile(ti, io.BytesIO(d) if d is not None else None)
    return {
        "random": ("r.tar.zst", rnd.randbytes(200_000), ("neither zstd- nor gzip-compressed",)),
        "empty": ("e.tar.gz", b"", ("neither zstd- nor gzip-compressed",)),
        "plain_tar_of_real_backup": ("p.tar.zst", plain.getvalue(),
                                     ("neither zstd- nor gzip-compressed",)),
        "zstd_magic_then_random": ("z.tar.zst", b"\x28\xb5\x2f\xfd" + rnd.randbytes(5000),
                                   ("damaged",)),
        "gzip_of_random": ("g.tar.gz", gzip.compress(rnd.randbytes(5000), mtime=0),
                           ("invalid tar header",)),
        "zstd_of_text": ("t.tar.zst", zstandard.ZstdCompressor().compress(b"hello\n" * 200),
                         ("invalid tar header",)),
        "zstd_of_zeros": ("0.tar.zst", zstandard.ZstdCompressor().compress(b"\0" * 4096),
                          ("manifest.json",)),
    }


GARBAGE = ["random", "empty", "plain_tar_of_real_backup", "zstd_magic_then_random",
           "gzip_of_random", "zstd_of_text", "zstd_of_zeros"]


@pytest.mark.parametrize("with_sidecar", [True, False], ids=["sidecar", "no-sidecar"])
@pytest.mark.parametrize("case", GARBAGE)
def test_garbage_refused(source: Source, tmp_path: Path, case: str, with_sidecar: bool) -> None:
    name, data, needles = _garbage_cases(source)[case]
    a = write_archive(tmp_path / "in", name, data, sidecar=with_sidecar)
    scene = Scene.make(tmp_path)
    refused(a, scene, BadArchive, *needles)


@pytest.mark.parametrize("case", ["random", "empty", "plain_tar_of_real_backup"])
def test_garbage_refused_by_cli(source: Source, tmp_path: Path, case: str) -> None:
    name, data, needles = _garbage_cases(source)[case]
    a = write_archive(tmp_path / "in", name, data, sidecar=False)
    scene = Scene.make(tmp_path)
    cli_refused(a, scene, *needles)


def test_missing_archive_is_a_usage_error(tmp_path: Path) -> None:
    scene = Scene.make(tmp_path)
    cli_refused(tmp_path / "nope.tar.zst", scene, "nope.tar.zst", code=2)


# -- where a refused restore may write ------------------------------------------------------------


def test_refused_restore_creates_no_parent_dirs(tmp_path: Path) -> None:
    scene = Scene.make(tmp_path)
    to = tmp_path / "new" / "deeper" / "target"
    with pytest.raises(BadArchive):
        restore(ARCHIVES / "traversal_dotdot.tar.zst", to)
    assert not (tmp_path / "new").exists(), sorted(tree(tmp_path / "new"))
    scene.check_untouched()


# -- validate-backup names the reason too ------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["traversal_two_up", "absolute", "symlink_replaces_db", "hardlink", "chardev",
     "missing_manifest", "member_not_in_manifest"],
)
def test_validate_level2_fails_structural(source: Source, tmp_path: Path, case: str) -> None:
    build, _, needles = _structural_cases(tmp_path)[case]
    a = write_archive(tmp_path / "in", f"{case}.tar.zst", pack(build(source.members["zst"]), "zst"))
    scene = Scene.make(tmp_path, outside=[tmp_path / "evil", tmp_path / "abs-evil"])
    rep = validate_backup(a, level=2, record=False, workdir=tmp_path / "in")
    assert not rep.ok and rep.verdict.startswith("FAIL: ")
    for n in needles:
        assert n in rep.reason, (n, rep.reason)
    scene.check_untouched()


@pytest.mark.parametrize("case", ["not_json", "format_version_2", "wrong_sha256",
                                  "lists_absent_file"])
def test_validate_level2_fails_manifest(source: Source, tmp_path: Path, case: str) -> None:
    mutate, _, needles = _manifest_cases()[case]
    members = source.members["gz"]
    a = write_archive(tmp_path / "in", f"{case}.tar.gz",
                      pack(with_manifest(members, mutate(manifest_of(members))), "gz"))
    scene = Scene.make(tmp_path)
    rep = validate_backup(a, level=2, record=False, workdir=tmp_path / "in")
    assert not rep.ok
    for n in needles:
        assert n in rep.reason, (n, rep.reason)
    scene.check_untouched()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "wrong-sidecar",
                                    "flipped-no-sidecar", "garbage"])
def test_validate_level2_fails_damaged(source: Source, tmp_path: Path, damage: str) -> None:
    data = source.archives["zst"].read_bytes()
    side: bool | bytes = True
    words: tuple[str, ...] = DAMAGE_WORDS
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":
        b = bytearray(data)
        b[len(b) // 2] ^= 0x10
        data, side = bytes(b), source.archives["zst"].with_name("good.tar.zst.sha256").read_bytes()
    elif damage == "wrong-sidecar":
        side = b"0" * 64 + b"\n"
        words = ("checksum mismatch",)
    elif damage == "flipped-no-sidecar":
        # Without a sidecar an archive passes on its own checksums (one rule with restore), so
        # damage is still caught by them.
        b = bytearray(data)
        b[len(b) // 2] ^= 0x10
        data, side = bytes(b), False
    else:
        data = random.Random(3).randbytes(10_000)
    a = write_archive(tmp_path / "in", "a.tar.zst", data, sidecar=side)
    scene = Scene.make(tmp_path)
    rep = validate_backup(a, level=2, record=False, workdir=tmp_path / "in")
    assert not rep.ok and rep.reason
    assert any(w in rep.reason for w in words), rep.reason
    scene.check_untouched()


def test_validate_level2_passes_clean(source: Source, tmp_path: Path) -> None:
    a = write_archive(tmp_path / "in", "a.tar.zst", source.archives["zst"].read_bytes())
    rep = validate_backup(a, level=2, record=False, workdir=tmp_path / "in")
    assert rep.ok, rep.reason
    shutil.rmtree(tmp_path / "in")


def test_validate_checksums_step_says_what_the_extraction_checked(
    source: Source, tmp_path: Path
) -> None:
    a = write_archive(tmp_path / "in", "a.tar.zst", source.archives["zst"].read_bytes())
    rep = validate_backup(a, level=2, record=False, workdir=tmp_path / "in")
    assert rep.ok, rep.reason
    assert [s.name for s in rep.steps] == ["structure", "checksums"]
    detail = rep.steps[1].detail
    m = manifest_of(source.members["zst"])
    w, s = m["warm_lsn"], m["snapshot_lsn"]
    assert w < s  # the source holds records (W, S], so there is something to check
    assert "equal to a.tar.zst.sha256" in detail, detail
    assert f"{len(m['files'])} members' size and sha256 equal to the manifest" in detail, detail
    assert "archive header equal to the manifest" in detail, detail
    assert f"{s - w} log record CRCs and LSN continuity {w + 1}..{s} ok" in detail, detail


def test_validate_checksums_step_passes_without_a_sidecar_and_says_so(
    source: Source, tmp_path: Path
) -> None:
    """One rule with restore (docs/FORMAT.md "Restore"): without its sidecar an archive is
    checked against its own checksums and manifest, and both commands say the sidecar was
    absent in the same words (tests/unit/test_repository.py checks the two side by side)."""
    a = write_archive(tmp_path / "in", "a.tar.zst", source.archives["zst"].read_bytes(),
                      sidecar=False)
    rep = validate_backup(a, level=1, record=False, workdir=tmp_path / "in")
    assert [(s.name, s.ok) for s in rep.steps] == [("structure", True), ("checksums", True)]
    assert rep.ok and rep.reason is None
    assert rep.steps[1].detail.startswith("a.tar.zst.sha256 absent; "), rep.steps[1].detail
    assert rep.warnings == [
        "sidecar absent: a.tar.zst.sha256 is missing, so the archive's own checksums and its "
        "manifest were checked instead"
    ]


def test_validate_checksums_step_checks_the_log_records(source: Source, tmp_path: Path) -> None:
    """A log segment emptied of its records (W, S], with every member hash matching the
    manifest, fails level 2: the records are checked without a restore."""
    build, _, _ = _structural_cases(tmp_path)["log_member_emptied_of_records"]
    a = write_archive(tmp_path / "in", "a.tar.zst", pack(build(source.members["zst"]), "zst"))
    rep = validate_backup(a, level=2, record=False, workdir=tmp_path / "in")
    assert [(s.name, s.ok) for s in rep.steps] == [("structure", True), ("checksums", False)]
    m = manifest_of(source.members["zst"])
    assert rep.reason == (
        f"checksums: the archive's log records end at LSN {m['warm_lsn']}, its manifest's "
        f"snapshot LSN is {m['snapshot_lsn']}; the archive is inconsistent — use another backup"
    )


# -- the archive header (docs/FORMAT.md "Archive header") ----------------------------------------


class _BytesSink:
    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes | memoryview) -> int:
        self.buf += data
        return len(data)

    def flush(self) -> None:
        pass


def _with_header(members: list[tuple[str, bytes]], comp: str, header: dict[str, Any]) -> bytes:
    from engram.backup.archive import ArchiveWriter

    sink = _BytesSink()
    aw = ArchiveWriter(sink, "zstd" if comp == "zst" else "gzip", header=header)  # type: ignore[arg-type]
    for name, data in members:
        aw.add_bytes(name, data)
    aw.finish()
    return bytes(sink.buf)


@pytest.mark.parametrize("comp", ["zst", "gz"])
def test_archive_header_is_read_back_and_other_readers_skip_it(
    source: Source, tmp_path: Path, comp: str
) -> None:
    from engram.backup.archive import read_archive_header
    from engram.format.manifest import archive_header

    manifest = manifest_of(source.members[comp])
    a = write_archive(tmp_path / "in", f"h.tar.{comp}",
                      _with_header(source.members[comp], comp, manifest))
    assert read_archive_header(a) == archive_header(manifest)
    assert read_archive_header(source.archives[comp]) in (None, archive_header(manifest))
    # GNU tar (compression detected from the file, as `tar xf` does) and the decompressors
    # read past it.
    listed = subprocess.run(["tar", "tf", str(a)], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == [n for n, _ in source.members[comp]]
    if comp == "gz":
        subprocess.run(["gzip", "-t", str(a)], check=True)
        assert tarfile.open(fileobj=io.BytesIO(gzip.decompress(a.read_bytes()))).getnames()
    else:
        subprocess.run(["zstd", "-q", "-t", str(a)], check=True)
    res = restore(a, tmp_path / "restored")
    assert (res.snapshot_lsn, res.digest) == (source.snapshot_lsn, source.digest)


@pytest.mark.parametrize("comp", ["zst", "gz"])
def test_archive_header_that_disagrees_with_the_manifest_is_damage(
    source: Source, tmp_path: Path, comp: str
) -> None:
    manifest = manifest_of(source.members[comp])
    lying = manifest | {"snapshot_lsn": manifest["snapshot_lsn"] + 1}
    a = write_archive(tmp_path / "in", f"h.tar.{comp}",
                      _with_header(source.members[comp], comp, lying))
    scene = Scene.make(tmp_path)
    refused(a, scene, BadArchive, "archive header disagrees with its manifest", "snapshot_lsn")


@pytest.mark.parametrize("comp", ["zst", "gz"])
def test_archive_header_with_a_flipped_bit_is_refused(
    source: Source, tmp_path: Path, comp: str
) -> None:
    from engram.backup.archive import read_archive_header

    manifest = manifest_of(source.members[comp])
    data = bytearray(_with_header(source.members[comp], comp, manifest))
    at = bytes(data).index(b'"database_id"') + 3
    data[at] ^= 0x01
    a = write_archive(tmp_path / "in", f"h.tar.{comp}", bytes(data), sidecar=False)
    with pytest.raises(BadArchive, match="archive header is damaged"):
        read_archive_header(a)
