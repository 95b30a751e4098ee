"""A full disk under the warm tier is named as such ("the disk holding … is full; free space and
run the command again"), never reported as damage ("disk I/O error; restore from a backup")."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engram.errors import CorruptData, DiskFull
from engram.graph import Engine, EngineConfig
from engram.tiers.warm import WarmTier


def small_store(root: Path) -> Path:
    with Engine.open(root, EngineConfig(checkpoint_interval=3600)) as eng:
        eng.apply([{"op": "create_memory", "id": f"m{i}", "content": f"x {i}"} for i in range(200)])
    return root / "warm" / "engram.db"


def test_sqlite_full_is_disk_full(tmp_path: Path) -> None:
    # SQLite's own "database or disk is full" (SQLITE_FULL), here from a page limit.
    db = small_store(tmp_path / "d")
    warm = WarmTier(db)
    try:
        # Rows the index does not cover yet: rebuilding it then needs pages the file lacks.
        words = " ".join(f"w{i}" for i in range(400))
        warm.conn.execute("UPDATE memories SET content = ? || rowid", (words,))
        pages = warm.conn.execute("PRAGMA page_count").fetchone()[0]
        warm.conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(DiskFull, match=r"the disk holding .* is full; free space and run"):
            warm.rebuild_index()
    finally:
        warm.close()


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> None:
    """Write until the file system has no block left (smaller writes take the last ones)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_opening_the_warm_tier_on_a_full_disk_says_so(tmp_path: Path, full_fs: Path) -> None:
    src = small_store(tmp_path / "d")
    warm_dir = full_fs / "warm"
    warm_dir.mkdir()
    shutil.copy(src, warm_dir / "engram.db")  # a staged restore: the file is there, -wal is not
    fill(full_fs)
    with pytest.raises(DiskFull) as got:
        WarmTier(warm_dir / "engram.db")
    assert got.value.message == (
        f"the disk holding {warm_dir} is full; free space and run the command again"
    )
    assert not isinstance(got.value, CorruptData)
    # With space again the same file opens: nothing was damaged.
    (full_fs / "filler").unlink()
    WarmTier(warm_dir / "engram.db").close()


def test_creating_the_warm_tier_on_a_full_disk_says_so(full_fs: Path) -> None:
    fill(full_fs)
    with pytest.raises(DiskFull, match="is full"):
        WarmTier(full_fs / "engram.db")
