"""Just enough ASGI for engram's routes: requests, bounded JSON bodies, JSON responses.

The API is small and hot (thousands of writes a second on two cores), so it runs on bare ASGI
under uvicorn rather than a framework: no per-request middleware stack, no model validation
layer — the planner already validates every field and names it. Bodies are decoded with msgspec;
every way a body can be wrong becomes a 400 or 413 naming the problem, never a 500.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, unquote

import msgspec

from engram.errors import EngramError, Unavailable, ValidationError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

CT_JSON = (b"content-type", b"application/json")
CT_NDJSON = (b"content-type", b"application/x-ndjson")


class Unauthorized(EngramError):
    """A valid bearer token is required; pass Authorization: Bearer <token>."""

    http_status = 401
    code = "unauthorized"


class BodyTooLarge(EngramError):
    """The request body is larger than the server accepts."""

    http_status = 413
    code = "too_large"


class NoRoute(EngramError):
    """No such route."""

    http_status = 404
    code = "not_found"


class MethodNotAllowed(EngramError):
    """This route does not take that method."""

    http_status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allow: Iterable[str]) -> None:
        super().__init__(message)
        self.allow = ", ".join(allow)


class ClientGone(Exception):
    """The client disconnected before sending its whole body; there is no one to answer."""


class Request:
    """The parts of an ASGI HTTP scope the routes use, read lazily."""

    __slots__ = ("scope", "receive", "method", "segments", "_query")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        # Route on the raw path so that an id holding '/' can be sent as %2F in one segment.
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        self.segments = raw.decode("latin-1").split("/")[1:]
        self._query: dict[str, str] | None = None

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.scope["headers"]:
            if k == name:
                return bytes(v)
        return None

    def query(self, allowed: frozenset[str]) -> dict[str, str]:
        """Query parameters; an unknown or repeated one is a 400 naming it."""
        if self._query is None:
            out: dict[str, str] = {}
            qs = self.scope.get("query_string", b"").decode("latin-1")
            for k, v in parse_qsl(qs, keep_blank_values=True, encoding="utf-8"):
                if k not in allowed:
                    raise ValidationError(f"unknown query parameter {k!r}", field=k)
                if k in out:
                    raise ValidationError(f"query parameter {k!r} is given twice", field=k)
                out[k] = v
            self._query = out
        return self._query

    async def body(self, limit: int) -> bytes:
        """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
        declared = self.header(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise ValidationError(
                    "Content-Length is not a number", field="content-length"
                ) from None
            if n > limit:
                raise BodyTooLarge(f"the body is {n} bytes; the limit is {limit} bytes")
        # Count streamed bytes too: a chunked body has no Content-Length to trust.
        chunks: list[bytes] = []
        total = 0
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone()
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(f"the body is over the limit of {limit} bytes")
            if chunk:
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def json_object(self, limit: int, optional: bool = False) -> dict[str, Any]:
        """The body as a JSON object; an empty body is ``{}`` when ``optional``."""
        raw = await self.body(limit)
        if not raw.strip():
            if optional:
                return {}
            raise ValidationError("the request body must be a JSON object", field="body")
        return decode_object(raw)


def decode_object(raw: bytes) -> dict[str, Any]:
    try:
        value = _decoder.decode(raw)
    except msgspec.DecodeError as e:
        raise ValidationError(f"malformed JSON: {e}", field="body") from None
    except RecursionError:
        raise ValidationError("malformed JSON: nested too deeply", field="body") from None
    except UnicodeDecodeError:
        raise ValidationError("malformed JSON: the body is not valid UTF-8", field="body") from None
    if not isinstance(value, dict):
        raise ValidationError(
            f"the request body must be a JSON object, got {_json_type(value)}", field="body"
        )
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"


def path_param(segments: list[str]) -> str:
    """A path parameter made of one or more raw segments, percent-decoded."""
    return "/".join(unquote(s) for s in segments)


def encode(body: Any) -> bytes:
    return _encoder.encode(body)


async def send_json(send: Send, status: int, body: Any, headers: Headers | None = None) -> None:
    data = _encoder.encode(body)
    hdrs: Headers = [CT_JSON, (b"content-length", str(len(data)).encode())]
    if headers:
        hdrs.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


def error_response(err: EngramError) -> tuple[int, dict[str, Any], Headers]:
    headers: Headers = []
    if isinstance(err, Unavailable):
        retry = max(0, math.ceil(err.retry_after))
        headers.append((b"retry-after", str(retry).encode()))
    elif isinstance(err, Unauthorized):
        headers.append((b"www-authenticate", b'Bearer realm="engram"'))
    elif isinstance(err, MethodNotAllowed):
        headers.append((b"allow", err.allow.encode()))
    return err.http_status, err.to_dict(), headers
