"""kill -9 during concurrent writes loses no acknowledged write (issue 2, "Done when").

Sixteen writer threads create memories (and every few requests a batch of two memories and an
edge), recording each write the server acknowledged. The server is SIGKILLed mid-stream,
restarted on the same data dir, and every acknowledged memory and edge must be there. Then, with
the server stopped, the maintained digest must equal one recomputed from the stored graph.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from serverproc import ServerProcess

from engram.graph import Engine

WRITERS = 16
KILL_AFTER_ACKS = 300  # per round; the kill lands while all writers are still going


class Acked:
    """What the server acknowledged, across rounds (thread-safe)."""

    def __init__(self) -> None:
        self.mu = threading.Lock()
        self.memories: set[str] = set()
        self.edges: set[tuple[str, str]] = set()
        self.count = 0

    def add(self, memories: Iterable[str], edges: Iterable[tuple[str, str]] = ()) -> None:
        with self.mu:
            self.memories.update(memories)
            self.edges.update(edges)
            self.count += 1


def writer(srv: ServerProcess, round_no: int, w: int, acked: Acked, stop: threading.Event) -> None:
    with httpx.Client(base_url=srv.url or "", timeout=10.0) as c:
        i = 0
        while not stop.is_set():
            i += 1
            base = f"r{round_no}-w{w}-{i}"
            try:
                if i % 5 == 0:
                    a, b = f"{base}-a", f"{base}-b"
                    ops = [
                        {"op": "create_memory", "id": a, "content": f"batch {base} first"},
                        {"op": "create_memory", "id": b, "content": f"batch {base} second"},
                        {"op": "create_edge", "src": a, "dst": b},
                        {"op": "activate", "id": a},
                    ]
                    r = c.post("/v1/batch", json={"ops": ops})
                    if r.status_code == 200:
                        acked.add([a, b], [(a, b)])
                else:
                    r = c.post("/v1/memories", json={"id": base, "content": f"memory {base}"})
                    if r.status_code == 201:
                        acked.add([base])
            except httpx.TransportError:
                return  # the server is gone: this request was never acknowledged
            assert r.status_code in (200, 201), r.text


def crash_rounds(tmp_path: Path, rounds: int) -> None:
    data = tmp_path / "data"
    srv = ServerProcess(data)
    acked = Acked()
    try:
        for round_no in range(rounds):
            srv.start()
            stop = threading.Event()
            threads = [
                threading.Thread(target=writer, args=(srv, round_no, w, acked, stop))
                for w in range(WRITERS)
            ]
            target = acked.count + KILL_AFTER_ACKS
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while acked.count < target and time.monotonic() < deadline:
                time.sleep(0.005)
            srv.kill()  # SIGKILL while the writers are mid-request
            stop.set()
            for t in threads:
                t.join(30)
            assert acked.count >= target, "the writers stalled before the kill"

            srv.start()  # recovery on the same dir
            check_everything_acked_is_there(srv, acked)
            assert srv.stop() == 0

            eng = Engine.open(data)
            try:
                assert eng.recompute_digest().hex == eng.digest.hex
            finally:
                eng.close()
    finally:
        srv.kill()


def check_everything_acked_is_there(srv: ServerProcess, acked: Acked) -> None:
    with srv.client() as c:
        r = c.get("/v1/export")
        assert r.status_code == 200
        mems: set[str] = set()
        edges: set[tuple[str, str]] = set()
        for line in r.content.splitlines():
            op: dict[str, Any] = msgspec.json.decode(line)
            if op["op"] == "create_memory":
                mems.add(op["id"])
            else:
                edges.add((op["src"], op["dst"]))
        lost = acked.memories - mems
        assert not lost, f"{len(lost)} acknowledged memories lost, e.g. {sorted(lost)[:5]}"
        lost_edges = acked.edges - edges
        assert not lost_edges, f"{len(lost_edges)} acknowledged edges lost"
        # And through the per-memory route, for a sample.
        for mid in sorted(acked.memories)[:: max(1, len(acked.memories) // 50)]:
            assert c.get(f"/v1/memories/{mid}").status_code == 200


def test_kill9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    crash_rounds(tmp_path, rounds=3)


@pytest.mark.slow
def test_kill9_loop(tmp_path: Path) -> None:
    crash_rounds(tmp_path, rounds=20)
