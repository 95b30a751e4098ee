"""The HTTP API (README "HTTP API"): routing, auth, and one small handler per route.

Each handler makes one call into the engine or a query over it (``engram.query``) and shapes
its answer. Writes go through ``Engine.submit`` on the event loop (microseconds, never blocks on
the disk) and then await durability through ``DurableWaiter``; point reads run on the loop;
scans (neighbors, recall, stats, export) run in the default thread pool so a large one does not
stall the loop.

Ids may contain '/': clients send them percent-encoded (``a%2Fb``). Unencoded, the path after
``/v1/memories/`` is the id, except a final ``/activate`` on POST or ``/neighbors`` on GET.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

from engram import query
from engram.datadir import read_owner
from engram.errors import Conflict, EngramError, NotFound, Unavailable, ValidationError
from engram.graph import Engine, WriteResult
from engram.model import ExportStream
from engram.server import admin, openapi
from engram.server.asgi import (
    CT_NDJSON,
    BodyTooLarge,
    ClientGone,
    Headers,
    MethodNotAllowed,
    NoRoute,
    Receive,
    Request,
    Scope,
    Send,
    Unauthorized,
    encode,
    error_response,
    path_param,
    send_json,
)
from engram.server.durable import DurableWaiter

log = logging.getLogger("engram.server")

Result = tuple[int, Any]
Handler = Callable[..., Awaitable["Result | Stream | admin.BackupStream"]]

# Batches larger than this are planned in a worker thread: planning 100k ops takes long enough
# to stall every other request if done on the loop.
BIG_BATCH = 1000
EXPORT_CHUNK = 1000
_INTERNAL = {
    "error": "internal",
    "message": "unexpected server error; it is in the server log — please report it",
}
_PATCH_FIELDS = frozenset({"content", "strength", "metadata"})


class Stream:
    """A streamed 200 response (export); chunks are produced in a worker thread.

    The producer is closed, in a worker thread too, as soon as the stream ends, fails or the
    client goes away (``receive`` answers http.disconnect), so what it holds (an export's read
    snapshot) is released then, not when the last chunk would have been sent.
    """

    def __init__(
        self,
        chunks: Generator[bytes, None, None],
        content_type: tuple[bytes, bytes],
        headers: Headers | None = None,
        receive: Receive | None = None,
    ) -> None:
        self.chunks = chunks
        self.content_type = content_type
        self.headers: Headers = [content_type, *(headers or [])]
        self.receive = receive

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()
        watcher = None
        if self.receive is not None:
            watcher = asyncio.ensure_future(_watch_disconnect(self.receive, gone))
        try:
            while not gone.is_set():
                chunk = await loop.run_in_executor(None, next, self.chunks, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            if watcher is not None:
                watcher.cancel()
            try:
                await loop.run_in_executor(None, self.chunks.close)
            except ValueError:  # still running in a cancelled executor call: closed by GC
                pass


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


class EngramApp:
    """The ASGI application. ``engine`` stays None while the server recovers (503s until set)."""

    def __init__(
        self,
        engine: Engine | None,
        token: str | None,
        max_body: int,
        admin_token: str | None = None,
    ) -> None:
        self.engine = engine
        self.max_body = max_body
        self.backup_dirs: tuple[Path, ...] = ()  # where the server may write backups itself
        # Compared in constant time with the whole Authorization header. Admin routes take
        # the admin token when there is one (and then only it), else the data token; data
        # routes never take the admin token.
        self._expected_auth = _bearer(token)
        self._expected_admin_auth = _bearer(admin_token) if admin_token else self._expected_auth
        self.startup_error: str | None = None  # set when the engine failed to open
        self.progress: tuple[int, int] | None = None  # (records replayed, LSN) during recovery
        self._waiter: DurableWaiter | None = None
        self._one_memory: dict[str, Handler] = {
            "GET": self._get_memory,
            "PATCH": self._patch,
            "DELETE": self._delete,
        }
        self._static: dict[str, dict[str, Handler]] = {
            "edges": {"POST": self._create_edge, "DELETE": self._delete_edge},
            "recall": {"GET": self._recall},
            "stats": {"GET": self._stats},
            "batch": {"POST": self._batch},
            "mark": {"POST": self._mark},
            "export": {"GET": self._export},
        }
        self._admin: dict[str, dict[str, Handler]] = {
            "backup": {"POST": self._admin_backup},
            "quiesce": {"POST": self._admin_quiesce},
            "resume": {"POST": self._admin_resume},
            "status": {"GET": self._admin_status},
        }

    def routes(self) -> set[tuple[str, str]]:
        """(path, METHOD) of every route this app dispatches: the fixed ones of ``_dispatch``
        and ``_route``, and every entry of the route tables (``openapi.py`` describes exactly
        these)."""
        out = {
            ("/health/live", "GET"),
            ("/health/ready", "GET"),
            ("/openapi.json", "GET"),
            ("/v1/memories", "POST"),
            ("/v1/memories/{id}/activate", "POST"),
            ("/v1/memories/{id}/neighbors", "GET"),
        }
        out |= {("/v1/memories/{id}", m) for m in self._one_memory}
        out |= {(f"/v1/{name}", m) for name, table in self._static.items() for m in table}
        out |= {(f"/v1/admin/{name}", m) for name, table in self._admin.items() for m in table}
        return out

    # -- ASGI entry ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return
        req = Request(scope, receive)
        headers: Headers = []
        try:
            out = await self._dispatch(req)
            if isinstance(out, admin.BackupStream):  # a backup streamed to its client
                await out.respond(send, receive)
                return
            if isinstance(out, Stream):
                await _stream(send, out, req)
                return
            status, body = out
        except EngramError as e:
            status, body, headers = error_response(e)
            if isinstance(e, BodyTooLarge):
                # The rest of the body is never read; do not reuse the connection for it.
                headers.append((b"connection", b"close"))
        except ClientGone:
            return
        except Exception:
            log.exception("unexpected error on %s %s", req.method, req.path)
            status, body = 500, _INTERNAL
        await send_json(send, status, body, headers)

    async def _dispatch(self, req: Request) -> Result | Stream | admin.BackupStream:
        seg = req.segments
        if seg == ["openapi.json"]:  # like /health, without auth: it describes, never reveals
            _only(req, "GET")
            return 200, openapi.spec()
        if len(seg) == 2 and seg[0] == "health":
            if seg[1] == "live":
                _only(req, "GET")
                return 200, {"status": "live"}
            if seg[1] == "ready":
                _only(req, "GET")
                return self._ready()
            raise NoRoute(f"no route {req.path}; see the HTTP API in README.md")
        if not seg or seg[0] != "v1" or len(seg) < 2:
            raise NoRoute(f"no route {req.path}; see the HTTP API in README.md")
        self._authorize(req, admin=seg[1] == "admin")
        handler, args = self._route(req)
        return await handler(req, self._engine(), *args)

    def _route(self, req: Request) -> tuple[Handler, tuple[str, ...]]:
        seg, method = req.segments, req.method
        name = seg[1]
        if name == "memories":
            if len(seg) == 2:
                _only(req, "POST")
                return self._create_memory, ()
            rest = seg[2:]
            if len(rest) >= 2 and rest[-1] == "activate" and method == "POST":
                return self._activate, (path_param(rest[:-1]),)
            if len(rest) >= 2 and rest[-1] == "neighbors" and method == "GET":
                return self._neighbors, (path_param(rest[:-1]),)
            handler = self._one_memory.get(method)
            if handler is None:
                raise MethodNotAllowed(
                    f"{method} is not allowed on {req.path}", allow=list(self._one_memory)
                )
            return handler, (path_param(rest),)
        if name == "admin" and len(seg) == 3:
            admin = self._admin.get(seg[2])
            if admin is None:
                raise NoRoute(f"no route {req.path}; see the HTTP API in README.md")
            if method not in admin:
                raise MethodNotAllowed(f"{method} is not allowed on {req.path}", allow=list(admin))
            return admin[method], ()
        routes = self._static.get(name) if len(seg) == 2 else None
        if routes is None:
            raise NoRoute(f"no route {req.path}; see the HTTP API in README.md")
        static = routes.get(method)
        if static is None:
            raise MethodNotAllowed(f"{method} is not allowed on {req.path}", allow=list(routes))
        return static, ()

    def _authorize(self, req: Request, admin: bool) -> None:
        expected = self._expected_admin_auth if admin else self._expected_auth
        if expected is None:
            return
        if not hmac.compare_digest(_credentials(req.header(b"authorization")), expected):
            raise Unauthorized(
                "a valid admin token is required; pass Authorization: Bearer <admin token>"
                if admin and expected is not self._expected_auth
                else None
            )

    def _engine(self) -> Engine:
        eng = self.engine
        if eng is None:
            if self.startup_error is not None:
                raise Unavailable(
                    f"the database failed to open ({self.startup_error})", retry_after=30
                )
            raise Unavailable("the server is starting: recovery in progress", retry_after=1)
        return eng

    def _ready(self) -> Result:
        eng = self.engine
        if eng is None:
            if self.startup_error is not None:
                return 503, {"status": "failed", "reason": self.startup_error}
            body: dict[str, Any] = {"status": "starting", "reason": "recovery in progress"}
            if self.progress is not None:
                body["replayed"], body["lsn"] = self.progress
            return 503, body
        state, reason = eng.health()
        # "verifying" (200: reads and writes are served while a restore's digest check runs)
        # and "verification_failed" (503: writes refused) carry the check's state.
        out: dict[str, Any] = {"status": state}
        if reason is not None:
            out["reason"] = reason
        if eng.verification is not None:
            out["verification"] = eng.verification.to_json()
        return (503 if reason is not None else 200), out

    # -- writes --------------------------------------------------------------------------

    async def _write(self, eng: Engine, ops: list[Any]) -> WriteResult:
        if len(ops) > BIG_BATCH:
            res = await asyncio.get_running_loop().run_in_executor(None, eng.submit, ops)
        else:
            res = eng.submit(ops)
        if eng.config.durability != "sync":
            eng.wait(res.lsn)  # returns at once in these modes; raises if the log has failed
            return res
        loop = asyncio.get_running_loop()
        if self._waiter is None or self._waiter.loop is not loop:
            # One waiter per loop: an app driven by several loops in turn (in-process tests)
            # must not wake a closed one.
            self._waiter = DurableWaiter(loop)
        await self._waiter.wait(eng, res.lsn)
        return res

    async def _body(
        self, req: Request, op: str, reserved: tuple[str, ...] = ("op",), optional: bool = False
    ) -> dict[str, Any]:
        body = await req.json_object(self.max_body, optional=optional)
        # The op (and for per-memory routes the id) come from the route, never from the body.
        for key in reserved:
            if key in body:
                raise ValidationError(f"unknown field {key!r} for {op}", field=key)
        return body

    async def _create_memory(self, req: Request, eng: Engine) -> Result:
        body = await self._body(req, "create_memory")
        res = await self._write(eng, [{"op": "create_memory", **body}])
        return 201, {"id": res.results[0]["id"], "lsn": res.lsn}

    async def _patch(self, req: Request, eng: Engine, mid: str) -> Result:
        body = await self._body(req, "update_memory")
        unknown = sorted(set(body) - _PATCH_FIELDS)
        if unknown:
            raise ValidationError(
                f"unknown field {unknown[0]!r} for update_memory", field=unknown[0]
            )
        if all(body.get(k) is None for k in _PATCH_FIELDS):
            raise ValidationError(
                "nothing to update: give content, strength or metadata", field="body"
            )
        res = await self._write(eng, [{"op": "update_memory", "id": mid, **body}])
        return 200, {"id": res.results[0]["id"], "lsn": res.lsn}

    async def _delete(self, req: Request, eng: Engine, mid: str) -> Result:
        res = await self._write(eng, [{"op": "delete_memory", "id": mid}])
        r = res.results[0]
        return 200, {"id": r["id"], "lsn": res.lsn, "edges_deleted": r["edges_deleted"]}

    async def _activate(self, req: Request, eng: Engine, mid: str) -> Result:
        body = await self._body(req, "activate", ("op", "id"), optional=True)
        res = await self._write(eng, [{"op": "activate", "id": mid, **body}])
        r = res.results[0]
        return 200, {"id": r["id"], "lsn": res.lsn, "strength": r["strength"]}

    async def _create_edge(self, req: Request, eng: Engine) -> Result:
        body = await self._body(req, "create_edge")
        res = await self._write(eng, [{"op": "create_edge", **body}])
        r = res.results[0]
        return 201, {"src": r["src"], "dst": r["dst"], "kind": r["kind"], "lsn": res.lsn}

    async def _delete_edge(self, req: Request, eng: Engine) -> Result:
        q = req.query(frozenset({"src", "dst", "kind"}))
        for name in ("src", "dst"):
            if name not in q:
                raise ValidationError(f"{name} is required (query parameter)", field=name)
        op: dict[str, Any] = {"op": "delete_edge", "src": q["src"], "dst": q["dst"]}
        if "kind" in q:
            op["kind"] = q["kind"]
        res = await self._write(eng, [op])
        r = res.results[0]
        return 200, {"src": r["src"], "dst": r["dst"], "kind": r["kind"], "lsn": res.lsn}

    async def _batch(self, req: Request, eng: Engine) -> Result:
        body = await req.json_object(self.max_body)
        unknown = sorted(set(body) - {"ops"})
        if unknown:
            raise ValidationError(f"unknown field {unknown[0]!r} for batch", field=unknown[0])
        if "ops" not in body:
            raise ValidationError("ops is required", field="ops")
        ops = body["ops"]
        try:
            res = await self._write(eng, ops)
        except (ValidationError, NotFound, Conflict) as e:
            # The engine names no index for a lone op (the single-op routes' messages); a batch
            # always names the bad op's index, also when it holds one.
            if isinstance(ops, list) and len(ops) == 1 and "index" not in e.details:
                e.details["index"] = 0
                e.message = f"op 0: {e.message}"
                e.args = (e.message,)
            raise
        return 200, {"lsn": res.lsn, "results": res.results}

    async def _mark(self, req: Request, eng: Engine) -> Result:
        body = await self._body(req, "mark")
        res = await self._write(eng, [{"op": "mark", **body}])
        return 201, {"name": res.results[0]["name"], "lsn": res.lsn}

    # -- operations ----------------------------------------------------------------------

    async def _admin_backup(self, req: Request, eng: Engine) -> Result | admin.BackupStream:
        body = await req.json_object(self.max_body)
        return await admin.backup(eng, body, self.backup_dirs)

    async def _admin_quiesce(self, req: Request, eng: Engine) -> Result:
        return await admin.quiesce(eng, await req.json_object(self.max_body))

    async def _admin_resume(self, req: Request, eng: Engine) -> Result:
        return await admin.resume(eng, await req.json_object(self.max_body, optional=True))

    async def _admin_status(self, req: Request, eng: Engine) -> Result:
        owner = read_owner(eng.root)
        return await admin.status(eng, owner.get("url") if owner else None)

    # -- reads ---------------------------------------------------------------------------

    async def _get_memory(self, req: Request, eng: Engine, mid: str) -> Result:
        return 200, query.memory(eng, mid)

    async def _neighbors(self, req: Request, eng: Engine, mid: str) -> Result:
        q = req.query(frozenset({"direction", "depth"}))
        direction = q.get("direction", "both")
        depth = _int_param(q, "depth", 1)
        found = await _in_thread(query.neighbors, eng, mid, direction, depth)
        return 200, {"id": mid, "neighbors": found}

    async def _recall(self, req: Request, eng: Engine) -> Result:
        q = req.query(frozenset({"query", "limit"}))
        text = q.get("query")
        limit = _int_param(q, "limit", 10)
        results = await _in_thread(query.recall, eng, text, limit)
        return 200, {"query": text, "results": results}

    async def _stats(self, req: Request, eng: Engine) -> Result:
        return 200, await _in_thread(eng.stats)

    async def _export(self, req: Request, eng: Engine) -> Stream:
        snap = await _in_thread(query.export, eng)
        headers = [
            (b"x-engram-lsn", str(snap.lsn).encode()),
            (b"x-engram-digest", snap.digest.encode()),
        ]
        return Stream(_export_chunks(snap), CT_NDJSON, headers, req.receive)


def create_app(
    engine: Engine | None,
    token: str | None,
    max_body: int = 16 << 20,
    *,
    admin_token: str | None = None,
) -> EngramApp:
    """The ASGI app over ``engine`` (None = still recovering: set ``app.engine`` when open).

    ``token`` guards every /v1 route; ``admin_token``, when given, guards /v1/admin instead.
    """
    return EngramApp(engine, token, max_body, admin_token)


def _bearer(token: str | None) -> bytes | None:
    """What a request's Authorization header must carry, as ``_credentials`` gives it."""
    return b"bearer " + token.encode() if token else None


def _credentials(header: bytes | None) -> bytes:
    """The Authorization header with its scheme lower-cased: the scheme is case-insensitive
    (RFC 7235: ``Bearer``, ``bearer``, ``BEARER``), the token is not. One space separates them,
    as every client sends it."""
    scheme, sep, rest = (header or b"").strip().partition(b" ")
    return scheme.lower() + sep + rest


def _export_chunks(snap: ExportStream) -> Generator[bytes, None, None]:
    """An export's ops as NDJSON, in chunks of EXPORT_CHUNK lines; closes ``snap`` when done
    or closed itself."""
    try:
        buf: list[bytes] = []
        for op in snap:
            buf.append(encode(op))
            if len(buf) >= EXPORT_CHUNK:
                yield b"\n".join(buf) + b"\n"
                buf = []
        if buf:
            yield b"\n".join(buf) + b"\n"
    finally:
        snap.close()


async def _stream(send: Send, out: Stream, req: Request) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": out.headers})
    try:
        async for chunk in out:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except Exception:
        # The status is already sent: end without the final chunk so the client sees a
        # truncated response instead of a complete-looking partial export.
        log.exception("export failed midway on %s", req.path)
        return
    await send({"type": "http.response.body", "body": b""})


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _int_param(q: dict[str, str], name: str, default: int) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValidationError(f"{name} must be an integer, got {raw[:40]!r}", field=name) from None


def _only(req: Request, method: str) -> None:
    if req.method != method:
        raise MethodNotAllowed(f"{req.method} is not allowed on {req.path}", allow=[method])


async def _lifespan(receive: Receive, send: Send) -> None:
    # Nothing to set up per process: serve() owns the engine's lifecycle.
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
