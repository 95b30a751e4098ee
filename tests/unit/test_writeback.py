"""Early write-back during extraction (``fsutil.start_writeback``): the kernel is asked to start
writing each member as it is extracted, in contiguous ranges, so the fsync that must follow
waits only for the tail; it is a hint that never replaces that fsync nor fails a restore."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import engram.backup.archive as archive_mod
import engram.fsutil as fsutil
from engram.backup.archive import WRITEBACK_EVERY, extract_verified
from engram.backup.full import full_backup
from engram.graph import Engine, EngineConfig
from faults import trace_fsyncs


def test_start_writeback_is_a_hint(tmp_path: Path) -> None:
    p = tmp_path / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 100_000)
        fsutil.start_writeback(fd, 0, 100_000)
        fsutil.start_writeback(fd, 0, 0)
    finally:
        os.close(fd)
    fsutil.start_writeback(fd, 0, 4096)  # a closed descriptor: ignored, not raised
    assert p.read_bytes() == b"x" * 100_000


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_extraction_starts_writeback_of_each_large_member_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = Engine.open(tmp_path / "data", EngineConfig(checkpoint_interval=3600))
    rnd = random.Random(5)
    e.apply([{"op": "create_memory", "id": f"m{i}", "content": rnd.randbytes(40_000).hex()}
             for i in range(300)])  # ~24 MB of warm tier
    e.checkpoint()
    arch = tmp_path / "b.tar.zst"
    full_backup(e, arch)
    e.close()
    calls: list[tuple[str, int, int]] = []
    real = archive_mod.start_writeback

    def spy(fd: int, off: int, n: int) -> None:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), off, n))
        real(fd, off, n)

    monkeypatch.setattr(archive_mod, "start_writeback", spy)
    dest = tmp_path / "x"
    dest.mkdir(mode=0o700)
    members, _, _ = extract_verified(arch, dest)
    db = members["warm/engram.db"].size
    assert db > 2 * WRITEBACK_EVERY
    ranges = [(off, n) for path, off, n in calls if path.endswith("warm/engram.db")]
    # Contiguous from the start, each at least WRITEBACK_EVERY, none past the member's end.
    assert ranges and ranges[0][0] == 0
    for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False):
        assert b == a + n
    assert all(n >= WRITEBACK_EVERY for _, n in ranges)
    assert ranges[-1][0] + ranges[-1][1] <= db
    # Small members are only fsynced.
    assert not [c for c in calls if c[0].endswith("manifest.json")]
    assert (dest / "warm" / "engram.db").stat().st_size == db


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_a_restore_test_is_not_fsynced_a_restore_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """validate-backup's restore is thrown away: it leaves the disk alone (no fsync, no early
    write-back of what it extracts); a real restore fsyncs every file."""
    from engram.backup.restore import restore
    from engram.backup.validate import validate_backup

    e = Engine.open(tmp_path / "data", EngineConfig(checkpoint_interval=3600))
    e.apply([{"op": "create_memory", "id": f"m{i}", "content": f"text {i}"} for i in range(50)])
    arch = tmp_path / "b.tar.zst"
    full_backup(e, arch)
    e.close()
    synced = trace_fsyncs(monkeypatch)
    monkeypatch.setattr(archive_mod, "start_writeback", lambda *a: synced.append("writeback"))
    v = validate_backup(arch, level=3, record=False, workdir=tmp_path)
    assert v.ok, v.verdict
    assert not [p for p in synced if p.endswith(("warm/engram.db", "identity.json"))]
    assert "writeback" not in synced
    synced.clear()
    restore(arch, tmp_path / "restored")
    assert any(p.endswith("warm/engram.db") for p in synced)
    assert any(p.endswith("identity.json") for p in synced)
