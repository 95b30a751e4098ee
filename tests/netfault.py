"""A TCP fault proxy for the network-fault tests (issue 12: "block cloud backup upload
mid-transfer"): it sits between engram and a local S3 server and breaks the connection on cue.

    with FaultProxy(("127.0.0.1", s3_port)) as proxy:       # listens on 127.0.0.1, a free port
        client = boto3.client("s3", endpoint_url=proxy.url, ...)
        proxy.cut_after(1_000_000, "up")                     # 1,000,000 bytes go up, then a cut
        proxy.inject(503, count=2)                           # the next two requests: 503 SlowDown
        proxy.stall("down")                                  # answers are held: timeouts must fire
        proxy.stats()                                        # bytes, connections, requests, cuts

Directions: "up" is client -> server (requests, upload bodies), "down" is server -> client
(responses, download bodies), "both" sets both. Every fault is per direction and can be set,
changed or cleared from any thread while traffic flows; a change applies from the next piece
of data forwarded. The faults:

- ``latency(seconds)``: every piece read is forwarded that long after it was read (a one-way
  delay line holding up to 8 reads of at most 64 KiB per connection and direction, a window:
  each byte arrives late, and a bulk transfer slows only once the window is full).
- ``bandwidth(bytes_per_s)``: the direction is a link of that rate shared by all connections;
  data leaves in slices of at most 50 ms of the rate.
- ``cut_after(n, reset=False, times=1, body_only=False)``: counting from when it is set, across
  every connection, exactly ``n`` bytes pass in the direction; the connection carrying byte
  n+1 is then cut: byte n+1 and everything after it are dropped, both peers get a FIN
  (``reset=False``: the proxy then reads and discards what they still send until they close,
  so the FIN is not turned into a reset by unread data) or an RST (``reset=True``, sent once
  the kernel saw the n bytes acknowledged, since an RST discards what is still queued). ``times``
  cuts in a row (each counting ``n`` from the previous one; ``None``: every time). Bytes are
  counted as they are on the wire, HTTP heads included; with ``body_only`` (HTTP mode, "up")
  only request-body bytes count, so a cut lands at a chosen offset of an upload's body.
- ``stall()``: data in the direction is held, not forwarded and not dropped; reading stops once
  a few pieces are held, so TCP backpressure reaches the sender. A client that waits for an
  answer times out; ``unstall()`` releases what was held.
- ``inject(status, count=1, when=None)`` (HTTP mode): the next ``count`` requests (those
  ``when(method, target)`` accepts) are not forwarded; the proxy reads the whole request (the
  head, then a Content-Length or chunked body, read and discarded) and answers with an S3 error
  (503 SlowDown, 500 InternalError, 408 RequestTimeout, 429 SlowDown by default): a clean,
  complete response, and the connection stays usable. A request that says ``Expect:
  100-continue`` is answered at once, before its body, with ``Connection: close``, and the
  connection is then closed (RFC 9110 10.1.1: the client need not send the body after a final
  status; botocore does not).
- ``clear()``: every fault off.

An injected response goes down like any other bytes: the "down" faults (latency, stall, a cut)
apply to it. A target that refuses the proxy's connection gets the client an RST. ``stats()``
reads the counters; ``wait_until(check)`` polls them (e.g. until a cut fired).

Why HTTP is parsed at all: boto3 keeps connections alive, so "the next request" is usually not
the next connection. In HTTP mode (the default) the proxy follows the framing of the requests
going up (request line and headers, then Content-Length or chunked body) to know where each
request starts; responses going down are forwarded without parsing. Requests are assumed not
to be pipelined (urllib3, under boto3, never pipelines). Anything that does not parse as an
HTTP/1.x request switches that connection to plain forwarding. ``http=False`` never parses
(raw TCP, as for an echo server).

Loopback only: the proxy listens on 127.0.0.1 and refuses (``NotLoopback``, at construction) a
target outside 127.0.0.0/8 and ::1; host names other than "localhost" are refused unresolved.

Design: one asyncio event loop in one thread (named ``netfault-PORT``), rather than threads per
connection, so that stopping is one cancellation and one join. Each connection is four tasks: a
reader and a writer per direction, joined by a small bounded queue (the delay line); the writer
applies the faults; a task that fails resets the whole connection. The fault settings and the
counters live behind one lock, read by the loop and changed by the test's thread. ``close()``
(or leaving the ``with`` block) closes the listener, aborts every open connection, stops the
loop and joins its thread: nothing is left running or open.
Test code only: it is not part of engram.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import socket
import struct
import termios
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Literal
from xml.sax.saxutils import escape

__all__ = ["FaultProxy", "NotLoopback", "Stats", "S3_ERRORS"]

Direction = Literal["up", "down", "both"]

# The S3 error each injected status answers with by default: (code, reason phrase, message).
S3_ERRORS: dict[int, tuple[str, str, str]] = {
    503: ("SlowDown", "Slow Down", "Please reduce your request rate."),
    500: ("InternalError", "Internal Server Error", "We encountered an internal error."),
    408: (
        "RequestTimeout",
        "Request Timeout",
        "Your socket connection to the server was not read from or written to within the "
        "timeout period.",
    ),
    429: ("SlowDown", "Too Many Requests", "Please reduce your request rate."),
}

_PIECE = 64 * 1024  # the most one read takes
_QUEUE = 8  # pieces held per connection and direction before the reader stops reading
_HEAD_LIMIT = 64 * 1024  # a longer request head is not HTTP as far as the proxy cares
_FIN_GRACE = 2.0  # after a clean cut, how long peers get to close before they are aborted
_STALL_POLL = 0.01  # how often a stalled writer looks whether it was released


class NotLoopback(ValueError):
    """The proxy forwards only to 127.0.0.0/8 or ::1."""


@dataclass(frozen=True)
class Stats:
    """Counters since the proxy started. Bytes are those forwarded (delivered to the peer's
    socket), so after a cut at n, ``up_bytes`` grew by exactly n."""

    connections: int = 0  # accepted
    open_connections: int = 0
    up_bytes: int = 0
    down_bytes: int = 0  # injected responses included
    up_body_bytes: int = 0  # of up_bytes, request bodies (HTTP mode)
    requests: int = 0  # request heads seen (HTTP mode), injected ones included
    injected: int = 0
    cuts: int = 0  # FIN cuts and resets fired
    resets: int = 0  # of cuts, those that sent an RST


@dataclass
class _Cut:
    after: int
    reset: bool
    times: int | None
    body_only: bool
    passed: int = 0


@dataclass
class _Side:
    latency: float = 0.0
    bandwidth: float | None = None
    stalled: bool = False
    cut: _Cut | None = None
    link_free_at: float = 0.0  # when the bandwidth-limited link is next idle (loop time)


@dataclass
class _Inject:
    status: int
    count: int
    code: str
    reason: str
    message: str
    when: Callable[[str, str], bool] | None


@dataclass
class _Piece:
    data: bytes
    read_at: float
    body: bool = False


_EOF = object()  # the sender closed its side: half-close the other
_CLOSE = object()  # an injected response said Connection: close: end the connection cleanly


@dataclass(eq=False)
class _Conn:
    cwriter: asyncio.StreamWriter
    uwriter: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    ended: bool = False
    draining: bool = False

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.cwriter, self.uwriter) if w is not None]

    def abort(self, reset: bool) -> None:
        """Drop both sides now: with an RST (``reset``) or a plain close."""
        if self.ended:
            return
        self.ended = True
        for w in self.writers():
            if reset:
                sock = w.get_extra_info("socket")
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        self._cancel_others()

    def finish(self) -> None:
        """End cleanly: a FIN both ways, then read and discard until the peers close."""
        if self.ended or self.draining:
            return
        self.draining = True
        for w in self.writers():
            with contextlib.suppress(OSError, RuntimeError):
                if w.can_write_eof() and not w.transport.is_closing():
                    w.write_eof()
        self._cancel_others()

    def _cancel_others(self) -> None:
        me = asyncio.current_task()
        for t in self.tasks:
            if t is not me:
                t.cancel()


def _check_loopback(host: str) -> str:
    """The address to connect to, if ``host`` is a loopback one; NotLoopback otherwise."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise NotLoopback(f"refusing to forward to {host!r}: give a loopback IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_loopback:
        raise NotLoopback(f"refusing to forward to {host}: only 127.0.0.0/8 and ::1 are allowed")
    return str(ip)


def _sides(direction: Direction) -> tuple[str, ...]:
    if direction == "both":
        return ("up", "down")
    if direction in ("up", "down"):
        return (direction,)
    raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")


class _NotHttp(Exception):
    """The connection's up stream stopped looking like HTTP/1.x requests."""


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Request line and headers (names lower-cased; a repeated header joined with ", ")."""
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        raise _NotHttp
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _NotHttp
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return parts[0], parts[1], parts[2], headers


def _body_framing(headers: dict[str, str]) -> int | Literal["chunked"]:
    """The body's length, or "chunked" (which wins over Content-Length, RFC 9112 6.3)."""
    te = headers.get("transfer-encoding")
    if te is not None:
        if te.split(",")[-1].strip().lower() != "chunked":
            raise _NotHttp
        return "chunked"
    cl = headers.get("content-length")
    if cl is None:
        return 0
    values = {v.strip() for v in cl.split(",")}
    if len(values) != 1:
        raise _NotHttp
    (value,) = values
    if not value.isdigit():
        raise _NotHttp
    return int(value)


def _error_response(inj: _Inject, method: str, target: str, close: bool, n: int) -> bytes:
    request_id = f"netfault-{n}"
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(inj.code)}</Code><Message>{escape(inj.message)}</Message>"
        f"<Resource>{escape(target.split('?')[0])}</Resource>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {inj.status} {inj.reason}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n"
        "\r\n"
    ).encode("latin-1")
    return head if method == "HEAD" else head + body


class FaultProxy:
    """A fault-injecting TCP proxy from 127.0.0.1:``port`` to a loopback ``target`` (see the
    module docstring). Use as a context manager, or ``start()`` then ``close()``."""

    def __init__(self, target: tuple[str, int], *, http: bool = True) -> None:
        host, port = target
        self._target = (_check_loopback(host), int(port))
        if not 0 < self._target[1] < 65536:
            raise ValueError(f"target port must be in 1..65535, not {port}")
        self._http = http
        self._lock = threading.Lock()
        self._side = {"up": _Side(), "down": _Side()}
        self._inject: _Inject | None = None
        self._counts: dict[str, int] = {f.name: 0 for f in fields(Stats)}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.thread_name = ""
        self._conns: set[_Conn] = set()
        self._port = 0
        self._failure: BaseException | None = None

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="netfault", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._failure is not None:
            self._thread.join()
            raise RuntimeError("the fault proxy did not start") from self._failure
        return self

    def close(self) -> None:
        """Stop listening, abort every connection, stop the loop and join its thread."""
        loop, thread, stop = self._loop, self._thread, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError("the fault proxy's thread did not stop")
        self._thread = None
        if self._failure is not None:
            raise RuntimeError("the fault proxy's loop failed") from self._failure

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        except BaseException as e:  # reported to start(); a failure after it ends the thread
            self._failure = e
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, limit=_HEAD_LIMIT, reuse_address=True
        )
        try:
            self._port = server.sockets[0].getsockname()[1]
            self.thread_name = f"netfault-{self._port}"
            threading.current_thread().name = self.thread_name
            ready.set()
            await self._stop.wait()
        finally:
            server.close()
            for conn in list(self._conns):
                conn.abort(reset=False)
            for task in list(self._handlers):
                task.cancel()
            if self._handlers:
                await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    # -- faults (any thread) ------------------------------------------------------------------

    def latency(self, seconds: float, direction: Direction = "both") -> None:
        if not seconds >= 0:
            raise ValueError(f"latency must be a number of seconds >= 0, not {seconds!r}")
        with self._lock:
            for s in _sides(direction):
                self._side[s].latency = float(seconds)

    def bandwidth(self, bytes_per_s: float | None, direction: Direction = "both") -> None:
        """Limit the direction to ``bytes_per_s`` (None: unlimited)."""
        if bytes_per_s is not None and not bytes_per_s > 0:
            raise ValueError(f"bandwidth must be bytes per second > 0, or None, not {bytes_per_s}")
        with self._lock:
            for s in _sides(direction):
                self._side[s].bandwidth = None if bytes_per_s is None else float(bytes_per_s)
                self._side[s].link_free_at = 0.0

    def cut_after(
        self,
        n: int,
        direction: Direction = "up",
        *,
        reset: bool = False,
        times: int | None = 1,
        body_only: bool = False,
    ) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"cut_after takes a byte count >= 0, not {n!r}")
        if times is not None and (not isinstance(times, int) or times < 1):
            raise ValueError(f"times must be >= 1 or None (every time), not {times!r}")
        if body_only and (not self._http or direction != "up"):
            raise ValueError("body_only counts request bodies: HTTP mode and direction 'up' only")
        with self._lock:
            for s in _sides(direction):
                self._side[s].cut = _Cut(n, reset, times, body_only)

    def reset_after(self, n: int, direction: Direction = "up", *, times: int | None = 1) -> None:
        """``cut_after(n, direction, reset=True)``: the peers get an RST."""
        self.cut_after(n, direction, reset=True, times=times)

    def stall(self, direction: Direction = "both") -> None:
        with self._lock:
            for s in _sides(direction):
                self._side[s].stalled = True

    def unstall(self, direction: Direction = "both") -> None:
        with self._lock:
            for s in _sides(direction):
                self._side[s].stalled = False

    def inject(
        self,
        status: int = 503,
        count: int = 1,
        *,
        when: Callable[[str, str], bool] | None = None,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (that ``when(method, target)`` accepts) with an S3
        error of ``status`` instead of forwarding them."""
        if not self._http:
            raise ValueError("inject answers HTTP requests: the proxy was made with http=False")
        if status not in S3_ERRORS and code is None:
            raise ValueError(
                f"status {status} has no default S3 error: give code= (or use "
                f"one of {sorted(S3_ERRORS)})"
            )
        if not 400 <= status <= 599:
            raise ValueError(f"an injected status is an error, 400..599, not {status}")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be >= 1, not {count!r}")
        default = S3_ERRORS.get(status, ("", "Error", "Injected by the fault proxy."))
        with self._lock:
            self._inject = _Inject(
                status, count, code or default[0], default[1], message or default[2], when
            )

    def clear(self) -> None:
        """Every fault off (queued data then flows; counters are kept)."""
        with self._lock:
            self._side = {"up": _Side(), "down": _Side()}
            self._inject = None

    def stats(self) -> Stats:
        with self._lock:
            return Stats(**self._counts)

    def wait_until(self, check: Callable[[Stats], bool], timeout: float = 10.0) -> Stats:
        """Poll the counters until ``check`` holds; TimeoutError naming them otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if check(s):
                return s
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the fault proxy's counters never got there: {s}")
            time.sleep(0.005)

    # -- the connections (the loop's thread) --------------------------------------------------

    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                self._counts[k] += v

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        conn = _Conn(cwriter)
        self._conns.add(conn)
        self._count(connections=1, open_connections=1)
        ureader: asyncio.StreamReader | None = None
        try:
            try:
                ureader, conn.uwriter = await asyncio.open_connection(
                    *self._target, limit=_HEAD_LIMIT
                )
            except OSError:
                conn.abort(reset=True)  # the target is down: the client sees its refusal
                return
            up: asyncio.Queue[object] = asyncio.Queue(_QUEUE)
            down: asyncio.Queue[object] = asyncio.Queue(_QUEUE)
            read_up = (
                partial(self._read_http, creader, up, down)
                if self._http
                else partial(self._read, creader, up)
            )
            conn.tasks = [
                asyncio.create_task(_guard(conn, read_up)),
                asyncio.create_task(_guard(conn, partial(self._read, ureader, down))),
                asyncio.create_task(
                    _guard(conn, partial(self._write, conn, up, conn.uwriter, "up"))
                ),
                asyncio.create_task(
                    _guard(conn, partial(self._write, conn, down, cwriter, "down"))
                ),
            ]
            await asyncio.gather(*conn.tasks, return_exceptions=True)
            if conn.draining and not conn.ended:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(_discard(creader), _discard(ureader)), _FIN_GRACE
                    )
        finally:
            if not conn.ended:
                conn.ended = True
                for w in conn.writers():
                    w.close()
            self._conns.discard(conn)
            self._handlers.discard(me)
            self._count(open_connections=-1)

    async def _read(self, reader: asyncio.StreamReader, q: asyncio.Queue[object]) -> None:
        loop = asyncio.get_running_loop()
        while data := await reader.read(_PIECE):
            await q.put(_Piece(data, loop.time()))
        await q.put(_EOF)

    async def _read_http(
        self, reader: asyncio.StreamReader, up: asyncio.Queue[object], down: asyncio.Queue[object]
    ) -> None:
        """The up stream as HTTP/1.x requests: a head, then its body, forwarded as they come,
        unless an injection answers the request instead."""
        loop = asyncio.get_running_loop()

        async def forward(data: bytes, body: bool) -> None:
            if data:
                await up.put(_Piece(data, loop.time(), body))

        async def body(framing: int | Literal["chunked"], send: bool) -> bool:
            """Pass (or, unless ``send``, drop) one body; False if the client closed first."""

            async def keep(data: bytes) -> None:
                if send:
                    await forward(data, True)

            try:
                if framing == "chunked":
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        await keep(line)
                        size_text = line.split(b";")[0].strip()
                        try:
                            size = int(size_text, 16)
                        except ValueError:
                            raise _NotHttp from None
                        if size == 0:
                            while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                                await keep(trailer)
                            await keep(trailer)
                            return True
                        if not await copy(size + 2, send):  # the data and its CRLF
                            return False
                return await copy(framing, send)
            except asyncio.IncompleteReadError as e:
                await keep(e.partial)
                return False

        async def copy(n: int, send: bool) -> bool:
            while n:
                data = await reader.read(min(n, _PIECE))
                if not data:
                    return False
                n -= len(data)
                if send:
                    await forward(data, True)
            return True

        head = b""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as e:
                    await forward(e.partial, False)
                    break
                except asyncio.LimitOverrunError:  # the bytes stay in the reader's buffer
                    head = b""
                    raise _NotHttp from None
                method, target, version, headers = _parse_head(head)
                framing = _body_framing(headers)
                self._count(requests=1)
                inj = self._take_injection(method, target)
                if inj is None:
                    pending, head = head, b""
                    await forward(pending, False)
                    if not await body(framing, True):
                        break
                    continue
                expect = headers.get("expect", "").lower() == "100-continue"
                close = (
                    expect
                    or "close" in headers.get("connection", "").lower()
                    or version == "HTTP/1.0"
                )
                head = b""
                if not expect and not await body(framing, False):
                    break
                n = self._count_injected()
                response = _error_response(inj, method, target, close, n)
                await down.put(_Piece(response, loop.time()))
                if close:
                    await down.put(_CLOSE)
                    return
        except _NotHttp:
            # Not HTTP/1.x after all: the head that failed to parse, then everything else,
            # passes untouched.
            await forward(head, False)
            await self._read(reader, up)
            return
        await up.put(_EOF)

    def _take_injection(self, method: str, target: str) -> _Inject | None:
        with self._lock:
            inj = self._inject
            if inj is None or (inj.when is not None and not inj.when(method, target)):
                return None
            inj.count -= 1
            if inj.count == 0:
                self._inject = None
            return inj

    def _count_injected(self) -> int:
        with self._lock:
            self._counts["injected"] += 1
            return self._counts["injected"]

    async def _write(
        self, conn: _Conn, q: asyncio.Queue[object], writer: asyncio.StreamWriter, side: str
    ) -> None:
        """Forward what the queue holds, applying this direction's faults."""
        loop = asyncio.get_running_loop()
        while True:
            item = await q.get()
            if item is _EOF:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            if item is _CLOSE:
                await writer.drain()
                conn.finish()
                return
            assert isinstance(item, _Piece)
            with self._lock:
                delay = item.read_at + self._side[side].latency - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            while self._stalled(side):
                await asyncio.sleep(_STALL_POLL)
            data = item.data
            allowed, cut = self._take_budget(side, len(data), item.body)
            if allowed:
                await self._send(writer, data[:allowed], side, item.body)
            if cut is not None:
                self._count(cuts=1, resets=int(cut.reset))
                if cut.reset:
                    await _delivered(writer)
                    conn.abort(reset=True)
                else:
                    conn.finish()
                return

    def _stalled(self, side: str) -> bool:
        with self._lock:
            return self._side[side].stalled

    def _take_budget(self, side: str, n: int, body: bool) -> tuple[int, _Cut | None]:
        """How many of the next ``n`` bytes may pass, and the cut that fires after them."""
        with self._lock:
            cut = self._side[side].cut
            if cut is None or (cut.body_only and not body):
                return n, None
            room = cut.after - cut.passed
            if n <= room:
                cut.passed += n
                return n, None
            if cut.times is not None:
                cut.times -= 1
            if cut.times == 0:
                self._side[side].cut = None
            else:
                cut.passed = 0
            return room, cut

    async def _send(self, writer: asyncio.StreamWriter, data: bytes, side: str, body: bool) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            with self._lock:
                st = self._side[side]
                rate = st.bandwidth
                if rate is None:
                    piece, due = view, 0.0
                else:
                    piece = view[: max(1, int(rate * 0.05))]
                    start = max(loop.time(), st.link_free_at)
                    due = st.link_free_at = start + len(piece) / rate
            if rate is not None:
                await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(piece)
            await writer.drain()
            inc = {f"{side}_bytes": len(piece)}
            if body:
                inc["up_body_bytes"] = len(piece)
            self._count(**inc)
            view = view[len(piece) :]


async def _delivered(writer: asyncio.StreamWriter, limit: float = 2.0) -> None:
    """Wait (at most ``limit`` seconds) until the kernel holds nothing unacknowledged of what
    was written: an RST discards the send queue, and the bytes counted as forwarded must arrive
    before it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    sock = writer.get_extra_info("socket")
    while loop.time() < deadline:
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, AttributeError):
            return
        if struct.unpack("i", raw)[0] == 0:
            return
        await asyncio.sleep(0.002)


async def _guard(conn: _Conn, step: Callable[[], Awaitable[None]]) -> None:
    """Run one of a connection's four tasks; if it fails (a peer reset or vanished, a write
    failed), the whole connection is reset: the failure reaches the other peer too."""
    try:
        await step()
    except Exception:
        conn.abort(reset=True)


async def _discard(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError):
        while await reader.read(_PIECE):
            pass
