"""A lean, bounded-concurrency HTTP/1.1 load generator (closed loop, keep-alive).

On two cores the client's CPU competes with the server's, so the client is as thin as it can be:
raw asyncio protocols on uvloop (when installed), requests prebuilt as bytes by a cheap function
of their index, responses parsed only as far as status and Content-Length. ``concurrency``
connections each send one request at a time; a run stops after ``total`` requests or
``duration`` seconds, whichever comes first. Loopback only.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
    uvloop = None  # type: ignore[assignment]

from common import Latency

MakeRequest = Callable[[int], bytes]


def request(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
    if body or method in ("POST", "PATCH", "PUT"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1
        self.head_end = 0
        self.status = 0
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(self.buf[:i]).lower()
            self.status = int(head[9:12])
            j = head.find(b"\r\ncontent-length:")
            if j < 0:
                self._fail(ConnectionError("response without Content-Length"))
                return
            k = head.find(b"\r\n", j + 2)
            length = int(head[j + 17 : k if k >= 0 else len(head)])
            self.head_end = i + 4
            self.need = self.head_end + length
        if len(self.buf) >= self.need:
            body = bytes(self.buf[self.head_end : self.need])
            del self.buf[: self.need]
            self.need = -1
            w, self.waiter = self.waiter, None
            if w is not None and not w.done():
                w.set_result((self.status, body))

    def _fail(self, exc: BaseException) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed by the server"))

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiter = fut
        self.transport.write(data)
        return fut


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    latency: Latency
    first_error: str | None = None
    samples_ns: list[int] = field(default_factory=list, repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        err = f", {self.errors} errors (first: {self.first_error})" if self.errors else ""
        return f"{self.rps:,.0f} req/s over {self.requests:,} requests; {self.latency.text()}{err}"


async def _run(
    host: str,
    port: int,
    make: MakeRequest,
    concurrency: int,
    total: int | None,
    duration: float | None,
    expect: int,
    start_index: int,
) -> LoadResult:
    loop = asyncio.get_running_loop()
    conns: list[_Conn] = []
    for _ in range(concurrency):
        _, proto = await loop.create_connection(_Conn, host, port)
        conns.append(proto)
    samples: list[int] = []
    errors = [0]
    first_error: list[str] = []
    counter = [start_index]
    end_index = start_index + total if total is not None else None
    t_start = time.perf_counter()
    deadline = t_start + duration if duration is not None else None
    clock = time.perf_counter_ns

    async def worker(conn: _Conn) -> None:
        while True:
            i = counter[0]
            if end_index is not None and i >= end_index:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            counter[0] = i + 1
            data = make(i)
            t0 = clock()
            status, body = await conn.send(data)
            samples.append(clock() - t0)
            if status != expect:
                errors[0] += 1
                if not first_error:
                    first_error.append(f"{status} {body[:200]!r}")

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        elapsed = time.perf_counter() - t_start
        for c in conns:
            if c.transport is not None:
                c.transport.close()
    return LoadResult(
        len(samples),
        elapsed,
        errors[0],
        Latency.of(samples),
        first_error[0] if first_error else None,
        samples,
    )


def run_load(
    port: int,
    make: MakeRequest,
    *,
    concurrency: int,
    total: int | None = None,
    duration: float | None = None,
    expect: int = 200,
    host: str = "127.0.0.1",
    start_index: int = 0,
) -> LoadResult:
    """Drive ``make(i)`` requests at 127.0.0.1:``port``; see the module doc."""
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("the load generator only talks to loopback")
    if total is None and duration is None:
        raise ValueError("give total or duration: a load is always bounded")
    factory = uvloop.new_event_loop if uvloop is not None else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_run(host, port, make, concurrency, total, duration, expect, start_index))
