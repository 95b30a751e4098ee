"""A backup that fails part-way leaves nothing behind and harms nothing (issue 3, item 1; docs/
FORMAT.md "Write order"): disk full (ENOSPC) at every write the archive's temp object takes and
after any number of bytes, EIO, Ctrl-C, a failing fsync, a failing publication of the archive,
its sidecar or its catalog entry (before the step, or after it took effect). The faults come
from a store wrapper (``engram.storage.faults.FaultyStore``) around the real local store.

Each time: a BackupError whose message names the cause and the path; nothing at PATH,
PATH.sha256 or PATH.info.json; no temp file left in the directory; the earlier good backups there
byte-identical (and, at the end, still restorable); the engine still takes writes and a later
backup to the same path succeeds. Restore gets the same treatment for its extraction writes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import engram.backup.archive as archive_mod
import faults as F
from engram.backup.archive import FileSink
from engram.backup.full import BackupResult, full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.pitr import Target, restore_pitr
from engram.backup.restore import restore
from engram.cli.main import app
from engram.errors import BackupError, RestoreError
from engram.graph import Engine, EngineConfig
from engram.storage import BackupStore, LocalBackupStore, Ref
from engram.storage.faults import FaultyStore

KINDS = ["full-zst", "full-gz", "incremental"]
NEW = {"full-zst": "new.tar.zst", "full-gz": "new.tar.gz", "incremental": "new.log"}


# -- the rig: an engine, a backup dir with earlier good backups -----------------------------------


@dataclass
class Rig:
    engine: Engine
    root: Path
    bk: Path
    kind: str
    base: Path  # the earlier good full backup
    base_state: tuple[int, str]  # its (snapshot LSN, digest)
    inc: Path  # the earlier good incremental (continues from base)
    inc_state: tuple[int, str]
    files: dict[str, str] = field(default_factory=dict)  # every file in bk -> sha256

    @property
    def new(self) -> Path:
        return self.bk / NEW[self.kind]

    def backup(self, store: BackupStore | None = None) -> BackupResult:
        out = Ref(store or LocalBackupStore(self.bk), NEW[self.kind])
        if self.kind == "incremental":
            return incremental_backup(self.engine, out)
        return full_backup(self.engine, out)

    def faulty(self, **kw: Any) -> FaultyStore:
        return FaultyStore(LocalBackupStore(self.bk), **kw)

    def snapshot(self) -> None:
        self.files = _hashes(self.bk)

    def check_nothing_left(self, err: BackupError | None = None) -> None:
        p = self.new
        for q in (p, p.with_name(p.name + ".sha256"), p.with_name(p.name + ".info.json")):
            assert not q.exists(), f"{q.name} was left behind by a failed backup"
        now = _hashes(self.bk)
        assert sorted(now) == sorted(self.files), (
            f"files appeared or vanished in the backup dir: {sorted(set(now) ^ set(self.files))}"
        )
        assert now == self.files, "an earlier backup in the directory was changed"
        if err is not None:
            assert str(p) in err.message, f"the error does not name the path: {err.message}"
            assert "\n" not in err.message

    def check_engine_works(self) -> None:
        e = self.engine
        assert e.cuts.held == 0, "the failed backup did not release its cut"
        before = e.last_lsn
        r = e.apply([{"op": "activate", "id": "m0"}])
        assert r.lsn == before + 1 and e.last_lsn == r.lsn

    def check_later_backup_and_restores(self, restores: bool = True) -> None:
        """A clean backup to the same path now succeeds; the earlier ones (byte-identical,
        checked after every failure) still restore, and so does the new one."""
        e = self.engine
        lsn, digest = e.last_lsn, e.digest.hex
        res = self.backup()
        assert res.snapshot_lsn == lsn and res.digest == digest
        side = self.new.with_name(self.new.name + ".sha256").read_text()
        assert side == f"{hashlib.sha256(self.new.read_bytes()).hexdigest()}  {self.new.name}\n"
        if not restores:
            return
        got = restore(self.base, self.root / "check-base")
        assert (got.snapshot_lsn, got.digest) == self.base_state
        got2 = restore_pitr(self.base, [self.inc], Target(lsn=self.inc_state[0]),
                            self.root / "check-inc")
        assert (got2.reached_lsn, got2.digest) == self.inc_state
        if self.kind == "incremental":
            p = restore_pitr(self.base, [self.inc, self.new], Target(lsn=lsn),
                             self.root / "check-new")
            assert (p.reached_lsn, p.digest) == (lsn, digest)
        else:
            r = restore(self.new, self.root / "check-new")
            assert (r.snapshot_lsn, r.digest) == (lsn, digest)


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}


def _fill(e: Engine, rnd: random.Random, n: int, size: int, prefix: str = "m") -> None:
    for i in range(n):
        e.apply([{"op": "create_memory", "id": f"{prefix}{i}", "content": rnd.randbytes(size).hex(),
                  "metadata": {"i": i}}])


@pytest.fixture(params=KINDS)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    kind = request.param
    rnd = random.Random(20251024)
    e = Engine.open(tmp_path / "data", EngineConfig(checkpoint_interval=3600))
    try:
        # Incompressible content, so that gzip's output comes in several writes.
        _fill(e, rnd, 24, 2000)
        e.apply([{"op": "create_edge", "src": "m0", "dst": f"m{i}"} for i in range(1, 6)])
        e.checkpoint()
        e.apply([{"op": "update_memory", "id": "m1", "content": rnd.randbytes(3000).hex()}])
        bk = tmp_path / "bk"
        bk.mkdir()
        base = bk / "good.tar.zst"
        full_backup(e, base)
        base_state = (e.last_lsn, e.digest.hex)
        e.apply([{"op": "mark", "name": "after-base"}])
        _fill(e, rnd, 5, 500, prefix="i")
        inc = bk / "good-1.log"
        incremental_backup(e, inc)
        inc_state = (e.last_lsn, e.digest.hex)
        if kind == "incremental":
            # More than one batch of 4096 records, so the sink sees several writes.
            for j in range(5):
                e.apply([{"op": "create_memory", "id": f"x{j}-{i}", "content": f"r{i}"}
                         for i in range(900)])
        else:
            # Enough data that multi-threaded zstd emits its output in several writes.
            _fill(e, rnd, 4, 300_000, prefix="big")
            e.apply([{"op": "delete_memory", "id": "m23"}])
        r = Rig(e, tmp_path, bk, kind, base, base_state, inc, inc_state)
        r.snapshot()
        yield r
    finally:
        e.close()


def clean_write_count(rig: Rig) -> tuple[int, int]:
    """(writes, bytes) a clean backup of the rig's kind makes, measured in scratch copies of
    the backup dir (so that an incremental continues from the same place): the fewest of three
    runs, since multi-threaded zstd hands over its output in a number of writes that varies."""
    counts = []
    for attempt in range(3):
        scratch = rig.root / f"count-{attempt}"
        scratch.mkdir()
        for name in os.listdir(rig.bk):
            (scratch / name).write_bytes((rig.bk / name).read_bytes())
        counter = FaultyStore(LocalBackupStore(scratch))
        out = Ref(counter, NEW[rig.kind])
        if rig.kind == "incremental":
            incremental_backup(rig.engine, out)
        else:
            full_backup(rig.engine, out)
        assert counter.writes >= 2 and not counter.fired, counter.writes
        counts.append((counter.writes, counter.bytes))
    return min(counts)


def fails(rig: Rig, store: FaultyStore, *needles: str) -> BackupError:
    with pytest.raises(BackupError) as ei:
        rig.backup(store)
    for n in needles:
        assert n in ei.value.message, (n, ei.value.message)
    rig.check_nothing_left(ei.value)
    rig.check_engine_works()
    return ei.value


def fails_at(rig: Rig, needles: tuple[str, ...], **kw: Any) -> tuple[BackupError, FaultyStore]:
    """``fails`` with a store whose temp object fails as ``kw`` says. Multi-threaded zstd hands
    its output over in a number of writes (and bytes) that varies a little from run to run: a
    run that ended before the fault's write or byte was reached succeeded, so it is removed (it
    is this test's own) and the fault tried again."""
    for _ in range(5):
        store = rig.faulty(**kw)
        try:
            rig.backup(store)
        except BackupError as e:
            for n in needles:
                assert n in e.message, (n, e.message)
            rig.check_nothing_left(e)
            rig.check_engine_works()
            return e, store
        assert not store.fired
        p = rig.new
        for q in (p, p.with_name(p.name + ".sha256"), p.with_name(p.name + ".info.json")):
            q.unlink()
    pytest.fail(f"the backup never reached the fault {kw}")


# -- the archive's temp object fails --------------------------------------------------------------


def test_disk_full_at_every_write(rig: Rig) -> None:
    n, _ = clean_write_count(rig)
    for k in range(1, n + 1):
        _, store = fails_at(rig, ("disk full",), at_write=k, fault=F.enospc)
        assert store.fired, f"write {k} of {n} was never made"
    rig.check_later_backup_and_restores()


def test_disk_full_after_any_number_of_bytes(rig: Rig) -> None:
    """A filling disk: the bytes before the limit really reach the temp file, then ENOSPC."""
    _, total = clean_write_count(rig)
    points = {0, 1, 511, 512, 4096, total // 7, total // 3, total // 2, total - 4097, total - 100,
              total - 1}
    limits = sorted(x for x in points if 0 <= x < total)
    for limit in limits:
        _, store = fails_at(rig, ("disk full",), after_bytes=limit, fault=F.enospc)
        assert store.fired, f"the limit {limit} of {total} bytes was never reached"
    rig.check_later_backup_and_restores()


def test_io_error_at_every_write(rig: Rig) -> None:
    n, _ = clean_write_count(rig)
    for k in range(1, n + 1):
        err, store = fails_at(rig, ("I/O error",), at_write=k, fault=F.eio)
        assert os.strerror(errno.EIO) in err.message
        assert store.fired
    rig.check_later_backup_and_restores(restores=False)


def test_ctrl_c_at_every_write(rig: Rig) -> None:
    n, _ = clean_write_count(rig)
    for k in range(1, n + 1):
        _, store = fails_at(rig, ("interrupted",), at_write=k, fault=F.ctrl_c)
        assert store.fired
    rig.check_later_backup_and_restores(restores=False)


@pytest.mark.parametrize("fault", ["enospc", "eio"])
def test_temp_fsync_fails(rig: Rig, fault: str) -> None:
    store = rig.faulty(at_sync=True, fault=getattr(F, fault))
    fails(rig, store, "disk full" if fault == "enospc" else "I/O error")
    assert store.fired
    rig.check_later_backup_and_restores(restores=False)


def test_temp_cannot_be_created(rig: Rig) -> None:
    store = rig.faulty(at_create_temp=True, fault=F.enospc)
    fails(rig, store, "disk full")
    assert store.fired
    rig.check_later_backup_and_restores(restores=False)


# -- the publication: the archive, its sidecar, its catalog entry -------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", ["archive", "sidecar", "info"])
@pytest.mark.parametrize("fault", ["enospc", "eio"])
def test_publication_step_fails(rig: Rig, step: str, when: str, fault: str) -> None:
    """Before the step: a rename or a write that fails. After it: the step took effect (the
    object is there) and what made it durable fails, as a directory fsync does; the objects
    published so far are removed all the same."""
    store = rig.faulty(at_step=step, when=when, fault=getattr(F, fault))
    fails(rig, store, "disk full" if fault == "enospc" else "I/O error")
    assert store.fired
    rig.check_later_backup_and_restores(restores=False)


@pytest.mark.parametrize("step", ["archive", "sidecar", "info"])
def test_ctrl_c_while_publishing(rig: Rig, step: str) -> None:
    store = rig.faulty(at_step=step, when="after", fault=F.ctrl_c)
    fails(rig, store, "interrupted")
    assert store.fired
    rig.check_later_backup_and_restores(restores=False)


# -- through the CLI -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["b.tar.zst", "b.tar.gz"])
def test_cli_backup_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    dd = tmp_path / "data"
    e = Engine.open(dd, EngineConfig(checkpoint_interval=3600))
    _fill(e, random.Random(1), 10, 200)
    e.close()
    bk = tmp_path / "bk"
    bk.mkdir()
    real_write = FileSink.write

    def write(self: FileSink, data: Any) -> int:
        if self.size + len(data) > 100:
            raise F.enospc()
        return real_write(self, data)

    monkeypatch.setattr(FileSink, "write", write)
    out = bk / name
    res = CliRunner().invoke(
        app, ["backup", "--full", f"--output={out}", f"--data-dir={dd}", "--no-validate"]
    )
    assert res.exit_code == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: disk full"), res.stderr
    assert str(out) in lines[0] and "Traceback" not in res.stderr
    assert os.listdir(bk) == []
    monkeypatch.undo()
    # The data dir was released: a backup now works.
    res = CliRunner().invoke(
        app, ["backup", "--full", f"--output={out}", f"--data-dir={dd}", "--no-validate"]
    )
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert sorted(os.listdir(bk)) == [name, name + ".info.json", name + ".sha256"]


# -- restore's own writes fail -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_backup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    root = tmp_path_factory.mktemp("small")
    e = Engine.open(root / "data", EngineConfig(checkpoint_interval=3600))
    try:
        _fill(e, random.Random(5), 12, 400)
        e.checkpoint()
        e.apply([{"op": "activate", "id": "m3"}])
        full_backup(e, root / "s.tar.zst")
        return root / "s.tar.zst", e.last_lsn, e.digest.hex
    finally:
        e.close()


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("existing", [False, True], ids=["new-target", "force-over-existing"])
@pytest.mark.parametrize("fault", ["enospc", "eio", "ctrl_c"])
def test_restore_fails_at_every_extraction_write(
    small_backup: tuple[Path, int, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    fault: str, existing: bool,
) -> None:
    archive, lsn, digest = small_backup
    work = tmp_path / "work"
    work.mkdir()
    to = work / "target"
    if existing:
        to.mkdir()
        (to / "keep.txt").write_text("precious")
    before = _tree(tmp_path)

    def under_work(p: Path) -> bool:
        return work in p.parents

    # Count the extraction's writes once, on a clean run elsewhere.
    counting = F.FailingOpen(under_work)
    monkeypatch.setattr(archive_mod, "open", counting, raising=False)
    restore(archive, work / "counted")
    n = counting.counter[0]
    monkeypatch.undo()
    shutil.rmtree(work / "counted")
    assert n >= 5, n
    for k in range(1, n + 1):
        fo = F.FailingOpen(under_work, at_write=k, fault=getattr(F, fault))
        monkeypatch.setattr(archive_mod, "open", fo, raising=False)
        if fault == "ctrl_c":
            with pytest.raises(KeyboardInterrupt):
                restore(archive, to, force=existing)
        else:
            with pytest.raises(RestoreError) as ei:
                restore(archive, to, force=existing)
            word = os.strerror(errno.ENOSPC if fault == "enospc" else errno.EIO)
            assert word in ei.value.message and "not changed" in ei.value.message
        monkeypatch.undo()
        assert fo.opened, k
        assert _tree(tmp_path) == before, f"write {k} of {n}: something was left behind"
        if existing:
            assert (to / "keep.txt").read_text() == "precious"
    res = restore(archive, to, force=existing)
    assert (res.snapshot_lsn, res.digest) == (lsn, digest)
