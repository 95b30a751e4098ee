"""A restore point name is used once, through a running server too (issue 8, item 9):
`POST /v1/mark` and a `mark` op in `POST /v1/batch` with a used name get 409 naming the LSN and
time of the first, `engram mark` through the server exits 1, and after a kill -9 and restart
(recovery replays the marker) the name is still taken."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from serverproc import ServerProcess

from engram.graph import Engine
from engram.model import ns_to_iso


def _engram(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "engram.cli", *args, f"--data-dir={data}"],
        capture_output=True, text=True, timeout=60, env=env,
    )


def test_a_used_name_gets_409_through_the_server(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    srv = start_server(data)
    with srv.client() as c:
        r = c.post("/v1/mark", json={"name": "before-migration"})
        assert r.status_code == 201, r.text
        lsn = r.json()["lsn"]
        assert c.get("/v1/stats").json()["lsn"] == lsn
        for req in (
            lambda: c.post("/v1/mark", json={"name": "before-migration"}),
            lambda: c.post(
                "/v1/batch",
                json={"ops": [{"op": "create_memory", "content": "x"},
                              {"op": "mark", "name": "before-migration"}]},
            ),
        ):
            r = req()
            assert r.status_code == 409, r.text
            body = r.json()
            assert body["error"] == "conflict" and body["field"] == "name"
            assert f"LSN {lsn}" in body["message"]
        assert c.get("/v1/stats").json()["lsn"] == lsn, "a refused mark writes nothing"
    p = _engram(data, "mark", "before-migration")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert f"LSN {lsn}" in p.stderr and "already exists" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    srv.kill()  # the marker is in the log; the warm tier may not have it committed
    srv = start_server(data)
    with srv.client() as c:
        r = c.post("/v1/mark", json={"name": "before-migration"})
        assert r.status_code == 409 and f"LSN {lsn}" in r.json()["message"]
        first = r.json()["message"]
    srv.stop()
    with Engine.open(data, create=False, readonly=True) as e:
        at = e.get_mark("before-migration")
    assert at is not None and at[0] == lsn
    assert ns_to_iso(at[1]) in first  # the time of the first marker, as recorded
