"""GET /openapi.json: an OpenAPI 3.1 description of exactly the routes the app dispatches
(walked from routes.py's tables), valid by openapi-spec-validator, served without auth."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from serverproc import ServerProcess

from engram.format.stream import CONTENT_TYPE
from engram.graph import Engine
from engram.server import openapi
from engram.server.routes import create_app

METHODS = ("GET", "POST", "PATCH", "DELETE", "PUT")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.open(tmp_path / "data")
    try:
        yield e
    finally:
        e.close()


def _requests(eng: Engine, calls: list[tuple[str, str]], token: str | None) -> list[Any]:
    async def go() -> list[Any]:
        transport = httpx.ASGITransport(app=create_app(eng, token, 1 << 20))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.request(m, p, headers=headers) for m, p in calls]

    return asyncio.run(go())


def test_the_description_is_valid_openapi_3_1() -> None:
    doc = openapi.spec()
    validate(doc)  # raises on an invalid document
    assert doc["openapi"].startswith("3.1")
    error = doc["components"]["schemas"]["Error"]
    assert {"error", "message", "field"} <= set(error["properties"])
    assert doc["components"]["securitySchemes"]["dataToken"]["scheme"] == "bearer"
    backup = doc["paths"]["/v1/admin/backup"]["post"]
    assert backup["security"] == [{"adminToken": []}]
    assert CONTENT_TYPE.decode() in backup["responses"]["200"]["content"]
    assert doc["paths"]["/health/live"]["get"]["security"] == []
    assert (
        "application/x-ndjson" in doc["paths"]["/v1/export"]["get"]["responses"]["200"]["content"]
    )


def test_every_dispatched_route_is_described_and_nothing_else(engine: Engine) -> None:
    app = create_app(engine, None)
    assert openapi.described() == app.routes()


def test_every_described_route_dispatches(engine: Engine) -> None:
    """Each described (path, method) reaches a handler (no 404 for the route, no 405), and the
    methods it does not describe on a path get 405 or 404: the tables and the description agree
    with what the app actually routes, not only with each other."""
    described = openapi.described()
    paths = {p for p, _ in described}
    calls = [(m, p.replace("{id}", "no-such-id")) for p in sorted(paths) for m in METHODS]
    # Bodies are empty: a handler answers 400/404/409/503..., never "no route" or 405.
    for (m, p), r in zip(calls, _requests(engine, calls, "tok"), strict=True):
        template = p.replace("no-such-id", "{id}")
        routed = r.status_code != 405 and not (
            r.status_code == 404 and "no route" in r.json().get("message", "")
        )
        if (template, m) in described:
            assert routed, (m, p, r.status_code, r.text)
        elif not template.startswith("/v1/memories/{id}/"):
            # (Under a memory, an undescribed method falls through to the memory whose id is
            # the rest of the path, "x/activate": README "HTTP API", ids holding '/'.)
            assert not routed, (m, p, r.status_code, r.text)
    r = _requests(engine, [("GET", "/v1/nothing"), ("GET", "/openapi.yaml")], "tok")
    assert [x.status_code for x in r] == [404, 404]


def test_served_without_auth_by_a_real_server(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "data", token="secret-token")
    assert srv.url is not None
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.get("/openapi.json")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        assert r.json() == openapi.spec()
        assert c.get("/v1/stats").status_code == 401  # the routes it describes still need it
        assert c.post("/openapi.json").status_code == 405
