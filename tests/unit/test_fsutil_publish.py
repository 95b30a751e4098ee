"""Publishing without replacing, and work files whose owner is known (fsutil)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from engram.fsutil import (
    create_owned_dir,
    create_owned_file,
    remove_stale,
    rename_noreplace,
    write_new,
)


def test_rename_noreplace_refuses_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"new")
    (tmp_path / "b").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"old"
    assert (tmp_path / "a").read_bytes() == b"new"
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_bytes() == b"new" and not (tmp_path / "a").exists()


def test_rename_noreplace_refuses_an_existing_dir_and_symlink(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "src", tmp_path / "dst")
    (tmp_path / "link").symlink_to("/dev/null")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "src", tmp_path / "link")
    assert (tmp_path / "link").is_symlink()


def test_concurrent_publishers_exactly_one_wins(tmp_path: Path) -> None:
    target = tmp_path / "out"
    results: list[str] = []
    barrier = threading.Barrier(8)

    def publish(i: int) -> None:
        barrier.wait()
        try:
            write_new(target, f"writer {i}".encode())
            results.append(f"won {i}")
        except FileExistsError:
            results.append("lost")

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1 and results.count("lost") == 7
    assert target.read_text() == f"writer {winners[0].split()[1]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp file left


def _holder(path: Path, kind: str) -> subprocess.Popen[str]:
    """A process that creates an owned work file or dir and waits (as a live backup would)."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from engram.fsutil import create_owned_dir, create_owned_file
        p = Path({str(path)!r})
        if {kind!r} == "file":
            fd, lock = create_owned_file(p)
        else:
            lock = create_owned_dir(p)
            (p / "data").write_bytes(b"x" * 1000)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_remove_stale_spares_a_live_owner_and_removes_a_killed_ones(
    tmp_path: Path, kind: str
) -> None:
    work = tmp_path / f".work-{kind}"
    proc = _holder(work, kind)
    try:
        def match(name: str) -> bool:
            return name.startswith(".work-")

        assert remove_stale(tmp_path, match) == []
        assert work.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert remove_stale(tmp_path, match) == [work]
        assert not os.path.lexists(work)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_remove_stale_leaves_unmatched_and_symlinks(tmp_path: Path) -> None:
    (tmp_path / "keep").write_bytes(b"x")
    (tmp_path / ".work-link").symlink_to(tmp_path / "keep")
    # "keep" is unlocked but not one of ours; the symlink matches but is never followed.
    assert remove_stale(tmp_path, lambda n: n.startswith(".work")) == []
    assert (tmp_path / ".work-link").is_symlink() and (tmp_path / "keep").exists()


def test_owned_file_and_dir_release(tmp_path: Path) -> None:
    fd, lock = create_owned_file(tmp_path / ".f")
    os.close(fd)
    d = create_owned_dir(tmp_path / ".d")
    assert remove_stale(tmp_path, lambda n: n.startswith(".")) == []
    lock.release()
    d.release()
    assert sorted(p.name for p in remove_stale(tmp_path, lambda n: n.startswith("."))) == [
        ".d",
        ".f",
    ]
