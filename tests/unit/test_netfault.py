"""The network fault proxy (tests/netfault.py) does what the S3 fault tests will rely on: bytes
pass unchanged, a cut lands at exactly byte N, latency and bandwidth slow traffic at least as much
as asked, injected S3 errors are clean responses on a connection that stays usable, a stall
makes a client time out, only loopback targets are accepted, and nothing outlives the proxy.

Two local servers stand in for S3: a raw TCP echo that records what each connection brought and
how it ended, and an HTTP/1.1 server (http.server, keep-alive) that records every request."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from netfault import S3_ERRORS, FaultProxy, NotLoopback
from netutil import free_port

# -- the servers ------------------------------------------------------------------------------


@dataclass
class EchoRecord:
    received: bytearray = field(default_factory=bytearray)
    end: str = ""  # "eof" or "reset", once the connection ended


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        rec = EchoRecord()
        self.server.records.append(rec)  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                rec.received += data
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            rec.end = "eof"
        except ConnectionResetError:
            rec.end = "reset"
        except OSError:
            rec.end = "error"


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.records: list[EchoRecord] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def ended(self, timeout: float = 10.0) -> list[EchoRecord]:
        deadline = time.monotonic() + timeout
        while any(not r.end for r in self.records) or not self.records:
            if time.monotonic() > deadline:
                raise TimeoutError("an echo connection did not end")
            time.sleep(0.005)
        return self.records


def payload(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10

    def log_message(self, *args: Any) -> None:
        pass

    def _record(self, body: bytes, complete: bool) -> None:
        self.server.log.append(  # type: ignore[attr-defined]
            (self.command, self.path, body, self.client_address[1], complete)
        )

    def _body(self) -> tuple[bytes, bool]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while line := self.rfile.readline():
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return bytes(out), True
                out += self.rfile.read(size)
                self.rfile.read(2)
            return bytes(out), False
        n = int(self.headers.get("Content-Length", 0))
        data = self.rfile.read(n)
        return data, len(data) == n

    def _reply(self, status: int, body: bytes, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_PUT(self) -> None:
        body, complete = self._body()
        self._record(body, complete)
        if not complete:
            self.close_connection = True
            return
        answer = {"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        self._reply(200, json.dumps(answer).encode())

    do_POST = do_PUT

    def do_GET(self) -> None:
        self._record(b"", True)
        n = int(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/bytes/") else 2
        self._reply(200, payload(n) if self.path.startswith("/bytes/") else b"ok")

    def do_HEAD(self) -> None:
        self._record(b"", True)
        self._reply(200, payload(int(self.path.rsplit("/", 1)[-1])), head_only=True)


class HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HttpHandler)
        self.log: list[tuple[str, str, bytes, int, bool]] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    srv = EchoServer()
    t = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join()


@pytest.fixture
def web() -> Iterator[HttpServer]:
    srv = HttpServer()
    t = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join()


# -- clients ----------------------------------------------------------------------------------


@dataclass
class Exchange:
    received: bytes
    error: OSError | None  # what ended the reading, None for a clean EOF
    send_error: OSError | None = None

    @property
    def was_reset(self) -> bool:
        """An RST came: the thread whose call came first got the error, the other EOF or EPIPE."""
        return any(isinstance(e, ConnectionResetError) for e in (self.error, self.send_error))


def exchange(port: int, data: bytes, timeout: float = 10.0) -> Exchange:
    """Send ``data`` (then a FIN) from one thread while reading to the end in this one."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionResetError as e:  # reset before connect() even returned
        return Exchange(b"", e)

    send_error: list[OSError] = []

    def send() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            send_error.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    got = bytearray()
    error: OSError | None = None
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except OSError as e:
        error = e
    sender.join()
    sock.close()
    return Exchange(bytes(got), error, send_error[0] if send_error else None)


def http_conn(proxy: FaultProxy, timeout: float = 10.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)


def read_response(reader: Any) -> tuple[int, bytes]:
    """One response with a Content-Length body from a raw socket's reader."""
    status = int(reader.readline().split(b" ")[1])
    length = 0
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, reader.read(length)


def put(conn: http.client.HTTPConnection, body: Any, path: str = "/bucket/key") -> Any:
    conn.request("PUT", path, body=body)
    r = conn.getresponse()
    return r.status, r.read(), r


# -- bytes pass unchanged ---------------------------------------------------------------------


def test_raw_bytes_pass_unchanged_both_ways(echo: EchoServer) -> None:
    data = payload(1_500_000)
    with FaultProxy(("127.0.0.1", echo.port), http=False) as proxy:
        ex = exchange(proxy.port, data)
        assert ex.error is None
        assert ex.received == data
        (rec,) = echo.ended()
        assert bytes(rec.received) == data and rec.end == "eof"
        s = proxy.wait_until(lambda s: s.open_connections == 0)
        assert (s.connections, s.up_bytes, s.down_bytes, s.cuts) == (1, len(data), len(data), 0)


def test_http_mode_passes_non_http_bytes_unchanged(echo: EchoServer) -> None:
    data = b"\x00\x01 not a request line\r\n\r\n" + payload(200_000)
    with FaultProxy(("127.0.0.1", echo.port)) as proxy:
        ex = exchange(proxy.port, data)
        assert ex.error is None and ex.received == data
        assert proxy.stats().requests == 0


def test_http_keep_alive_passes_every_framing(web: HttpServer) -> None:
    body = payload(300_000)
    with FaultProxy(("127.0.0.1", web.port)) as proxy:
        conn = http_conn(proxy)
        status, answer, _ = put(conn, body)
        assert status == 200 and json.loads(answer)["sha256"] == hashlib.sha256(body).hexdigest()
        status, answer, _ = put(conn, iter([body[:1000], body[1000:]]))  # chunked
        assert status == 200 and json.loads(answer)["len"] == len(body)
        conn.request("GET", "/bytes/250000")
        r = conn.getresponse()
        assert r.read() == payload(250_000)
        conn.request("HEAD", "/bytes/99")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Length") == "99" and r.read() == b""
        conn.close()
        s = proxy.stats()
        assert s.connections == 1 and s.requests == 4 and s.injected == 0
        assert s.up_body_bytes >= 2 * len(body)
        assert len({entry[3] for entry in web.log}) == 1  # one connection to the server


def test_expect_100_continue_passes(web: HttpServer) -> None:
    with FaultProxy(("127.0.0.1", web.port)) as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        sock.sendall(
            b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100")
        sock.sendall(b"hello")
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        reader.close()
        sock.close()
        assert web.log[0][:3] == ("PUT", "/b/k", b"hello")


# -- cuts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 65_535, 65_536, 65_537, 123_457])
def test_cut_up_after_exactly_n_bytes(echo: EchoServer, n: int) -> None:
    data = payload(300_000, seed=n)
    with FaultProxy(("127.0.0.1", echo.port), http=False) as proxy:
        proxy.cut_after(n, "up")
        ex = exchange(proxy.port, data)
        (rec,) = echo.ended()
        assert bytes(rec.received) == data[:n]
        assert rec.end == "eof"  # a FIN: the server sees the stream end at byte n
        assert ex.error is None and data[:n].startswith(ex.received)
        s = proxy.stats()
        assert s.up_bytes == n and s.cuts == 1 and s.resets == 0


@pytest.mark.parametrize("n", [0, 4096, 100_001])
def test_cut_down_after_exactly_n_bytes(echo: EchoServer, n: int) -> None:
    data = payload(200_000, seed=n)
    with FaultProxy(("127.0.0.1", echo.port), http=False) as proxy:
        proxy.cut_after(n, "down")
        ex = exchange(proxy.port, data)
        assert ex.error is None  # a clean EOF, at byte n
        assert ex.received == data[:n]
        assert proxy.stats().down_bytes == n


def test_reset_up_and_down(echo: EchoServer) -> None:
    data = payload(200_000)
    with FaultProxy(("127.0.0.1", echo.port), http=False) as proxy:
        proxy.reset_after(70_000, "up")
        ex = exchange(proxy.port, data)
        (rec,) = echo.ended()
        assert bytes(rec.received) == data[:70_000] and rec.end == "reset"
        assert ex.was_reset

        proxy.reset_after(10_000, "down")
        ex = exchange(proxy.port, data)
        assert ex.received == data[:10_000]
        assert ex.was_reset
        s = proxy.stats()
        assert (s.cuts, s.resets) == (2, 2)


def test_cut_repeats_times_then_passes(echo: EchoServer) -> None:
    data = payload(50_000)
    with FaultProxy(("127.0.0.1", echo.port), http=False) as proxy:
        proxy.cut_after(1000, "down", times=2)
        assert [len(exchange(proxy.port, data).received) for _ in range(3)] == [1000, 1000, 50_000]
        proxy.cut_after(10, "down", times=None)
        assert [len(exchange(proxy.port, data).received) for _ in range(3)] == [10, 10, 10]
        proxy.clear()
        assert exchange(proxy.port, data).received == data


def test_cut_armed_while_running_counts_from_then(echo: EchoServer) -> None:
    first, second = payload(100_000, seed=1), payload(100_000, seed=2)
    with FaultProxy(("127.0.0.1", echo.port), http=False) as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        sock.sendall(first)
        got = bytearray()
        while len(got) < len(first):
            got += sock.recv(65536)
        assert bytes(got) == first
        proxy.cut_after(5000, "down")  # from another thread than the proxy's, mid-connection
        sock.sendall(second)
        sock.shutdown(socket.SHUT_WR)
        rest = bytearray()
        while chunk := sock.recv(65536):
            rest += chunk
        sock.close()
        assert bytes(rest) == second[:5000]
        assert proxy.stats().down_bytes == len(first) + 5000


def test_cut_in_an_uploads_body(web: HttpServer) -> None:
    body = payload(80_000)
    with FaultProxy(("127.0.0.1", web.port)) as proxy:
        conn = http_conn(proxy)
        assert put(conn, b"small")[0] == 200  # its body counts: the cut is armed after it
        proxy.cut_after(12_345, "up", body_only=True)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            put(conn, body)
        conn.close()
        deadline = time.monotonic() + 10
        while len(web.log) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert web.log[1][2] == body[:12_345] and web.log[1][4] is False
        conn = http_conn(proxy)
        status, answer, _ = put(conn, body)  # the cut fired once: the retry passes
        assert status == 200 and json.loads(answer)["len"] == len(body)
        conn.close()


# -- latency, bandwidth -----------------------------------------------------------------------


def test_latency_delays_each_direction_at_least_as_asked(echo: EchoServer) -> None:
    with FaultProxy(("127.0.0.1", echo.port), http=False) as proxy:
        proxy.latency(0.15, "down")
        t0 = time.monotonic()
        assert exchange(proxy.port, b"ping").received == b"ping"
        assert time.monotonic() - t0 >= 0.15
        proxy.latency(0.15)  # both ways
        t0 = time.monotonic()
        assert exchange(proxy.port, b"ping").received == b"ping"
        assert time.monotonic() - t0 >= 0.30


def test_bandwidth_limits_at_least_as_asked(echo: EchoServer) -> None:
    data = payload(150_000)
    with FaultProxy(("127.0.0.1", echo.port), http=False) as proxy:
        proxy.bandwidth(300_000, "down")
        t0 = time.monotonic()
        ex = exchange(proxy.port, data)
        elapsed = time.monotonic() - t0
        assert ex.received == data
        assert elapsed >= 0.5 * 0.95  # 150 kB at 300 kB/s; only a lower bound is asserted


# -- injected S3 errors -----------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(S3_ERRORS))
@pytest.mark.parametrize("framing", ["length", "chunked", "none", "head"])
def test_injected_error_is_clean_and_the_next_request_passes(
    web: HttpServer, status: int, framing: str
) -> None:
    body = payload(100_000)
    with FaultProxy(("127.0.0.1", web.port)) as proxy:
        conn = http_conn(proxy)
        proxy.inject(status)
        if framing in ("length", "chunked"):
            conn.request("PUT", "/bkt/obj", body=body if framing == "length" else iter([body]))
        else:
            conn.request("HEAD" if framing == "head" else "GET", "/bytes/10")
        r = conn.getresponse()
        answer = r.read()
        assert r.status == status and r.getheader("Connection") == "keep-alive"
        if framing == "head":
            assert answer == b""
        else:
            code = S3_ERRORS[status][0]
            assert f"<Code>{code}</Code>".encode() in answer and answer.startswith(b"<?xml")
        assert web.log == []  # not forwarded
        status2, answer2, _ = put(conn, body)  # the same connection, in step
        assert status2 == 200 and json.loads(answer2)["len"] == len(body)
        conn.close()
        s = proxy.stats()
        assert (s.connections, s.requests, s.injected) == (1, 2, 1)
        assert len(web.log) == 1


def test_inject_count_and_filter(web: HttpServer) -> None:
    with FaultProxy(("127.0.0.1", web.port)) as proxy:
        conn = http_conn(proxy)
        proxy.inject(503, count=2, when=lambda method, target: method == "PUT")
        conn.request("GET", "/bytes/3")
        assert conn.getresponse().read() == payload(3)  # not a PUT: forwarded
        status, answer, _ = put(conn, b"x", path="/b/a&b<c>")
        assert status == 503 and b"<Resource>/b/a&amp;b&lt;c&gt;</Resource>" in answer
        assert [put(conn, b"x")[0] for _ in range(2)] == [503, 200]
        conn.close()
        assert proxy.stats().injected == 2


def test_inject_with_expect_100_continue_answers_at_once_and_closes(web: HttpServer) -> None:
    with FaultProxy(("127.0.0.1", web.port)) as proxy:
        proxy.inject(503)
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        sock.sendall(
            b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\nExpect: 100-continue\r\n\r\n"
        )
        response = bytearray()
        while chunk := sock.recv(65536):  # the proxy closes after the answer: EOF, not a hang
            response += chunk
        sock.close()
        head, _, body = bytes(response).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 Slow Down\r\n")
        assert b"Connection: close" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert b"<Code>SlowDown</Code>" in body
        assert web.log == []


def test_injection_reads_a_chunked_body_with_extensions_and_trailers_exactly(
    web: HttpServer,
) -> None:
    """The injected request's body is consumed to its last byte: the request sent right behind
    it in the same write reaches the server intact, and its answer follows the injected one."""
    with FaultProxy(("127.0.0.1", web.port)) as proxy:
        proxy.inject(500)
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        sock.sendall(
            b"PUT /b/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n3\r\n\r\n\r\n\r\n0\r\nx-amz-checksum-sha256: AAAA\r\n\r\n"
            b"GET /bytes/7 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        with sock, sock.makefile("rb") as reader:
            status, body = read_response(reader)
            assert status == 500 and b"<Code>InternalError</Code>" in body
            assert read_response(reader) == (200, payload(7))
        assert [entry[:2] for entry in web.log] == [("GET", "/bytes/7")]


# -- stall ------------------------------------------------------------------------------------


def test_stall_down_times_out_a_client_then_releases(web: HttpServer) -> None:
    with FaultProxy(("127.0.0.1", web.port)) as proxy:
        proxy.stall("down")
        conn = http_conn(proxy, timeout=0.3)
        conn.request("GET", "/bytes/10")
        with pytest.raises(TimeoutError):
            conn.getresponse()
        conn.close()
        assert web.log[0][:2] == ("GET", "/bytes/10")  # the request went up; no answer came
        proxy.unstall()
        conn = http_conn(proxy)
        conn.request("GET", "/bytes/10")
        assert conn.getresponse().read() == payload(10)
        conn.close()


def test_stall_up_holds_the_request_until_released(web: HttpServer) -> None:
    with FaultProxy(("127.0.0.1", web.port)) as proxy:
        proxy.stall("up")
        conn = http_conn(proxy, timeout=0.3)
        conn.request("GET", "/bytes/10")
        with pytest.raises(TimeoutError):
            conn.getresponse()
        assert web.log == []  # held, not forwarded
        proxy.unstall("up")
        conn.sock.settimeout(10)  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while not web.log and time.monotonic() < deadline:
            time.sleep(0.005)
        assert web.log[0][:2] == ("GET", "/bytes/10")  # released, not dropped
        conn.close()


# -- bad input, loopback only, stopping -------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["10.0.0.1", "8.8.8.8", "::ffff:8.8.8.8", "2001:db8::1", "0.0.0.0", "example.com", ""]
)
def test_non_loopback_targets_are_refused(host: str) -> None:
    with pytest.raises(NotLoopback):
        FaultProxy((host, 9000))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"])
def test_loopback_targets_are_accepted(host: str) -> None:
    FaultProxy((host, 9000))


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.latency(-1),
        lambda p: p.latency(float("nan")),
        lambda p: p.bandwidth(0),
        lambda p: p.cut_after(-1),
        lambda p: p.cut_after(10, times=0),
        lambda p: p.cut_after(10, "down", body_only=True),
        lambda p: p.stall("sideways"),
        lambda p: p.inject(200),
        lambda p: p.inject(404),
        lambda p: p.inject(503, count=0),
    ],
)
def test_bad_fault_settings_are_refused(call: Any) -> None:
    with pytest.raises(ValueError):
        call(FaultProxy(("127.0.0.1", 9000)))


def test_bad_target_port_and_raw_mode_injection_are_refused() -> None:
    with pytest.raises(ValueError):
        FaultProxy(("127.0.0.1", 0))
    with pytest.raises(ValueError):
        FaultProxy(("127.0.0.1", 9000), http=False).inject(503)


def test_start_close_and_wait_until() -> None:
    proxy = FaultProxy(("127.0.0.1", 9000))
    with pytest.raises(RuntimeError):
        _ = proxy.port  # not started
    with proxy:
        with pytest.raises(RuntimeError):
            proxy.start()
        with pytest.raises(TimeoutError, match="connections=0"):
            proxy.wait_until(lambda s: s.connections > 0, timeout=0.05)
    proxy.close()  # a second close does nothing


def test_a_target_that_is_down_ends_the_client_connection() -> None:
    with FaultProxy(("127.0.0.1", free_port())) as proxy:
        ex = exchange(proxy.port, b"hello")
        assert ex.received == b"" and ex.was_reset
        assert proxy.wait_until(lambda s: s.open_connections == 0).connections == 1


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_leaving_the_block_leaves_no_thread_socket_or_listener(echo: EchoServer) -> None:
    fds_before = _open_fds()
    with FaultProxy(("127.0.0.1", echo.port), http=False) as proxy:
        port, name = proxy.port, proxy.thread_name
        assert exchange(proxy.port, b"x" * 1000).received == b"x" * 1000
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        proxy.stall()
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(b"held")
        proxy.wait_until(lambda s: s.open_connections == 2)
    assert name.startswith("netfault-") and name not in {t.name for t in threading.enumerate()}
    for sock in (idle, stalled):  # both see their connection end, not a hang
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
        sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    assert proxy.stats().open_connections == 0
    echo.ended()  # the echo server's side of each connection closed too
    assert not [t for t in threading.enumerate() if t.name.startswith("netfault-")]
    deadline = time.monotonic() + 10
    while _open_fds() > fds_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _open_fds() <= fds_before
