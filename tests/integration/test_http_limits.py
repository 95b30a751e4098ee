"""Limits a hostile or broken client meets: every numeric field range-checked with a 400 naming
it (never a 500), and connections that send too slowly closed after the read timeout."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverproc import ServerProcess

TOKEN = "limits-token-3d7e"
READ_TIMEOUT = 1.0

# -- numbers --------------------------------------------------------------------------------

HUGE_INT = "1" + "0" * 400  # a JSON integer too large for a float
# Raw JSON values (body fields) and raw strings (query parameters) that no numeric field takes.
BODY_BAD = {
    "huge": "1e300",
    "huge_negative": "-1e300",
    "huge_int": HUGE_INT,
    "negative": "-1",
    "nan_string": '"NaN"',
    "inf_string": '"Infinity"',
    "number_string": '"0.5"',
    "boolean": "true",
}
QUERY_BAD = {
    "huge": "1e300",
    "huge_int": "9" * 5000,
    "negative": "-1",
    "zero": "0",
    "float": "1.5",
    "nan": "NaN",
    "inf": "inf",
    "empty": "",
}
# Per field: the values above that are in range for it (so not a refusal).
IN_RANGE = {"weight": {"negative"}}
# Values refused for a field beyond the shared ones: just past its bound, on either side.
BODY_EDGES = {
    "strength": {"above_one": "1.0001"},
    "boost": {"above_one": "1.5"},
    "weight": {"above_bound": "1e7", "below_bound": "-1e7"},
    "timeout_s": {"zero": "0", "over_a_day": "86401", "float_over": "1e10"},
}
QUERY_EDGES = {"depth": {"four": "4"}, "limit": {"over_1000": "1001"}}

# (method, path, body template with FIELD where the value goes, or query with FIELD)
BODY_ROUTES: list[tuple[str, str, str, str]] = [
    ("strength", "POST", "/v1/memories", '{"content": "x", "strength": FIELD}'),
    ("strength", "PATCH", "/v1/memories/ID", '{"strength": FIELD}'),
    ("boost", "POST", "/v1/memories/ID/activate", '{"boost": FIELD}'),
    ("weight", "POST", "/v1/edges", '{"src": "ID", "dst": "ID", "weight": FIELD}'),
    (
        "strength",
        "POST",
        "/v1/batch",
        '{"ops": [{"op": "create_memory", "content": "x", "strength": FIELD}]}',
    ),
    ("boost", "POST", "/v1/batch", '{"ops": [{"op": "activate", "id": "ID", "boost": FIELD}]}'),
    (
        "weight",
        "POST",
        "/v1/batch",
        '{"ops": [{"op": "create_edge", "src": "ID", "dst": "ID", "weight": FIELD}]}',
    ),
    ("timeout_s", "POST", "/v1/admin/quiesce", '{"timeout_s": FIELD}'),
]
QUERY_ROUTES: list[tuple[str, str, dict[str, str]]] = [
    ("depth", "/v1/memories/ID/neighbors", {}),
    ("limit", "/v1/recall", {"query": "anything"}),
]


def _body_cases() -> Iterator[Any]:
    for field, method, path, template in BODY_ROUTES:
        values = {**BODY_BAD, **BODY_EDGES.get(field, {})}
        for name, raw in values.items():
            if name in IN_RANGE.get(field, set()):
                continue
            yield pytest.param(
                method,
                path,
                template.replace("FIELD", raw),
                field,
                id=f"{method} {path} {field}={name}",
            )


def _query_cases() -> Iterator[Any]:
    for field, path, extra in QUERY_ROUTES:
        for name, raw in {**QUERY_BAD, **QUERY_EDGES.get(field, {})}.items():
            yield pytest.param(path, {**extra, field: raw}, field, id=f"GET {path} {field}={name}")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path_factory.mktemp("limits") / "data", token=TOKEN, read_timeout=READ_TIMEOUT
    ).start()
    try:
        yield server
    finally:
        server.stop(timeout=15)


@pytest.fixture(scope="module")
def mid(srv: ServerProcess) -> str:
    with srv.client() as c:
        r = c.post("/v1/memories", json={"id": f"m-{uuid.uuid4().hex[:8]}", "content": "x"})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def _state(c: httpx.Client) -> tuple[Any, Any, Any]:
    st = c.get("/v1/admin/status").json()
    return st["lsn"], st["digest"], st["quiesce"]["quiesced"]


@pytest.mark.parametrize(("method", "path", "body", "field"), list(_body_cases()))
def test_numeric_body_fields_are_range_checked(
    srv: ServerProcess, mid: str, method: str, path: str, body: str, field: str
) -> None:
    with srv.client() as c:
        before = _state(c)
        r = c.request(
            method,
            path.replace("ID", mid),
            content=body.replace("ID", mid).encode(),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["field"] == field, r.json()
        assert _state(c) == before  # nothing written, nothing paused


@pytest.mark.parametrize(("path", "params", "field"), list(_query_cases()))
def test_numeric_query_parameters_are_range_checked(
    srv: ServerProcess, mid: str, path: str, params: dict[str, str], field: str
) -> None:
    with srv.client() as c:
        r = c.get(path.replace("ID", mid), params=params)
        assert r.status_code == 400, r.text
        assert r.json()["field"] == field, r.json()


# -- the read timeout -----------------------------------------------------------------------


def _port(srv: ServerProcess) -> int:
    return int(str(srv.url).rsplit(":", 1)[1])


def _closed_within(
    sock: socket.socket, seconds: float, trickle: bytes = b"", every: float = 0.0
) -> float:
    """Seconds until the server closes ``sock`` (sending ``trickle`` a byte per ``every``
    seconds meanwhile); fails if it is still open after ``seconds``."""
    start = time.monotonic()
    pending = bytearray(trickle)
    sock.settimeout(every or seconds)
    while time.monotonic() - start < seconds:
        if pending:
            try:
                sock.send(bytes(pending[:1]))
            except OSError:  # reset by the server: closed
                return time.monotonic() - start
            del pending[:1]
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
        if data == b"":
            return time.monotonic() - start
        raise AssertionError(f"the server answered instead of closing: {data[:200]!r}")
    raise AssertionError(f"the connection was still open after {seconds} s")


def _connect(srv: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(srv)), timeout=5)


def test_an_idle_connection_is_closed(srv: ServerProcess) -> None:
    with _connect(srv) as s:
        took = _closed_within(s, 5 * READ_TIMEOUT)
    assert took >= 0.8 * READ_TIMEOUT


def test_trickled_headers_are_cut_off(srv: ServerProcess) -> None:
    # Each byte comes well within the timeout, but the headers never end in time.
    head = b"GET /v1/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
    with _connect(srv) as s:
        took = _closed_within(s, 5 * READ_TIMEOUT, trickle=head * 4, every=0.2)
    assert took < 3 * READ_TIMEOUT


def test_trickled_body_is_cut_off(srv: ServerProcess) -> None:
    head = (
        b"POST /v1/memories HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 40\r\n\r\n"
    )
    with _connect(srv) as s:
        s.sendall(head + b'{"content": ')
        # Slower than the read timeout between pieces: the server gives up on the body.
        took = _closed_within(s, 6 * READ_TIMEOUT, trickle=b'"xxxxxxxxxxxxxxxxxxxxxxx"}', every=1.6)
    assert took < 4 * READ_TIMEOUT
    with srv.client() as c:
        assert c.get("/v1/stats").status_code == 200  # nothing half-written, still serving


def test_trickled_body_after_a_refusal_is_cut_off(srv: ServerProcess) -> None:
    # The app answers 401 without reading the body; the rest must not hold the connection.
    head = b"POST /v1/memories HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    with _connect(srv) as s:
        s.sendall(head)
        s.settimeout(5)
        answer = b""
        while not answer.endswith(b"}"):  # the whole 401: its JSON body ends with "}"
            answer += s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 401")
        took = _closed_within(s, 6 * READ_TIMEOUT, trickle=b"x" * 20, every=1.6)
    assert took < 4 * READ_TIMEOUT


def test_a_normal_client_is_unaffected(srv: ServerProcess) -> None:
    with srv.client() as c:
        for _ in range(3):  # one kept-alive connection, pauses shorter than the timeout
            assert c.get("/v1/stats").status_code == 200
            time.sleep(0.5 * READ_TIMEOUT)

        def body() -> Iterator[bytes]:  # a body in pieces, each within the timeout
            yield b'{"content": "in '
            time.sleep(0.6 * READ_TIMEOUT)
            yield b'pieces"}'

        r = c.post("/v1/memories", content=body(), headers={"content-type": "application/json"})
        assert r.status_code == 201, r.text
    # After an idle pause longer than the timeout a pooled connection is closed; the client
    # reconnects transparently.
    with srv.client() as c:
        assert c.get("/v1/stats").status_code == 200
        time.sleep(1.5 * READ_TIMEOUT)
        assert c.get("/v1/stats").status_code == 200


def test_read_timeout_option_is_checked(start_server: Any, tmp_path: Path) -> None:
    for bad in ("0", "-1", "1e300", "nan"):
        srv = start_server(tmp_path / f"d{bad}", extra_args=("--read-timeout", bad), wait=None)
        assert srv.wait_exit() == 2, srv.log()
        assert "--read-timeout must be" in srv.log()
