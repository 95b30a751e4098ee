"""Running the server: ``serve()`` owns the socket, the engine's lifecycle and shutdown.

Start-up order, and why:
1. Refuse what is refusable at once: a non-loopback bind without a token, a data dir that a live
   process already owns (named by its pid and URL).
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
import sys
import threading
from pathlib import Path
from typing import Any

from engram.errors import EngramError, UsageError
from engram.graph import Engine, EngineConfig
from engram.server.routes import EngramApp, create_app

__all__ = ["create_app", "serve", "is_loopback"]

log = logging.getLogger("engram.server")

DEFAULT_MAX_BODY = 16 << 20
BACKLOG = 2048


def serve(
    data_dir: Path,
    host: str,
    port: int,
    token: str | None,
    insecure: bool,
    engine_config: EngineConfig,
    max_body: int = DEFAULT_MAX_BODY,
    *,
    log_level: str = "warning",
    access_log: bool = False,
) -> None:
    """Serve ``data_dir`` on ``host:port`` until SIGTERM/SIGINT (blocking)."""
    import uvicorn  # imported here so that the CLI's other commands do not pay for it

    os.umask(0o077)  # every file and directory engram creates is private to its owner
    _setup_logging()
    if token is not None and not token.strip():
        raise UsageError("the token is empty; put a secret in the token file or ENGRAM_TOKEN")
    if not token and not insecure and not is_loopback(host):
        raise UsageError(
            f"refusing to serve on {host} without a token; pass --token-file F or set "
            "ENGRAM_TOKEN, or --insecure to serve without authentication"
        )
    if max_body < 1:
        raise UsageError("the body limit must be at least 1 byte")
    root = Path(data_dir)
    _refuse_if_owned(root)
    sock = _bind(host, port)
    url = _url(host, sock.getsockname()[1])
    app = create_app(None, token, max_body)
    config = uvicorn.Config(
        app,
        loop="uvloop" if _has("uvloop") else "asyncio",
        http="httptools" if _has("httptools") else "h11",
        lifespan="off",
        log_level=log_level,
        # uvicorn's access log line is client, method, path and status: never a header.
        access_log=access_log,
        server_header=False,
        backlog=BACKLOG,
        timeout_graceful_shutdown=30,
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
            eng = Engine.open(self.root, self.config, url=self.url, progress=self._progress)
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


def _url(host: str, port: int) -> str:
    """The URL a local client should use (a wildcard bind is reached through loopback)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"http://{host}:{port}"
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"


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
