"""A process to kill: opens an Engine on a data dir, applies ops, prints what was acknowledged.

Used by the crash tests (tests/unit/test_recovery.py, tests/unit/test_model_property.py), which
SIGKILL it at some point and then check that the reopened data dir holds every acknowledged op.

    python tests/crashdriver.py DATA_DIR [--config JSON]
        Reads one batch per stdin line (a JSON list of ops, as in POST /v1/batch), applies it with
        ``engine.apply`` (durable before it returns) and prints one JSON line per batch:
        {"i": n, "ok": true, "lsn": ..., "digest": ..., "results": [...]} or
        {"i": n, "ok": false, "error": code, "index": ..., "message": ...}.
    python tests/crashdriver.py DATA_DIR --threads T --count N [--config JSON]
        T threads each create memories "t<T>-<n>" (n < N), linking each to the previous one,
        and print {"ack": id, "lsn": ...} after each acknowledged write.

The first line is {"ready": true, "lsn": ..., "digest": ...} once recovery is done. Every line is
written with one write() and flushed, so a line that was read whole was acknowledged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from engram.errors import EngramError
from engram.graph import Engine, EngineConfig

_out_lock = threading.Lock()


def emit(obj: dict) -> None:
    line = (json.dumps(obj) + "\n").encode()
    with _out_lock:
        os.write(1, line)


def serial(eng: Engine) -> None:
    for i, line in enumerate(sys.stdin):
        ops = json.loads(line)
        try:
            res = eng.apply(ops)
        except EngramError as e:
            emit({"i": i, "ok": False, "error": e.code, "index": e.details.get("index"),
                  "message": e.message})
            continue
        emit({"i": i, "ok": True, "lsn": res.lsn, "digest": eng.digest.hex,
              "results": res.results})


def concurrent(eng: Engine, threads: int, count: int) -> None:
    def worker(t: int) -> None:
        for n in range(count):
            mid = f"t{t}-{n}"
            ops: list[dict] = [{"op": "create_memory", "id": mid, "content": f"thread {t} #{n}"}]
            if n:
                ops.append({"op": "create_edge", "src": mid, "dst": f"t{t}-{n - 1}"})
            res = eng.apply(ops)
            emit({"ack": mid, "lsn": res.lsn})

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()


class Driver:
    """The test side: start the driver on ``root``, feed it batches, SIGKILL it."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        config: dict | None = None,
        threads: int = 0,
        count: int = 0,
    ) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), str(root),
               "--config", json.dumps(config or {})]
        if threads:
            cmd += ["--threads", str(threads), "--count", str(count)]
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr
        )
        self.sent = 0

    def _fail(self, what: str) -> AssertionError:
        self.proc.kill()
        self.proc.wait()
        self.stderr.seek(0)
        err = self.stderr.read().decode(errors="replace")
        return AssertionError(f"crashdriver {what}; stderr:\n{err}")

    def line(self) -> dict:
        assert self.proc.stdout is not None
        raw = self.proc.stdout.readline()
        if not raw.endswith(b"\n"):
            raise self._fail("stopped early")
        return json.loads(raw)

    def ready(self) -> dict:
        msg = self.line()
        if not msg.get("ready"):
            raise self._fail(f"said {msg} instead of ready")
        return msg

    def send(self, ops: list[dict]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(ops) + "\n").encode())
        self.proc.stdin.flush()
        self.sent += 1

    def call(self, ops: list[dict]) -> dict:
        self.send(ops)
        return self.line()

    def kill(self) -> list[dict]:
        """SIGKILL now; returns the whole lines it had written that were not read yet."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        assert self.proc.stdout is not None
        rest = self.proc.stdout.read()
        self.proc.wait()
        self._close()
        return [json.loads(x) for x in rest.split(b"\n")[:-1] if x]  # last: partial or empty

    def finish(self) -> list[dict]:
        """Close stdin and let it shut down cleanly; returns its remaining lines."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        rest = self.proc.stdout.read()
        if self.proc.wait() != 0:
            raise self._fail(f"exited with {self.proc.returncode}")
        self._close()
        return [json.loads(x) for x in rest.split(b"\n") if x]

    def _close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self.stderr.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("--config", default="{}", help="EngineConfig fields as JSON")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--count", type=int, default=0)
    args = ap.parse_args()
    eng = Engine.open(args.data_dir, EngineConfig(**json.loads(args.config)))
    emit({"ready": True, "lsn": eng.last_lsn, "digest": eng.digest.hex})
    if args.threads:
        concurrent(eng, args.threads, args.count)
    else:
        serial(eng)
    eng.close()
    emit({"closed": True, "lsn": eng.last_lsn})
    return 0


if __name__ == "__main__":
    sys.exit(main())
