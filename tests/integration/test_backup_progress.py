"""The progress a client shows of a backup taken through the server moves, never goes back,
never passes its total and ends at it (the server's total is an estimate: the bytes of the files
it archives, while its count of done bytes includes the archive's own members)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from serverproc import ServerProcess

from engram.backend import RemoteBackend
from engram.backup.request import BackupRequest
from engram.client import EngramClient, _Progress


def _fill(srv: ServerProcess, n: int, size: int) -> None:
    with srv.client() as c:
        for i in range(0, n, 50):
            ops = [
                {"op": "create_memory", "id": f"m{j}", "content": os.urandom(size).hex()}
                for j in range(i, min(n, i + 50))
            ]
            assert c.post("/v1/batch", json={"ops": ops}).status_code == 200


def _check(seen: list[tuple[int, int]]) -> None:
    assert seen, "no progress was shown"
    dones = [d for d, _ in seen]
    assert dones == sorted(dones), seen  # never decreases
    assert all(0 <= d <= t for d, t in seen if t), seen  # never past its total
    assert seen[-1][0] == seen[-1][1] > 0, seen  # ends at its total


def test_overshooting_and_short_frames_are_shown_right() -> None:
    seen: list[tuple[int, int]] = []
    p = _Progress(lambda d, t: seen.append((d, t)))
    for done in (10, 60, 40, 120, 130):  # out of order, then past the total of 100
        p.report(done, 100)
    p.finish(999)
    assert seen == [(10, 100), (60, 100), (60, 100), (100, 100), (100, 100), (100, 100)]
    seen.clear()
    _Progress(lambda d, t: seen.append((d, t))).finish(42)  # no frame came: the size is all
    assert seen == [(42, 42)]
    _Progress(None).report(1, 2)  # no callback: nothing to show, nothing fails


@pytest.mark.parametrize(
    ("kind", "priority"), [("full", "low"), ("full", "normal"), ("incremental", None)]
)
def test_a_streamed_backup_shows_its_progress(
    start_server: Callable[..., ServerProcess],
    tmp_path: Path,
    kind: str,
    priority: str | None,
) -> None:
    srv = start_server(tmp_path / "data")
    _fill(srv, 400, 4000)
    seen: list[tuple[int, int]] = []
    out = tmp_path / ("b.tar.zst" if kind == "full" else "b.log")
    req = BackupRequest(kind, str(out), priority=priority, since_lsn=1 if kind != "full" else None)
    assert srv.url is not None
    with EngramClient(srv.url) as client:
        res = RemoteBackend(client).backup(req, lambda d, t: seen.append((d, t)))
    assert res["size"] == out.stat().st_size
    _check(seen)
