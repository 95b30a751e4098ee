"""An HTTP client of the engram server API (used by the CLI, tests and benchmarks).

Every error the server answers with is turned back into the ``EngramError`` subclass it came
from (by the body's ``error`` code, else by HTTP status), so a caller sees the same message and
exit code whether it talked to the server or opened the data dir itself.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from engram import errors
from engram.errors import (
    Conflict,
    EngramError,
    NotFound,
    RemoteError,
    Unavailable,
    UsageError,
    ValidationError,
)
from engram.format import stream as bstream
from engram.model import ExportStream

if TYPE_CHECKING:
    from engram.backup.archive import Sink

_BY_STATUS: dict[int, type[EngramError]] = {
    400: ValidationError,
    404: NotFound,
    409: Conflict,
    422: ValidationError,
    503: Unavailable,
}
_RESERVED = frozenset({"args", "code", "details", "exit_code", "http_status", "message"})


def _error_classes() -> dict[str, type[EngramError]]:
    """Every code of the shared error tree -> its class (the first class wins a shared code).

    Only ``engram.errors`` counts: adapters (the server) define private subclasses whose
    presence would otherwise depend on what happens to be imported.
    """
    out: dict[str, type[EngramError]] = {}
    todo: list[type[EngramError]] = [errors.EngramError]
    while todo:
        cls = todo.pop(0)
        if cls.__module__ == errors.__name__:
            out.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return out


def _rebuild(cls: type[EngramError], message: str, details: dict[str, Any]) -> EngramError:
    # Subclasses have different constructors; build through the base one and then set the
    # attributes the subclasses expose (field, retry_after, pid, url, ...), so callers can rely
    # on them exactly as for a locally raised error.
    err = cls.__new__(cls)
    EngramError.__init__(err, message, **details)
    for key, value in details.items():
        if key.isidentifier() and key not in _RESERVED:
            setattr(err, key, value)
    if isinstance(err, ValidationError) and "field" not in details:
        err.field = None
    if isinstance(err, Unavailable) and "retry_after" not in details:
        err.retry_after = 1.0
    return err


def error_from_response(status: int, body: bytes, headers: httpx.Headers, url: str) -> EngramError:
    """The ``EngramError`` a server error response stands for."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("error"), str):
        # Not an engram error body (a proxy, another service on the port, FastAPI's default).
        text = body.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
        detail = data.get("detail") if isinstance(data, dict) else None
        if status in (400, 422) and detail is not None:
            return ValidationError(f"the server refused the request: {detail}")
        return RemoteError(f"{url} answered HTTP {status}: {text or 'no body'}")
    code = data["error"]
    message = str(data.get("message") or f"HTTP {status}")
    details = {k: v for k, v in data.items() if k not in ("error", "message")}
    if status == 503 and "retry_after" not in details and headers.get("retry-after"):
        try:
            details["retry_after"] = float(headers["retry-after"])
        except ValueError:
            pass
    cls = _error_classes().get(code) or _BY_STATUS.get(status, RemoteError)
    return _rebuild(cls, message, details)


def local_url(url: str) -> str:
    """A URL a local client can connect to: a wildcard bind address becomes loopback."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    repl = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host)
    if repl is None:
        return url.rstrip("/")
    netloc = repl + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme or "http", netloc, parts.path, "", "")).rstrip("/")


def _seg(value: str) -> str:
    # Ids may contain '/', ':' and '@'; encode everything so an id is always one path segment.
    return quote(value, safe="")


ADMIN_PREFIX = "/v1/admin/"


class _BearerAuth(httpx.Auth):
    """The data token on every request, the admin token (when given) on /v1/admin ones.

    Chosen by the request's path, so every way of sending a request (plain, streamed) carries
    the right one, and the admin token is never sent to a data route.
    """

    def __init__(self, token: str | None, admin_token: str | None) -> None:
        self._data = f"Bearer {token}" if token else None
        self._admin = f"Bearer {admin_token}" if admin_token else self._data

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        value = self._admin if request.url.path.startswith(ADMIN_PREFIX) else self._data
        if value is not None:
            request.headers["Authorization"] = value
        yield request


def tls_context(cacert: str | Path | None) -> ssl.SSLContext:
    """How an HTTPS server's certificate is verified: against ``cacert`` (a PEM bundle, for a
    private CA) when given, else the system's trusted CAs. Verification is never turned off."""
    if cacert is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(cacert))
    except FileNotFoundError:
        raise UsageError(f"cannot read --cacert {cacert} (no such file)") from None
    except OSError as e:
        raise UsageError(f"cannot read --cacert {cacert} ({e.strerror})") from None
    except ssl.SSLError:
        raise UsageError(
            f"--cacert {cacert} holds no PEM certificate; give the CA's PEM file"
        ) from None


class EngramClient:
    """Synchronous client of one engram server; a context manager that closes its connections.

    ``token`` goes with every request, ``admin_token`` (when given) instead of it with admin
    requests. An https URL is verified against ``cacert`` or the system's trusted CAs.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        *,
        admin_token: str | None = None,
        cacert: str | Path | None = None,
    ) -> None:
        self.url = local_url(url)
        self.has_token = bool(token)
        self.has_admin_token = bool(admin_token)
        self.cacert = cacert
        self._http = httpx.Client(
            base_url=self.url,
            auth=_BearerAuth(token, admin_token),
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=transport,
            verify=tls_context(cacert) if self.url.startswith("https:") else True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EngramClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------

    def _unreachable(self, e: httpx.HTTPError) -> RemoteError:
        reason = str(e) or type(e).__name__
        if _is_certificate_error(e):
            where = f"--cacert {self.cacert}" if self.cacert else "the system's trusted CAs"
            return RemoteError(
                f"the engram server at {self.url} has a certificate that {where} does not "
                f"verify ({reason}); pass --cacert F (or set ENGRAM_CACERT) with the CA that "
                "signed it, and make sure it names this address"
            )
        return RemoteError(
            f"cannot reach the engram server at {self.url} ({reason}); "
            "check that it is running, or stop it and retry"
        )

    def _raise_for(self, resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        err = error_from_response(resp.status_code, resp.read(), resp.headers, self.url)
        if resp.status_code == 401:
            if resp.request.url.path.startswith(ADMIN_PREFIX):
                hint = (
                    "check the admin token"
                    if self.has_admin_token
                    else "pass --admin-token-file F or set ENGRAM_ADMIN_TOKEN if the server "
                    "has an admin token, else check the token"
                    if self.has_token
                    else "pass --admin-token-file F or --token-file F (or set "
                    "ENGRAM_ADMIN_TOKEN or ENGRAM_TOKEN)"
                )
            else:
                hint = (
                    "check the token"
                    if self.has_token
                    else "pass --token-file F or set ENGRAM_TOKEN"
                )
            err = RemoteError(f"{self.url} refused the request ({err.message}); {hint}")
        raise err

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        self._raise_for(resp)
        try:
            return resp.json()
        except ValueError:
            raise RemoteError(
                f"{self.url} answered {method} {path} with a body that is not JSON"
            ) from None

    # -- health --------------------------------------------------------------------------

    def live(self) -> dict[str, Any]:
        return dict(self.request("GET", "/health/live"))

    def ready(self) -> bool:
        try:
            resp = self._http.get("/health/ready")
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        return resp.status_code == 200

    # -- memories and edges --------------------------------------------------------------

    def create_memory(
        self,
        content: str,
        id: str | None = None,
        strength: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = {"content": content, "id": id, "strength": strength, "metadata": metadata}
        return dict(self.request("POST", "/v1/memories", json=_drop_none(body)))

    def get_memory(self, mid: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/memories/{_seg(mid)}"))

    def update_memory(self, mid: str, **changes: Any) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/v1/memories/{_seg(mid)}", json=_drop_none(changes)))

    def delete_memory(self, mid: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/v1/memories/{_seg(mid)}"))

    def activate(self, mid: str, boost: float | None = None) -> dict[str, Any]:
        body = {} if boost is None else {"boost": boost}
        return dict(self.request("POST", f"/v1/memories/{_seg(mid)}/activate", json=body))

    def create_edge(
        self, src: str, dst: str, kind: str | None = None, weight: float | None = None
    ) -> dict[str, Any]:
        body = {"src": src, "dst": dst, "kind": kind, "weight": weight}
        return dict(self.request("POST", "/v1/edges", json=_drop_none(body)))

    def delete_edge(self, src: str, dst: str, kind: str | None = None) -> dict[str, Any]:
        params = _drop_none({"src": src, "dst": dst, "kind": kind})
        return dict(self.request("DELETE", "/v1/edges", params=params))

    def neighbors(self, mid: str, direction: str = "both", depth: int = 1) -> dict[str, Any]:
        params = {"direction": direction, "depth": depth}
        return dict(self.request("GET", f"/v1/memories/{_seg(mid)}/neighbors", params=params))

    def recall(self, query: str, limit: int = 10) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/recall", params={"query": query, "limit": limit}))

    def stats(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/stats"))

    def batch(self, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/batch", json={"ops": ops}))

    def mark(self, name: str) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/mark", json={"name": name}))

    # -- operations (backups, quiesce, status) -------------------------------------------

    def backup(
        self,
        kind: str,
        output: str | None = None,
        since_s: float | None = None,
        since_lsn: int | None = None,
        priority: str | None = None,
        cpu_share: float | None = None,
        *,
        compression: str | None = None,
        start_by_lsn: int | None = None,
        parent: str | None = None,
        sink: Sink | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/admin/backup``. Without ``output`` the server streams the backup
        (docs/FORMAT.md "Backup stream"): its bytes go into ``sink``, its progress to
        ``progress(done, total)``, and its RESULT is returned (the caller checks the sink's size
        and sha256 against it). With ``output`` the server writes the file itself, inside one
        of its --backup-dir directories, and answers with the result as JSON."""
        body = _drop_none(
            {
                "kind": kind,
                "output": output,
                "since_s": since_s,
                "since_lsn": since_lsn,
                "priority": priority,
                "cpu_share": cpu_share,
                "compression": compression,
                "start_by_lsn": start_by_lsn,
                "parent": parent,
            }
        )
        if output is not None:
            return dict(self.request("POST", "/v1/admin/backup", json=body, timeout=None))
        if sink is None:
            raise ValueError("a streamed backup needs a sink")
        return self._backup_stream(body, sink, progress)

    def _backup_stream(
        self, body: dict[str, Any], sink: Sink, progress: Callable[[int, int], None] | None
    ) -> dict[str, Any]:
        """Read a backup stream into ``sink``: its RESULT, or the error it ends with. A stream
        that is cut off, malformed or not a backup stream at all is a RemoteError."""
        dec = bstream.Decoder()
        result: dict[str, Any] | None = None
        broke = f"the backup stream from {self.url}"
        try:
            # No read timeout: a low-priority backup may wait long for idle CPU between bytes.
            with self._http.stream(
                "POST", "/v1/admin/backup", json=body, timeout=httpx.Timeout(None, connect=5.0)
            ) as resp:
                self._raise_for(resp)
                ctype = resp.headers.get("content-type", "").encode()
                if not ctype.startswith(bstream.CONTENT_TYPE):
                    raise RemoteError(
                        f"{self.url} did not answer with a backup stream; upgrade the server"
                    )
                shown = _Progress(progress)
                for chunk in resp.iter_bytes():
                    for kind, payload in dec.feed(chunk):
                        if kind == bstream.DATA:
                            sink.write(payload)
                        elif kind == bstream.PROGRESS:
                            p = bstream.decode_json(payload, "progress")
                            shown.report(int(p.get("done", 0)), int(p.get("total", 0)))
                        elif kind == bstream.RESULT:
                            result = bstream.decode_json(payload, "result")
                            shown.finish(int(result.get("size") or 0))
                        else:
                            raise error_from_response(500, payload, resp.headers, self.url)
                dec.finish()
        except httpx.HTTPError as e:
            raise RemoteError(
                f"{broke} broke ({e or type(e).__name__}); run the backup again"
            ) from None
        except (bstream.StreamError, ValueError, TypeError) as e:
            raise RemoteError(f"{broke} is invalid ({e}); run the backup again") from None
        assert result is not None  # dec.finish() saw the last frame, and it was not an error
        return result

    def quiesce(self, timeout_s: float) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/admin/quiesce", json={"timeout_s": timeout_s}))

    def resume(self) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/admin/resume", json={}))

    def status(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/admin/status"))

    def export(self) -> ExportStream:
        """The ops of ``GET /v1/export``, streamed, with the LSN of the state they describe; a
        cut-off stream raises, never ends early.

        Lines end at b"\\n" only: a string may hold U+2028, U+2029 or U+0085, which text-mode
        line splitting (httpx ``iter_lines``) would also break on.
        """
        try:
            resp = self._http.send(
                self._http.build_request("GET", "/v1/export", timeout=None), stream=True
            )
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        try:
            self._raise_for(resp)
            lsn = int(resp.headers["x-engram-lsn"])
            digest = resp.headers.get("x-engram-digest", "")
        except (KeyError, ValueError):
            resp.close()
            raise RemoteError(
                f"{self.url} did not name the LSN of its export; upgrade the server"
            ) from None
        except BaseException:
            resp.close()
            raise

        def ops() -> Generator[dict[str, Any], None, None]:
            n = 0
            pending: list[bytes] = []
            try:
                for chunk in resp.iter_bytes():
                    pending.append(chunk)
                    if b"\n" not in chunk:
                        continue
                    *lines, rest = b"".join(pending).split(b"\n")
                    pending = [rest]
                    for line in lines:
                        n += 1
                        if not line.strip():
                            continue
                        try:
                            yield json.loads(line)
                        except ValueError:
                            raise RemoteError(
                                f"{self.url} sent a malformed export line {n}; retry the export"
                            ) from None
                if b"".join(pending).strip():
                    raise RemoteError(
                        f"the export stream from {self.url} ended inside line {n + 1}; "
                        "retry the export"
                    )
            except httpx.HTTPError as e:
                raise RemoteError(
                    f"the export stream from {self.url} broke ({e or type(e).__name__}); "
                    "retry the export"
                ) from None
            finally:
                resp.close()

        return ExportStream(lsn, digest, ops())


class _Progress:
    """What a progress callback is shown of a backup stream's PROGRESS frames: ``done`` never
    decreases and never exceeds ``total``, and the end is shown as ``(total, total)``.

    The server's total is its estimate (the bytes of the files it archives), while its done
    also counts the archive's own members, so done may pass total near the end; and frames are
    sent at most a few times a second, so the last one may be short of the end."""

    def __init__(self, callback: Callable[[int, int], None] | None) -> None:
        self.callback = callback
        self.done = 0
        self.total = 0

    def report(self, done: int, total: int) -> None:
        if self.callback is None:
            return
        self.total = max(total, self.total, 0)
        self.done = max(self.done, min(done, self.total) if self.total else done)
        self.callback(self.done, self.total)

    def finish(self, size: int) -> None:
        """The stream ended with its RESULT: all of it is done (``size``: the bytes received,
        the total when no PROGRESS frame came)."""
        if self.callback is None:
            return
        total = self.total or size
        self.done = self.total = total
        self.callback(total, total)


def _is_certificate_error(e: BaseException) -> bool:
    """True when ``e`` (or what caused it) is a failed verification of the server's certificate."""
    seen: BaseException | None = e
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(e)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}
