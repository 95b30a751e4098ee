"""The HTTP API against a real server process: every route, every bad input, auth, ownership."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverproc import SMALL_BODY, ServerProcess
from serverproc import TEST_TOKEN as TOKEN

from engram.datadir import read_owner
from engram.graph import Engine
from engram.server import create_app


def uid(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def c(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def create(c: httpx.Client, content: str = "some text", **fields: Any) -> str:
    r = c.post("/v1/memories", json={"content": content, **fields})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def lsn(c: httpx.Client) -> int:
    return int(c.get("/v1/stats").json()["lsn"])


def assert_error(r: httpx.Response, status: int, field: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["error"] and body["message"]
    if field is not None:
        assert body.get("field") == field, body
    return dict(body)


# -- health -------------------------------------------------------------------------------


def test_health_is_open_without_token(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "live"}
    r = httpx.get(f"{server.url}/health/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


# -- memories -----------------------------------------------------------------------------


def test_memory_lifecycle(c: httpx.Client) -> None:
    mid = uid()
    r = c.post(
        "/v1/memories",
        json={"id": mid, "content": "the cat sat", "strength": 0.7, "metadata": {"k": [1, 2]}},
    )
    assert r.status_code == 201
    assert r.json()["id"] == mid and r.json()["lsn"] >= 1

    got = c.get(f"/v1/memories/{mid}")
    assert got.status_code == 200
    m = got.json()
    assert (m["id"], m["content"], m["strength"], m["metadata"]) == (
        mid,
        "the cat sat",
        0.7,
        {"k": [1, 2]},
    )
    assert m["activation_count"] == 0 and "effective_strength" in m

    r = c.patch(f"/v1/memories/{mid}", json={"content": "the cat left", "strength": 0.2})
    assert r.status_code == 200 and r.json()["id"] == mid and r.json()["lsn"] > 0
    m = c.get(f"/v1/memories/{mid}").json()
    assert m["content"] == "the cat left" and m["strength"] == 0.2

    r = c.delete(f"/v1/memories/{mid}")
    assert r.status_code == 200
    assert r.json()["id"] == mid and r.json()["edges_deleted"] == 0 and r.json()["lsn"] > 0
    assert_error(c.get(f"/v1/memories/{mid}"), 404, "id")


def test_create_without_id_gets_one(c: httpx.Client) -> None:
    r = c.post("/v1/memories", json={"content": "anonymous"})
    assert r.status_code == 201
    assert c.get(f"/v1/memories/{r.json()['id']}").json()["content"] == "anonymous"


def test_ids_with_slashes(c: httpx.Client) -> None:
    mid = f"notes/{uid()}/x"
    create(c, id=mid)
    encoded = mid.replace("/", "%2F")
    assert c.get(f"/v1/memories/{encoded}").json()["id"] == mid
    assert c.get(f"/v1/memories/{mid}").json()["id"] == mid
    r = c.post(f"/v1/memories/{encoded}/activate")
    assert r.status_code == 200 and r.json()["id"] == mid
    r = c.get(f"/v1/memories/{encoded}/neighbors")
    assert r.status_code == 200 and r.json() == {"id": mid, "neighbors": []}


def test_activate(c: httpx.Client) -> None:
    mid = create(c, strength=0.5)
    r = c.post(f"/v1/memories/{mid}/activate")  # no body: default boost
    assert r.status_code == 200
    assert r.json()["id"] == mid and 0.59 < r.json()["strength"] <= 0.6
    r = c.post(f"/v1/memories/{mid}/activate", json={"boost": 0.3})
    assert r.status_code == 200 and 0.89 < r.json()["strength"] <= 0.9
    m = c.get(f"/v1/memories/{mid}").json()
    assert m["activation_count"] == 2 and m["last_activated_at"] is not None


def test_conflicting_create_is_409(c: httpx.Client) -> None:
    mid = create(c)
    assert_error(c.post("/v1/memories", json={"id": mid, "content": "again"}), 409, "id")


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/activate"), ("GET", "/neighbors")],
)
def test_missing_memory_is_404(c: httpx.Client, method: str, suffix: str) -> None:
    body = {"content": "x"} if method == "PATCH" else None
    r = c.request(method, f"/v1/memories/{uid('absent')}{suffix}", json=body)
    assert_error(r, 404, "id")


# -- edges, neighbors, recall -------------------------------------------------------------


def test_edges_and_neighbors(c: httpx.Client) -> None:
    a, b, d = create(c), create(c), create(c)
    r = c.post("/v1/edges", json={"src": a, "dst": b})
    assert r.status_code == 201
    assert r.json()["src"] == a and r.json()["dst"] == b and r.json()["kind"] == "related"
    r = c.post("/v1/edges", json={"src": b, "dst": d, "kind": "causes", "weight": 0.5})
    assert r.status_code == 201 and r.json()["kind"] == "causes"

    out = c.get(f"/v1/memories/{a}/neighbors", params={"direction": "out"}).json()
    assert out["id"] == a and [n["memory"]["id"] for n in out["neighbors"]] == [b]
    deep = c.get(f"/v1/memories/{a}/neighbors", params={"direction": "out", "depth": 2}).json()
    assert [(n["memory"]["id"], n["depth"]) for n in deep["neighbors"]] == [(b, 1), (d, 2)]
    into = c.get(f"/v1/memories/{d}/neighbors", params={"direction": "in"}).json()
    assert [n["edge"]["kind"] for n in into["neighbors"]] == ["causes"]
    both = c.get(f"/v1/memories/{b}/neighbors").json()
    assert {n["memory"]["id"] for n in both["neighbors"]} == {a, d}

    r = c.delete("/v1/edges", params={"src": b, "dst": d, "kind": "causes"})
    assert r.status_code == 200
    assert r.json() == {"src": b, "dst": d, "kind": "causes", "lsn": r.json()["lsn"]}
    assert_error(c.delete("/v1/edges", params={"src": b, "dst": d, "kind": "causes"}), 404, None)

    # Deleting a memory deletes its edges.
    r = c.delete(f"/v1/memories/{b}")
    assert r.status_code == 200 and r.json()["edges_deleted"] == 1
    assert c.get(f"/v1/memories/{a}/neighbors").json()["neighbors"] == []


def test_recall(c: httpx.Client) -> None:
    word = uuid.uuid4().hex[:10]
    hit = create(c, f"remember the {word} quickly", strength=0.9)
    linked = create(c, "no match in here")
    create(c, "unrelated text entirely")
    c.post("/v1/edges", json={"src": hit, "dst": linked})
    r = c.get("/v1/recall", params={"query": word, "limit": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == word
    ids = [x["id"] for x in body["results"]]
    assert ids[0] == hit and body["results"][0]["matched"] is True
    assert linked in ids  # reached by spreading activation over the edge
    assert all("score" in x for x in body["results"])


# -- stats, batch, mark, export -----------------------------------------------------------


def test_stats(c: httpx.Client) -> None:
    create(c)
    s = c.get("/v1/stats").json()
    assert {"memories", "edges", "lsn", "digest", "tiers"} <= set(s)
    assert s["memories"] >= 1 and s["lsn"] >= 1 and len(s["digest"]) == 64


def test_batch_applies_all(c: httpx.Client) -> None:
    a, b = uid(), uid()
    ops = [
        {"op": "create_memory", "id": a, "content": "first"},
        {"op": "create_memory", "id": b, "content": "second"},
        {"op": "create_edge", "src": a, "dst": b},
        {"op": "activate", "id": a},
        {"op": "update_memory", "id": b, "content": "second, edited"},
    ]
    before = lsn(c)
    r = c.post("/v1/batch", json={"ops": ops})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["lsn"] == before + 5
    assert [x["op"] for x in body["results"]] == [o["op"] for o in ops]
    assert c.get(f"/v1/memories/{b}").json()["content"] == "second, edited"


@pytest.mark.parametrize(
    ("bad_op", "status", "field"),
    [
        ({"op": "frobnicate", "id": "x"}, 400, "op"),
        ({"op": "create_edge", "src": "FIRST", "dst": "nope-missing"}, 404, "dst"),
        ({"op": "create_memory", "content": "x", "strength": 1.5}, 400, "strength"),
        ({"op": "update_memory", "id": "FIRST", "bogus": 1}, 400, "bogus"),
        ("not an object", 400, "op"),
    ],
)
def test_batch_is_atomic(c: httpx.Client, bad_op: Any, status: int, field: str) -> None:
    first = uid()
    if isinstance(bad_op, dict):
        bad_op = {k: first if v == "FIRST" else v for k, v in bad_op.items()}
    ops = [
        {"op": "create_memory", "id": first, "content": "first"},
        {"op": "create_memory", "id": uid(), "content": "second"},
        bad_op,
    ]
    before = c.get("/v1/stats").json()
    body = assert_error(c.post("/v1/batch", json={"ops": ops}), status, field)
    assert body["index"] == 2
    after = c.get("/v1/stats").json()
    assert (after["lsn"], after["digest"]) == (before["lsn"], before["digest"])
    assert_error(c.get(f"/v1/memories/{first}"), 404, "id")


def test_mark(c: httpx.Client) -> None:
    r = c.post("/v1/mark", json={"name": "before-migration"})
    assert r.status_code == 201
    assert r.json()["name"] == "before-migration" and r.json()["lsn"] >= 1


def test_export(start_server: Any) -> None:
    srv = start_server()
    with srv.client() as c:
        a = create(c, "alpha", id="a", strength=0.25, metadata={"x": 1})
        b = create(c, "beta", id="b")
        c.post("/v1/edges", json={"src": a, "dst": b, "weight": 2.0})
        r = c.get("/v1/export")
        stats = c.get("/v1/stats").json()
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.headers["x-engram-lsn"] == str(stats["lsn"])
    assert r.headers["x-engram-digest"] == stats["digest"]
    lines = [json.loads(x) for x in r.text.splitlines()]
    # Times (UTC ns) and activation counts come along, so an import recreates every field.
    times = ("created_at", "updated_at", "last_activated_at", "activation_count")
    assert all(isinstance(o.pop(k), int) for o in lines[:2] for k in times)
    assert isinstance(lines[2].pop("created_at"), int)
    assert lines == [
        {
            "op": "create_memory",
            "id": "a",
            "content": "alpha",
            "strength": 0.25,
            "metadata": {"x": 1},
        },
        {"op": "create_memory", "id": "b", "content": "beta", "strength": 0.5, "metadata": {}},
        {"op": "create_edge", "src": "a", "dst": "b", "kind": "related", "weight": 2.0},
    ]


# -- bad input: always a 4xx naming the field, never a 500 ---------------------------------

LONG_ID = "a" * 257


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"content": "x"', "body"),  # malformed JSON
        (b"not json at all", "body"),
        (b"[1, 2]", "body"),  # not an object
        (b'"a string"', "body"),
        (b"null", "body"),
        (b"", "body"),  # empty body
        (b'{"content": "\xff\xfe"}', "body"),  # invalid UTF-8
        (b'{"content": "x", "strength": 1e999}', "body"),  # number out of range
        (b"[" * 5000 + b"]" * 5000, "body"),  # nested too deeply
        (b'{"content": 5}', "content"),  # wrong types
        (b'{"content": "x", "strength": "high"}', "strength"),
        (b'{"content": "x", "strength": true}', "strength"),
        (b'{"content": "x", "metadata": [1]}', "metadata"),
        (b'{"content": "x", "id": 17}', "id"),
        (b'{"content": "x", "strength": 1.01}', "strength"),  # strength outside [0, 1]
        (b'{"content": "x", "strength": -0.5}', "strength"),
        (b'{"content": "x", "id": "has space"}', "id"),  # id of the wrong shape
        (b'{"content": "x", "id": ""}', "id"),
        (b'{"content": "x", "id": "%s"}' % LONG_ID.encode(), "id"),  # id over 256 chars
        (b'{"content": "x", "colour": "red"}', "colour"),  # unknown field
        (b'{"content": "x", "op": "delete_memory"}', "op"),
        (b'{"strength": 0.5}', "content"),  # missing required field
    ],
)
def test_bad_create_body(c: httpx.Client, raw: bytes, field: str) -> None:
    before = lsn(c)
    r = c.post("/v1/memories", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, field)
    assert lsn(c) == before


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    [
        ("GET", f"/v1/memories/{LONG_ID}", {}, 400, "id"),
        ("GET", "/v1/memories/has%20space", {}, 400, "id"),
        ("GET", "/v1/memories/%C3%A9t%C3%A9", {}, 400, "id"),
        ("DELETE", f"/v1/memories/{LONG_ID}", {}, 400, "id"),
        ("PATCH", "/v1/memories/bad%21id", {"json": {"content": "x"}}, 400, "id"),
        ("PATCH", "/v1/memories/EXISTING", {"json": {}}, 400, "body"),
        ("PATCH", "/v1/memories/EXISTING", {"json": {"strength": 7}}, 400, "strength"),
        ("PATCH", "/v1/memories/EXISTING", {"json": {"metadata": "m"}}, 400, "metadata"),
        ("PATCH", "/v1/memories/EXISTING", {"json": {"id": "other"}}, 400, "id"),
        ("PATCH", "/v1/memories/EXISTING", {"json": {"nope": 1}}, 400, "nope"),
        ("POST", "/v1/memories/EXISTING/activate", {"json": {"boost": 2}}, 400, "boost"),
        ("POST", "/v1/memories/EXISTING/activate", {"json": {"boost": "x"}}, 400, "boost"),
        ("POST", "/v1/memories/EXISTING/activate", {"content": b"{oops"}, 400, "body"),
        ("POST", "/v1/edges", {"json": {"src": "EXISTING", "dst": "missing-x"}}, 404, "dst"),
        ("POST", "/v1/edges", {"json": {"src": "missing-x", "dst": "EXISTING"}}, 404, "src"),
        ("POST", "/v1/edges", {"json": {"src": "EXISTING"}}, 400, "dst"),
        (
            "POST",
            "/v1/edges",
            {"json": {"src": "EXISTING", "dst": "EXISTING", "weight": "w"}},
            400,
            "weight",
        ),
        (
            "POST",
            "/v1/edges",
            {"json": {"src": "EXISTING", "dst": "EXISTING", "kind": "a b"}},
            400,
            "kind",
        ),
        ("POST", "/v1/edges", {"json": {"src": LONG_ID, "dst": "EXISTING"}}, 400, "src"),
        ("DELETE", "/v1/edges", {"params": {"dst": "EXISTING"}}, 400, "src"),
        ("DELETE", "/v1/edges", {"params": {"src": "EXISTING", "dst": "x y"}}, 400, "dst"),
        ("DELETE", "/v1/edges", {"params": {"src": "a", "dst": "b", "extra": "1"}}, 400, "extra"),
        ("GET", "/v1/memories/EXISTING/neighbors", {"params": {"depth": "4"}}, 400, "depth"),
        ("GET", "/v1/memories/EXISTING/neighbors", {"params": {"depth": "two"}}, 400, "depth"),
        (
            "GET",
            "/v1/memories/EXISTING/neighbors",
            {"params": {"direction": "up"}},
            400,
            "direction",
        ),
        ("GET", "/v1/recall", {}, 400, "query"),
        ("GET", "/v1/recall", {"params": {"query": "  "}}, 400, "query"),
        ("GET", "/v1/recall", {"params": {"query": "x", "limit": "0"}}, 400, "limit"),
        ("GET", "/v1/recall", {"params": {"query": "x", "limit": "9" * 5000}}, 400, "limit"),
        ("POST", "/v1/batch", {"json": {"ops": []}}, 400, "ops"),
        ("POST", "/v1/batch", {"json": {"ops": {"op": "mark"}}}, 400, "ops"),
        ("POST", "/v1/batch", {"json": {}}, 400, "ops"),
        ("POST", "/v1/batch", {"json": {"ops": [], "atomic": True}}, 400, "atomic"),
        ("POST", "/v1/batch", {"json": [{"op": "mark", "name": "x"}]}, 400, "body"),
        ("POST", "/v1/mark", {"json": {"name": "bad name"}}, 400, "name"),
        ("POST", "/v1/mark", {"json": {}}, 400, "name"),
    ],
)
def test_bad_requests(
    c: httpx.Client, method: str, path: str, kwargs: dict[str, Any], status: int, field: str
) -> None:
    existing = create(c)
    path = path.replace("EXISTING", existing)
    if "json" in kwargs:
        kwargs = {"json": _swap(kwargs["json"], existing)}
    if "params" in kwargs:
        kwargs = {"params": _swap(kwargs["params"], existing)}
    before = lsn(c)
    assert_error(c.request(method, path, **kwargs), status, field)
    assert lsn(c) == before


def _swap(value: Any, existing: str) -> Any:
    if isinstance(value, dict):
        return {k: existing if v == "EXISTING" else v for k, v in value.items()}
    return value


def test_body_over_the_limit_is_413(c: httpx.Client) -> None:
    big = {"content": "x" * (SMALL_BODY + 10)}
    assert_error(c.post("/v1/memories", json=big), 413, None)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server must count the bytes
        yield b'{"content": "'
        for _ in range(SMALL_BODY // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    assert_error(c.post("/v1/memories", content=chunked()), 413, None)
    assert_error(c.post("/v1/batch", json={"ops": [big]}), 413, None)


def test_unknown_routes_and_methods(c: httpx.Client) -> None:
    assert_error(c.get("/v1/nothing-here"), 404, None)
    assert_error(c.get("/"), 404, None)
    r = c.put("/v1/stats")
    assert_error(r, 405, None)
    assert r.headers["allow"] == "GET"
    assert_error(c.get("/v1/memories"), 405, None)


# -- auth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [None, "Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, f"bearer  {TOKEN}"],
)
def test_v1_needs_the_token(server: ServerProcess, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    for method, path in [("GET", "/v1/stats"), ("POST", "/v1/memories"), ("GET", "/v1/export")]:
        r = httpx.request(method, f"{server.url}{path}", headers=headers, json={"content": "x"})
        body = assert_error(r, 401, None)
        assert body["error"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_token_from_env_and_never_logged(start_server: Any, tmp_path: Path) -> None:
    secret = "env-secret-" + uuid.uuid4().hex
    srv = start_server(
        token=secret, token_via="env", extra_args=("--debug", "--access-log")
    )
    with srv.client() as c:
        assert c.get("/v1/stats").status_code == 200
        create(c)
        c.get("/v1/memories/has%20space")
    assert httpx.get(f"{srv.url}/v1/stats", headers=srv.headers("wrong")).status_code == 401
    assert httpx.get(f"{srv.url}/v1/stats").status_code == 401
    assert srv.stop() == 0
    log = srv.log()
    assert "GET /v1/stats" in log  # the access log is on...
    assert secret not in log  # ...and never shows the token


# -- process: binding, ownership, shutdown ------------------------------------------------


def test_non_loopback_bind_without_token_is_refused(start_server: Any) -> None:
    srv = start_server(host="0.0.0.0", wait=None)
    assert srv.wait_exit() == 2
    assert "refusing to serve on 0.0.0.0 without a token" in srv.log()


def test_second_server_on_the_same_dir_is_refused(start_server: Any, tmp_path: Path) -> None:
    first = start_server(tmp_path / "shared")
    second = start_server(tmp_path / "shared", wait=None)
    assert second.wait_exit() == 1
    line = [x for x in second.log().splitlines() if "error" in x]
    assert line, second.log()
    assert f"pid {first.pid}" in line[0] and first.url in line[0]
    with first.client() as c:  # the owner is untouched
        assert c.get("/health/ready").status_code == 200


def test_port_in_use_is_a_one_line_error(start_server: Any, tmp_path: Path) -> None:
    first = start_server(tmp_path / "one")
    port = int(str(first.url).rsplit(":", 1)[1])
    second = start_server(tmp_path / "two", port=port, wait=None)
    assert second.wait_exit() == 1
    assert f"cannot listen on 127.0.0.1:{port}" in second.log()


def test_in_process_app_with_a_real_engine(tmp_path: Path) -> None:
    eng = Engine.open(tmp_path / "inproc")
    try:
        app = create_app(eng, "tok", 1024)
        auth = {"Authorization": "Bearer tok"}
        for i in range(3):  # each call runs on a new event loop
            r = _call(
                app, "POST", "/v1/memories", json={"id": f"m{i}", "content": "x"}, headers=auth
            )
            assert r.status_code == 201, r.text
        assert _call(app, "GET", "/v1/memories/m2", headers=auth).json()["id"] == "m2"
        assert _call(app, "GET", "/v1/stats").status_code == 401
    finally:
        eng.close()


def test_engine_that_cannot_open_stops_the_server(start_server: Any, tmp_path: Path) -> None:
    data = tmp_path / "not-engram"
    data.mkdir()
    (data / "notes.txt").write_text("someone else's files")
    srv = start_server(data, wait=None)
    assert srv.wait_exit() == 1
    errors = [x for x in srv.log().splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "is not empty and holds no engram database" in errors[0]
    assert "Traceback" not in srv.log()


def test_graceful_shutdown_checkpoints_and_releases(start_server: Any, tmp_path: Path) -> None:
    data = tmp_path / "graceful"
    srv = start_server(data)
    with srv.client() as c:
        mids = [create(c, f"text {i}") for i in range(20)]
        c.post(f"/v1/memories/{mids[0]}/activate")
        stats = c.get("/v1/stats").json()
    assert read_owner(data) == {"pid": srv.pid, "url": srv.url, **_started(data)}
    assert srv.stop() == 0
    assert read_owner(data) is None
    eng = Engine.open(data)
    try:
        assert eng.stats()["tiers"]["warm"]["applied_lsn"] == stats["lsn"]  # final checkpoint
        assert eng.digest.hex == stats["digest"] == eng.recompute_digest().hex
        assert eng.memory(mids[0]).activation_count == 1
    finally:
        eng.close()
    assert (data / "oplog").stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o077 == 0 for p in data.rglob("*"))


def _started(data: Path) -> dict[str, Any]:
    owner = read_owner(data) or {}
    return {"started_at": owner.get("started_at")}


def test_restart_keeps_data(start_server: Any, tmp_path: Path) -> None:
    data = tmp_path / "restart"
    srv = start_server(data)
    with srv.client() as c:
        mid = create(c, "persist me")
    srv.kill()
    srv.start()
    with srv.client() as c:
        assert c.get(f"/v1/memories/{mid}").json()["content"] == "persist me"


# -- in-process: the app's states that a real process only passes through ---------------


def _call(app: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def test_503_while_recovering() -> None:
    app = create_app(None, None, 1024)
    assert _call(app, "GET", "/health/live").status_code == 200
    r = _call(app, "GET", "/health/ready")
    assert r.status_code == 503
    assert r.json() == {"status": "starting", "reason": "recovery in progress"}
    app.progress = (20000, 20000)
    assert _call(app, "GET", "/health/ready").json()["replayed"] == 20000
    r = _call(app, "POST", "/v1/memories", json={"content": "x"})
    assert_error(r, 503, None)
    assert r.headers["retry-after"] == "1"


def test_unexpected_error_is_a_json_500(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def memory(self, mid: str) -> None:
            raise RuntimeError("boom")

        def memory_json(self, m: object) -> None:
            raise AssertionError("not reached")

    app = create_app(Broken(), None, 1024)  # type: ignore[arg-type]
    r = _call(app, "GET", "/v1/memories/x")
    body = assert_error(r, 500, None)
    assert body["error"] == "internal" and "boom" not in body["message"]
    assert any("boom" in (rec.exc_text or "") for rec in caplog.records)
