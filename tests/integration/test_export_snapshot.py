"""GET /v1/export and `engram export` through a real server: one state at a named LSN under
concurrent writes, any string survives, the snapshot is released when the client goes away,
and the graph's bounds are 400s naming the field."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from serverproc import ServerProcess
from typer.testing import CliRunner

from engram.cli.main import app

runner = CliRunner()


def okj(*args: str) -> Any:
    res = runner.invoke(app, [*args, "--json"], env={"ENGRAM_TOKEN": None})
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return json.loads(res.stdout)


def test_export_is_one_state_under_concurrent_writes(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server()
    with srv.client() as c:
        seed = [{"op": "create_memory", "id": str(uuid.uuid4()), "content": "seed"}
                for _ in range(4000)]
        assert c.post("/v1/batch", json={"ops": seed}).status_code == 200

    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        # Linked pairs under random ids (so they land all over the export's id order), and
        # the oldest pairs deleted again, with their edges.
        live: list[str] = []
        try:
            with srv.client() as w:
                while not stop.is_set():
                    a, b = str(uuid.uuid4()), str(uuid.uuid4())
                    ops: list[dict[str, Any]] = [
                        {"op": "create_memory", "id": a, "content": "a"},
                        {"op": "create_memory", "id": b, "content": "b"},
                        {"op": "create_edge", "src": a, "dst": b},
                        {"op": "create_edge", "src": b, "dst": a},
                    ]
                    if len(live) > 40:
                        ops.append({"op": "delete_memory", "id": live.pop(0)})
                    r = w.post("/v1/batch", json={"ops": ops})
                    assert r.status_code == 200, r.text
                    live += [a, b]
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    exports: list[tuple[int, str, bytes]] = []
    try:
        with srv.client(timeout=60) as c:
            for _ in range(8):
                time.sleep(0.05)
                r = c.get("/v1/export")
                assert r.status_code == 200
                exports.append((r.headers.get("x-engram-lsn"),
                                r.headers.get("x-engram-digest"), r.content))
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    for _, _, body in exports:
        ops = [json.loads(line) for line in body.split(b"\n") if line]
        ids = {o["id"] for o in ops if o["op"] == "create_memory"}
        for o in ops:
            if o["op"] == "create_edge":
                assert o["src"] in ids and o["dst"] in ids, o
    assert all(lsn is not None for lsn, _, _ in exports)
    assert len({lsn for lsn, _, _ in exports}) > 1  # the writes went on meanwhile

    # The last one imports as is into a fresh data dir, onto the very state it names.
    lsn, digest, body = exports[-1]
    f = tmp_path / "export.jsonl"
    f.write_bytes(body)
    okj("init", "--data-dir", str(tmp_path / "fresh"))
    okj("import", "--data-dir", str(tmp_path / "fresh"), "--file", str(f))
    assert okj("stats", "--data-dir", str(tmp_path / "fresh"))["digest"] == digest


def test_cli_export_through_the_server_keeps_any_string(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server()
    odd = "line\u2028sep\u2029para\u0085next\r\nend\x0b\x0c\x1c\x1d\x1e"
    with srv.client() as c:
        r = c.post("/v1/batch", json={"ops": [
            {"op": "create_memory", "id": "odd", "content": odd, "metadata": {odd: [odd]}},
            {"op": "create_memory", "id": "plain", "content": "plain"},
            {"op": "create_edge", "src": "odd", "dst": "plain"},
        ]})
        assert r.status_code == 200
        stats = c.get("/v1/stats").json()
    f = tmp_path / "odd.jsonl"
    out = okj("export", "--data-dir", str(srv.data_dir), "--output", str(f))
    assert (out["memories"], out["edges"]) == (2, 1)
    assert (out["lsn"], out["digest"]) == (stats["lsn"], stats["digest"])
    first = json.loads(f.read_bytes().split(b"\n")[0])
    assert first["content"] == odd and first["metadata"] == {odd: [odd]}
    okj("init", "--data-dir", str(tmp_path / "copy"))
    okj("import", "--data-dir", str(tmp_path / "copy"), "--file", str(f))
    assert okj("stats", "--data-dir", str(tmp_path / "copy"))["digest"] == stats["digest"]


def _wal_fully_checkpointable(db: Path) -> bool:
    """A passive checkpoint from another process copies every WAL frame unless some reader
    still holds an older snapshot."""
    conn = sqlite3.connect(str(db), timeout=5)
    try:
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        conn.close()
    return bool(busy == 0 and frames == copied)


def test_a_stalled_export_blocks_no_writer_and_ends_with_its_client(
    start_server: Callable[..., ServerProcess],
) -> None:
    srv = start_server()
    db = srv.data_dir / "warm" / "engram.db"
    body = "x" * 2000
    with srv.client() as c:
        for n in range(10):  # ~20 MB of export: far more than the socket buffers hold
            ops = [{"op": "create_memory", "id": f"m{n}-{i}", "content": body}
                   for i in range(1000)]
            assert c.post("/v1/batch", json={"ops": ops}).status_code == 200
    assert srv.url is not None
    host, port = httpx.URL(srv.url).host, httpx.URL(srv.url).port
    sock = socket.create_connection((host, port))
    try:
        sock.sendall(f"GET /v1/export HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert b"x-engram-lsn" in sock.recv(65536)  # started, then never read again
        with srv.client() as c:
            lsn0 = c.get("/v1/stats").json()["tiers"]["warm"]["applied_lsn"]
            t0 = time.monotonic()
            for i in range(100):
                r = c.post("/v1/memories", json={"id": f"w{i}", "content": "during"})
                assert r.status_code == 201
            assert time.monotonic() - t0 < 10
            deadline = time.monotonic() + 10  # checkpoints go on (one a second)
            while c.get("/v1/stats").json()["tiers"]["warm"]["applied_lsn"] <= lsn0:
                assert time.monotonic() < deadline, "no checkpoint during the export"
                time.sleep(0.1)
        assert not _wal_fully_checkpointable(db)  # the export still holds its snapshot
    finally:
        sock.close()
    deadline = time.monotonic() + 10
    while not _wal_fully_checkpointable(db):
        assert time.monotonic() < deadline, "the export's snapshot outlived its client"
        time.sleep(0.1)


def test_out_of_range_weights_and_times_are_400s_naming_the_field(
    start_server: Callable[..., ServerProcess],
) -> None:
    srv = start_server()
    with srv.client() as c:
        for mid in ("a", "b"):
            assert c.post("/v1/memories", json={"id": mid, "content": mid}).status_code == 201
        for weight in (1.7976931348623157e308, -1.7e308, 1_000_000.5, -2e6, 10**400):
            raw = f'{{"src": "a", "dst": "b", "weight": {weight}}}'
            r = c.post("/v1/edges", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["field"] == "weight", r.text
            if isinstance(weight, int):
                continue
            r = c.post("/v1/batch", json={"ops": [
                {"op": "create_edge", "src": "a", "dst": "b", "weight": weight}]})
            assert r.status_code == 400 and r.json()["field"] == "weight", r.text
        r = c.post("/v1/edges", json={"src": "a", "dst": "b", "weight": 1e6})
        assert r.status_code == 201
        r = c.get("/v1/recall", params={"query": "a"})
        assert r.status_code == 200 and r.json()["results"][0]["score"] > 0
        now = time.time_ns()
        bad = [
            ({"created_at": "2024-01-01T00:00:00Z"}, "created_at"),
            ({"created_at": -5}, "created_at"),
            ({"created_at": now + 3600 * 10**9}, "created_at"),
            ({"created_at": now - 10, "updated_at": now - 20}, "updated_at"),
            ({"last_activated_at": 1.5}, "last_activated_at"),
            ({"activation_count": -1}, "activation_count"),
        ]
        for fields, field in bad:
            r = c.post("/v1/memories", json={"content": "t", **fields})
            assert r.status_code == 400 and r.json()["field"] == field, (fields, r.text)
        r = c.post("/v1/memories", json={"id": "old", "content": "t", "created_at": now - 10,
                                         "updated_at": now - 5})
        assert r.status_code == 201
        assert c.get("/v1/memories/old").json()["created_at"].startswith(
            time.strftime("%Y-%m-%d", time.gmtime(now / 1e9)))
