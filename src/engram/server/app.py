"""Running the server: ``serve()`` owns the socket, the engine's lifecycle and shutdown.

Start-up order, and why:
1. Refuse what is refusable at once: a non-loopback bind without a token or without TLS (unless
   ``insecure``), an unreadable certificate or key, a data dir that a live process already owns
   (named by its pid and URL).
2. Bind the socket, so /health/live answers while recovery runs (recovery can take minutes on a
   large log; an orchestrator must not kill a process that is making progress).
3. Open the engine in a background thread; until it is open /health/ready and every /v1 route
   answer 503 with a reason. If it fails to open, the server stops and ``serve`` raises the
   engine's one-line error.
4. SIGTERM/SIGINT: stop accepting, finish in-flight requests, then ``Engine.close()`` (final
   checkpoint, lock released).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engram.errors import EngramError, UsageError
from engram.graph import Engine, EngineConfig
from engram.server.protocol import DEFAULT_READ_TIMEOUT
from engram.server.routes import EngramApp, create_app

__all__ = ["create_app", "serve", "is_loopback", "TLS", "DEFAULT_READ_TIMEOUT"]

log = logging.getLogger("engram.server")

DEFAULT_MAX_BODY = 16 << 20
BACKLOG = 2048
KEEP_ALIVE = 5.0
# A read timeout above this is no protection against a client that holds connections open.
MAX_READ_TIMEOUT = 3600.0


class TLS:
    """A certificate chain and its private key (PEM files), checked when made."""

    @classmethod
    def from_options(cls, cert: Path | None, key: Path | None) -> TLS | None:
        """From --tls-cert and --tls-key, which go together; None when neither is given."""
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise UsageError("--tls-cert and --tls-key go together; give both, or neither")
        return cls(cert, key)

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = Path(cert), Path(key)
        for option, path in (("--tls-cert", self.cert), ("--tls-key", self.key)):
            try:
                path.read_bytes()
            except OSError as e:
                raise UsageError(f"cannot read {option} {path} ({e.strerror})") from None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key)
        except ssl.SSLError as e:
            raise UsageError(
                f"--tls-cert {self.cert} and --tls-key {self.key} are not a PEM certificate "
                f"chain and its private key ({e.reason or e}); check both files"
            ) from None


def check_serving_options(
    host: str,
    token: str | None,
    admin_token: str | None,
    tls: TLS | None,
    insecure: bool,
    read_timeout: float,
) -> None:
    """Refuse options that would serve something unprotected or unbounded (UsageError)."""
    for what, value in (("token", token), ("admin token", admin_token)):
        if value is not None and not value.strip():
            raise UsageError(f"the {what} is empty; put a secret in its file or variable")
    if admin_token is not None and admin_token == token:
        raise UsageError(
            "the admin token is the data token; give admin routes a secret of their own"
        )
    if not insecure and not is_loopback(host):
        if not token:
            raise UsageError(
                f"refusing to serve on {host} without a token; pass --token-file F or set "
                "ENGRAM_TOKEN, or --insecure to serve without authentication"
            )
        if tls is None:
            raise UsageError(
                f"refusing to serve on {host} without TLS (the token would cross the network "
                "in clear); pass --tls-cert F --tls-key F, or --insecure"
            )
    if not 0 < read_timeout <= MAX_READ_TIMEOUT:
        raise UsageError(
            f"--read-timeout must be more than 0 and at most {MAX_READ_TIMEOUT:g} seconds"
        )


def serve(
    data_dir: Path,
    host: str,
    port: int,
    token: str | None,
    insecure: bool,
    engine_config: EngineConfig,
    max_body: int = DEFAULT_MAX_BODY,
    *,
    admin_token: str | None = None,
    tls: TLS | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    backup_dirs: Sequence[Path] = (),
    log_level: str = "warning",
    access_log: bool = False,
) -> None:
    """Serve ``data_dir`` on ``host:port`` until SIGTERM/SIGINT (blocking).

    ``backup_dirs``: the only directories the server writes backups into itself (the
    ``output`` of ``POST /v1/admin/backup``); without them it only streams backups.

    ``token`` guards the data routes, ``admin_token`` (when given) the ``/v1/admin`` routes,
    which otherwise take ``token``; ``tls`` serves HTTPS.
    """
    import uvicorn  # imported here so that the CLI's other commands do not pay for it

    from engram.server.protocol import ReadTimeoutProtocol

    os.umask(0o077)  # every file and directory engram creates is private to its owner
    _setup_logging()
    check_serving_options(host, token, admin_token, tls, insecure, read_timeout)
    if max_body < 1:
        raise UsageError("the body limit must be at least 1 byte")
    root = Path(data_dir)
    _refuse_if_owned(root)
    sock = _bind(host, port)
    url = _url(host, sock.getsockname()[1], https=tls is not None)
    app = create_app(None, token, max_body, admin_token=admin_token)
    app.backup_dirs = _backup_dirs(backup_dirs)
    config = uvicorn.Config(
        app,
        loop="uvloop" if _has("uvloop") else "asyncio",
        http=ReadTimeoutProtocol.with_timeout(read_timeout),
        lifespan="off",
        log_level=log_level,
        # uvicorn's access log line is client, method, path and status: never a header.
        access_log=access_log,
        server_header=False,
        backlog=BACKLOG,
        timeout_graceful_shutdown=30,
        # An idle kept-alive connection is closed after KEEP_ALIVE, or the read timeout if shorter.
        timeout_keep_alive=max(1, round(min(read_timeout, KEEP_ALIVE))),
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
    )
    server = uvicorn.Server(config)
    opener = _Opener(root, engine_config, url, app, server)
    log.info("listening on %s (data dir %s); opening the database", url, root)
    previous = _absorb_exit_signals(server)
    try:
        opener.start()
        server.run(sockets=[sock])
    finally:
        try:
            eng = opener.stop()
            if eng is not None:
                eng.close()
                log.info("stopped; the database is closed")
        finally:
            sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if opener.error is not None:
        raise opener.error



def _backup_dirs(dirs: Sequence[Path]) -> tuple[Path, ...]:
    """The --backup-dir directories, resolved; each must exist."""
    out = []
    for d in dirs:
        real = Path(os.path.realpath(d))
        if not real.is_dir():
            raise UsageError(f"--backup-dir {d} is not a directory; create it first")
        out.append(real)
    return tuple(out)

class _Stopped(BaseException):
    """Raised inside recovery (via its progress callback) when the server is asked to stop."""


class _Opener(threading.Thread):
    """Opens (recovers) the engine off the main thread and hands it to the app."""

    def __init__(
        self, root: Path, config: EngineConfig, url: str, app: EngramApp, server: Any
    ) -> None:
        super().__init__(name="engram-open", daemon=True)
        self.root, self.config, self.url, self.app, self.server = root, config, url, app, server
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self._mu = threading.Lock()
        self._stopping = False

    def run(self) -> None:
        try:
            eng = Engine.open(
                self.root, self.config, url=self.url, progress=self._progress, verify_pending=True
            )
        except _Stopped:
            log.info("recovery stopped for shutdown; it resumes where it left off on next start")
            return
        except BaseException as e:  # reported by serve() once the server has stopped
            self.error = e
            self.app.startup_error = str(e)
            self.server.should_exit = True
            return
        with self._mu:
            if not self._stopping:
                self.engine = self.app.engine = eng
                log.info("ready at LSN %d", eng.last_lsn)
                return
        eng.close()

    def _progress(self, replayed: int, lsn: int) -> None:
        if self._stopping:
            raise _Stopped()
        self.app.progress = (replayed, lsn)

    def stop(self) -> Engine | None:
        """Abort a recovery still running; the engine, if it was opened, for the caller to close."""
        with self._mu:
            self._stopping = True
        if self.ident is not None:  # started
            self.join()
        self.app.engine = None
        return self.engine


def _refuse_if_owned(root: Path) -> None:
    """Fail fast, before binding, when a live process owns the data dir (DataDirLocked)."""
    if not (root / "engram.lock").exists():
        return
    from engram.datadir import DirLock

    probe = DirLock(root)
    probe.acquire()  # raises DataDirLocked naming the owner's pid and URL
    probe.release()


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve --host {host} ({e.strerror}); pass an address") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        # Listen now: connections made while the engine opens queue instead of being refused.
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise EngramError(
            f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or stop the "
            "process using it"
        ) from None
    return sock


def _url(host: str, port: int, https: bool = False) -> str:
    """The URL a local client should use (a wildcard bind is reached through loopback)."""
    scheme = "https" if https else "http"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"{scheme}://{host}:{port}"
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"{scheme}://[{ip}]:{port}" if ip.version == 6 else f"{scheme}://{ip}:{port}"


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _absorb_exit_signals(server: Any) -> dict[int, Any]:
    """Route SIGINT/SIGTERM to a graceful stop, also outside uvicorn's own handling.

    uvicorn handles them while it runs and re-raises them once it has stopped; by then the
    engine still has to be closed, so the re-raised signal must not kill the process. Returns
    the previous handlers, restored when serve() ends.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(sig: int, frame: object) -> None:
        server.should_exit = True

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}


def _setup_logging() -> None:
    """Recovery progress and errors reach stderr unless the caller configured logging."""
    eng_log = logging.getLogger("engram")
    if eng_log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    eng_log.addHandler(handler)
    eng_log.setLevel(logging.INFO)
