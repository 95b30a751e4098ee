"""A real engram server in a subprocess, for integration tests and benchmarks: ``engram serve``,
the one way to start a server, run as ``python -m engram.cli serve``.

    with ServerProcess(data_dir, token="t") as srv:
        with srv.client() as c:
            c.post("/v1/memories", json={"content": "hi"})

The server binds 127.0.0.1 on port 0 (the kernel picks a free port, so parallel runs never race
for one); its URL is read back from ``engram.lock``, where the server records it.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from engram.datadir import read_owner

# Shared by the fixtures and the tests (tests import them from here, not from conftest: pytest
# re-imports every conftest.py as the module "conftest", so which one you get is not defined).
# `engram serve` in this Python, whatever is on PATH.
SERVE = [sys.executable, "-m", "engram.cli", "serve"]
TEST_TOKEN = "test-token-7f3a9c"  # a literal, so a test can grep the server log for it
SMALL_BODY = 64 * 1024


class ServerProcess:
    def __init__(
        self,
        data_dir: Path,
        *,
        token: str | None = None,
        token_via: str = "file",  # "file" (--token-file) or "env" (ENGRAM_TOKEN)
        host: str = "127.0.0.1",
        port: int = 0,
        max_body: int | None = None,
        durability: str | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        admin_token: str | None = None,
        tls: tuple[Path, Path] | None = None,  # (certificate chain, key), PEM files
        cacert: Path | None = None,  # what the test's clients verify the server against
        read_timeout: float | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.token = token
        self.admin_token = admin_token
        self.tls = tls
        self.cacert = cacert
        self.read_timeout = read_timeout
        self.token_via = token_via
        self.host = host
        self.port = port
        self.max_body = max_body
        self.durability = durability
        self.extra_args = extra_args
        self.env = env
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}.server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [*SERVE, "--data-dir", str(self.data_dir)]
        cmd += ["--host", self.host, "--port", str(self.port)]
        if self.token is not None and self.token_via == "file":
            tf = self.data_dir.parent / f"{self.data_dir.name}.token"
            tf.write_text(self.token + "\n")
            tf.chmod(0o600)
            cmd += ["--token-file", str(tf)]
        if self.admin_token is not None:
            af = self.data_dir.parent / f"{self.data_dir.name}.admin-token"
            af.write_text(self.admin_token + "\n")
            af.chmod(0o600)
            cmd += ["--admin-token-file", str(af)]
        if self.tls is not None:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        if self.read_timeout is not None:
            cmd += ["--read-timeout", str(self.read_timeout)]
        if self.max_body is not None:
            cmd += ["--max-body", str(self.max_body)]
        if self.durability is not None:
            cmd += ["--durability", self.durability]
        return cmd + list(self.extra_args)

    def start(self, wait: str | None = "ready", timeout: float = 30.0) -> ServerProcess:
        """Start the process; wait for "ready", "live", or nothing (None)."""
        env = dict(os.environ)
        env.pop("ENGRAM_TOKEN", None)
        env.pop("ENGRAM_ADMIN_TOKEN", None)
        if self.token is not None and self.token_via == "env":
            env["ENGRAM_TOKEN"] = self.token
        if self.env:
            env.update(self.env)
        self.url = None
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        finally:
            log.close()
        if wait is not None:
            self.wait_for(wait, timeout)
        return self

    def wait_for(self, what: str = "ready", timeout: float = 30.0) -> None:
        """Poll until /health/{what} is 200; fail with the server's log if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running()
            if self.url is None:
                self.url = self._discover_url()
            if self.url is not None:
                try:
                    r = httpx.get(f"{self.url}/health/{what}", timeout=2.0, verify=self.verify())
                    if r.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.02)
        raise TimeoutError(f"server not {what} after {timeout}s; log:\n{self.log()}")

    def _discover_url(self) -> str | None:
        if self.port:
            return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"
        owner = read_owner(self.data_dir)
        if owner and owner.get("pid") == self.pid and owner.get("url"):
            return str(owner["url"])
        return None

    def _check_running(self) -> None:
        assert self.proc is not None, "start() the server first"
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {self.proc.returncode} before it was up; log:\n{self.log()}"
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: final checkpoint) and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.url = None

    def kill(self) -> None:
        """SIGKILL: no shutdown path runs at all."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.url = None

    def __enter__(self) -> ServerProcess:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------------

    def headers(self, token: str | None = None) -> dict[str, str]:
        tok = token if token is not None else self.token
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    def verify(self) -> ssl.SSLContext | bool:
        """How the test's clients verify the server: against ``cacert`` when given."""
        return ssl.create_default_context(cafile=str(self.cacert)) if self.cacert else True

    def client(self, **kwargs: Any) -> httpx.Client:
        assert self.url is not None, "the server is not up"
        kwargs.setdefault("timeout", 30.0)
        kwargs.setdefault("verify", self.verify())
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        assert self.url is not None, "the server is not up"
        kwargs.setdefault("timeout", 30.0)
        kwargs.setdefault("verify", self.verify())
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return httpx.AsyncClient(base_url=self.url, headers=headers, **kwargs)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
