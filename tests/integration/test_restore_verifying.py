"""A real server on a data dir whose restore left the digest check for later: it serves while
it verifies ("verifying" in /health/ready and status), then is ready; on a tampered row it
refuses writes with 503 verification_failed and says so in its log and health."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from serverproc import ServerProcess

from engram.backup.full import full_backup
from engram.backup.restore import restore
from engram.backup.validate import validate_backup
from engram.graph import Engine, EngineConfig

# Enough rows that the check outlasts the first look at /health/ready.
MEMORIES = 40_000


def _restored(tmp_path: Path, memories: int) -> Path:
    src = tmp_path / "src"
    with Engine.open(src, EngineConfig(durability="none", checkpoint_interval=3600)) as e:
        for start in range(0, memories, 5000):
            e.apply(
                [
                    {"op": "create_memory", "id": f"m{i}", "content": f"memory number {i}"}
                    for i in range(start, min(memories, start + 5000))
                ]
            )
        archive = tmp_path / "full.tar.zst"
        full_backup(e, archive)
    assert validate_backup(archive, level=3).ok
    res = restore(archive, tmp_path / "restored")
    assert res.verification == "deferred"
    return tmp_path / "restored"


def _ready_bodies(srv: ServerProcess, until: Callable[[dict[str, Any]], bool]) -> list[Any]:
    """Every /health/ready answer (status code, body) from the first 200 or 503 on, until one
    satisfies ``until``."""
    seen: list[Any] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = httpx.get(f"{srv.url}/health/ready", timeout=5)
        body = r.json()
        if r.status_code == 200 or body.get("status") != "starting":
            seen.append((r.status_code, body))
            if until(body):
                return seen
        time.sleep(0.01)
    raise AssertionError(f"/health/ready never got there: {seen[-3:]}\n{srv.log()}")


def test_the_server_serves_while_it_verifies_then_is_ready(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    data = _restored(tmp_path, MEMORIES)
    srv = start_server(data, wait="live")
    seen = _ready_bodies(srv, lambda b: b.get("status") == "ready")
    assert seen[0][0] == 200 and seen[0][1]["status"] == "verifying", seen[:3]
    assert seen[0][1]["verification"]["state"] == "verifying"
    assert seen[-1] == (200, seen[-1][1]) and seen[-1][1]["verification"]["state"] == "verified"
    r = httpx.post(f"{srv.url}/v1/memories", json={"content": "after the check"}, timeout=10)
    assert r.status_code == 201
    assert "restored data verified" in srv.log()
    assert not (data / "verify-pending.json").exists()


def test_a_tampered_row_stops_writes_with_503(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    data = _restored(tmp_path, 2_000)
    con = sqlite3.connect(data / "warm" / "engram.db")
    with con:
        con.execute("UPDATE memories SET strength = 0.25 WHERE id = 'm17'")
    con.close()
    srv = start_server(data, wait="live")
    seen = _ready_bodies(srv, lambda b: b.get("status") == "verification_failed")
    code, body = seen[-1]
    assert code == 503
    assert "does not match full.tar.zst" in body["reason"]
    assert body["verification"]["state"] == "failed"
    r = httpx.post(f"{srv.url}/v1/memories", json={"content": "refused"}, timeout=10)
    assert r.status_code == 503
    assert r.json()["error"] == "verification_failed"
    assert "Retry-After" not in r.headers
    assert httpx.get(f"{srv.url}/v1/memories/m1", timeout=10).status_code == 200  # reads go on
    assert "VERIFICATION FAILED" in srv.log()
    assert (data / "verify-pending.json").exists()
