"""The ``BackupStore`` contract, run against every store (STYLE habit 4): the local directory,
the fault-injecting wrapper around it (without faults it must be indistinguishable), and the
object store's (``ObjectBackupStore``) on a directory, on moto and on SeaweedFS.

Create, publish, list, open, read and write info; a publish or create never replaces; a failed
publication leaves nothing once discarded; two writers racing for one name end with one winner
and the loser removes nothing of the winner's; a killed writer's temp is removed by the next
writer's ``prepare`` while a live writer's stays.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from engram.errors import UsageError
from engram.storage import BackupStore, LocalBackupStore, info_name, sidecar_name
from engram.storage.dirobjects import DirObjectStore
from engram.storage.faults import FaultyStore, eio, enospc, interrupt
from engram.storage.objectbackup import ObjectBackupStore
from engram.storage.retry import Backoff, RetryingObjectStore
from s3servers import s3_store

Make = Callable[[Path], BackupStore]
STORES: dict[str, Make] = {
    "local": LocalBackupStore,
    "faulty-pass-through": lambda d: FaultyStore(LocalBackupStore(d)),
    "objects-dir": lambda d: ObjectBackupStore(DirObjectStore(d)),
}
# Stores on the S3 servers the session starts (tests/conftest.py): kind -> fixture.
S3_STORES = {"moto": "moto_s3", "seaweedfs": "seaweed_s3"}
# How a child process makes the same kind of store (for the killed-writer test).
CHILD_STORES = {
    "local": "LocalBackupStore(d)",
    "faulty-pass-through": "FaultyStore(LocalBackupStore(d))",
}


@pytest.fixture(params=sorted(STORES) + sorted(S3_STORES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> BackupStore:
    if kind in S3_STORES:
        server = request.getfixturevalue(S3_STORES[kind])
        fast = Backoff(base=0.01, cap=0.05, budget=0.5)
        return ObjectBackupStore(RetryingObjectStore(s3_store(server), fast))
    d = tmp_path / "store"
    d.mkdir()
    return STORES[kind](d)


def _files(store: BackupStore) -> list[str]:
    """Every file in the store's directory, temps included (what a failure may leave); for an
    object store, every object and every upload in progress."""
    if isinstance(store, ObjectBackupStore):
        objects = store.objects
        uploads = [f"{u.key} (upload in progress)" for u in objects.uploads()]
        return sorted([i.key for i in objects.list()] + uploads)
    root = Path(store.describe())
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _publish(store: BackupStore, name: str, data: bytes, side: bytes, info: bytes) -> None:
    temp = store.create_temp(name)
    try:
        temp.write(data[:3])
        temp.write(data[3:])
        temp.sync_close()
        store.publish(temp)
        store.create(sidecar_name(name), side, temp)
        store.create(info_name(name), info, temp)
    except BaseException:
        store.discard(temp)
        raise
    store.commit(temp)


def test_create_publish_list_open_info(store: BackupStore) -> None:
    assert store.prepare() == []
    assert store.list() == []
    _publish(store, "a.tar.zst", b"archive bytes", b"hash\n", b'{"v": 1}')
    names = ["a.tar.zst", "a.tar.zst.info.json", "a.tar.zst.sha256"]
    assert store.list() == names
    assert _files(store) == names  # no temp is left
    assert store.list("a.tar.zst.") == names[1:] and store.list("b") == []
    assert store.exists("a.tar.zst") and not store.exists("b.log")
    assert store.size("a.tar.zst") == len(b"archive bytes")
    with store.open("a.tar.zst") as f:
        assert f.read(7) == b"archive" and f.read() == b" bytes"
    assert store.read(sidecar_name("a.tar.zst")) == b"hash\n"
    assert store.read(info_name("a.tar.zst")) == b'{"v": 1}'
    store.replace(info_name("a.tar.zst"), b'{"v": 2}')
    assert store.read(info_name("a.tar.zst")) == b'{"v": 2}'
    assert store.list() == names and _files(store) == names
    assert store.describe("a.tar.zst").endswith("a.tar.zst")


def test_missing_objects(store: BackupStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.open("nothing.log")
    with pytest.raises(FileNotFoundError):
        store.read("nothing.log")
    with pytest.raises(FileNotFoundError):
        store.size("nothing.log")


def test_publish_never_replaces(store: BackupStore) -> None:
    _publish(store, "a.log", b"first", b"s1\n", b"i1")
    temp = store.create_temp("a.log")
    temp.write(b"second")
    temp.sync_close()
    with pytest.raises(FileExistsError):
        store.publish(temp)
    store.discard(temp)
    with store.open("a.log") as f:
        assert f.read() == b"first"
    assert _files(store) == ["a.log", "a.log.info.json", "a.log.sha256"]


@pytest.mark.parametrize("which", ["sidecar", "info"])
def test_create_never_replaces(store: BackupStore, which: str) -> None:
    name = sidecar_name("x.log") if which == "sidecar" else info_name("x.log")
    store.create(name, b"mine")
    with pytest.raises(FileExistsError):
        store.create(name, b"theirs")
    assert store.read(name) == b"mine" and _files(store) == [name]


def test_a_taken_companion_fails_the_publication_and_nothing_of_it_stays(
    store: BackupStore,
) -> None:
    """A stray sidecar under the name: the archive published first is removed again."""
    store.create(sidecar_name("b.log"), b"someone else's\n")
    with pytest.raises(FileExistsError):
        _publish(store, "b.log", b"data", b"s\n", b"i")
    assert _files(store) == ["b.log.sha256"]
    assert store.read("b.log.sha256") == b"someone else's\n"


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", ["archive", "sidecar", "info"])
@pytest.mark.parametrize("fault", [enospc, eio, interrupt], ids=["enospc", "eio", "ctrl-c"])
def test_a_failed_publication_leaves_nothing(
    store: BackupStore, step: str, when: str, fault: Callable[[], BaseException]
) -> None:
    _publish(store, "old.log", b"kept", b"k\n", b"ki")
    before = {n: store.read(n) for n in store.list()}
    faulty = FaultyStore(store, at_step=step, when=when, fault=fault)  # type: ignore[arg-type]
    with pytest.raises(type(fault())):
        _publish(faulty, "new.log", b"data", b"s\n", b"i")
    assert faulty.fired
    assert {n: store.read(n) for n in store.list()} == before
    assert _files(store) == sorted(before)


@pytest.mark.parametrize(
    "kw", [{"at_write": 2}, {"after_bytes": 4}, {"at_sync": True}, {"at_create_temp": True}]
)
def test_a_failed_temp_leaves_nothing(store: BackupStore, kw: dict[str, object]) -> None:
    faulty = FaultyStore(store, **kw)  # type: ignore[arg-type]
    with pytest.raises(OSError):
        _publish(faulty, "new.tar.gz", b"0123456789", b"s\n", b"i")
    assert faulty.fired and _files(store) == []


def test_two_writers_one_name(store: BackupStore) -> None:
    a, b = store.create_temp("n.log"), store.create_temp("n.log")
    for t, data in ((a, b"from a"), (b, b"from b")):
        t.write(data)
        t.sync_close()
    store.publish(a)
    with pytest.raises(FileExistsError):
        store.publish(b)
    store.discard(b)  # the loser removes its own, never the winner's
    store.create(sidecar_name("n.log"), b"a\n", a)
    store.create(info_name("n.log"), b"ia", a)
    store.commit(a)
    store.discard(a)  # after commit: nothing
    with store.open("n.log") as f:
        assert f.read() == b"from a"
    assert _files(store) == ["n.log", "n.log.info.json", "n.log.sha256"]


def test_names_are_relative_keys(store: BackupStore) -> None:
    if not isinstance(store, ObjectBackupStore):  # a directory lists one level of subdirs
        (Path(store.describe()) / "sub").mkdir()
    _publish(store, "sub/c.log", b"c", b"s\n", b"i")
    assert store.list("sub/") == ["sub/c.log", "sub/c.log.info.json", "sub/c.log.sha256"]
    for bad in ("../x.log", "/abs.log", "a/../b.log", ""):
        with pytest.raises(ValueError):
            store.exists(bad)


def test_a_killed_writers_temp_is_removed_by_the_next(
    store: BackupStore, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    if kind not in CHILD_STORES:
        pytest.skip("an object store tells a dead writer's upload by its age: test_object_backup")
    root = Path(store.describe())
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from engram.storage import LocalBackupStore
        from engram.storage.faults import FaultyStore
        d = Path({str(root)!r})
        s = {CHILD_STORES[kind]}
        t = s.create_temp("k.tar.zst")
        t.write(b"half an archive")
        print("writing", flush=True)
        time.sleep(600)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        live = store.create_temp("l.tar.zst")  # this process's, alive
        temps = [n for n in os.listdir(root) if ".tmp-" in n]
        assert len(temps) == 2
        assert store.list() == []  # temps are not published objects
        assert store.prepare() == []  # both owners alive: nothing removed
        child.send_signal(signal.SIGKILL)
        child.wait()
        with caplog.at_level("WARNING", logger="engram"):
            removed = store.prepare()
        (stale,) = [n for n in temps if n.startswith(".k.tar.zst.tmp-")]
        assert removed == [stale]
        assert f"removed {stale} left by a killed backup (pid {child.pid})" in caplog.messages
        left = os.listdir(root)
        assert stale not in left and any(n.startswith(".l.tar.zst.tmp-") for n in left)
        store.discard(live)
        assert os.listdir(root) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_local_store_of_a_missing_directory(tmp_path: Path) -> None:
    s = LocalBackupStore(tmp_path / "nope")
    assert s.list() == []
    with pytest.raises(UsageError, match="does not exist; create it first"):
        s.prepare()
