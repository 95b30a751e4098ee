"""export -> import keeps every field (the digest is equal afterwards), and an export is one
state of the graph, at the LSN it names."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engram.cli.main import app
from engram.datadir import init_data_dir
from engram.graph import Engine, EngineConfig
from engram.model import effective_strength
from engram.query import export

runner = CliRunner()
DAY_NS = 86_400 * 10**9
HALF_LIFE = 7 * 86400.0  # the default the CLI opens data dirs with


def okj(*args: str) -> Any:
    res = runner.invoke(app, [*args, "--json"], env={"ENGRAM_TOKEN": None})
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return json.loads(res.stdout)


def build(root: Path) -> None:
    """A graph with what an export used to lose: old and decayed memories, activations (some
    only in the fast tier, not yet checkpointed), updates, metadata and edges of every age."""
    now = time.time_ns()
    with Engine.open(root, EngineConfig(checkpoint_interval=3600)) as e:
        e.apply([
            # 0.8 thirty days ago: about 0.04 now.
            {"op": "create_memory", "id": "faded", "content": "old news", "strength": 0.8,
             "created_at": now - 40 * DAY_NS, "updated_at": now - 30 * DAY_NS,
             "last_activated_at": now - 35 * DAY_NS, "activation_count": 3,
             "metadata": {"source": "diary", "tags": ["a", "b"], "n": 1.5}},
            {"op": "create_memory", "id": "fresh", "content": "today", "strength": 0.3},
            {"op": "create_memory", "id": "x/y:z", "content": "ünïcödé \u2028 line"},
            {"op": "create_edge", "src": "faded", "dst": "fresh", "weight": 0.25,
             "created_at": now - 20 * DAY_NS},
            {"op": "create_edge", "src": "fresh", "dst": "x/y:z", "kind": "causes",
             "weight": -2.0},
        ])
        e.checkpoint()
        for _ in range(3):
            e.apply([{"op": "activate", "id": "fresh", "boost": 0.2}])
        e.apply([{"op": "update_memory", "id": "x/y:z", "metadata": {"k": [1, {"v": None}]}}])
        e.apply([{"op": "create_edge", "src": "faded", "dst": "fresh", "weight": 0.75}])
        assert e.fast.dirty_count > 0  # activations the warm tier does not have yet


def test_export_import_keeps_every_field(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    build(src)
    f1, f2 = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    out = okj("export", "--data-dir", str(src), "--output", str(f1))
    before = okj("stats", "--data-dir", str(src))
    assert (out["lsn"], out["digest"]) == (before["lsn"], before["digest"])

    faded = json.loads(f1.read_text().splitlines()[0])
    assert faded["id"] == "faded" and faded["strength"] == 0.8 and faded["activation_count"] == 3

    init_data_dir(dst)  # import writes only into an initialized data dir
    okj("import", "--data-dir", str(dst), "--file", str(f1))
    after = okj("stats", "--data-dir", str(dst))
    assert after["digest"] == before["digest"]
    assert (after["memories"], after["edges"]) == (before["memories"], before["edges"])
    okj("export", "--data-dir", str(dst), "--output", str(f2))
    assert f2.read_bytes() == f1.read_bytes()

    # The decayed memory comes back decayed, not at its stored strength as of the import.
    now = time.time_ns()
    with Engine.open(src, readonly=True) as a, Engine.open(dst, readonly=True) as b:
        for mid in ("faded", "fresh", "x/y:z"):
            assert a.memory(mid) == b.memory(mid)
        s = effective_strength(b.memory("faded"), now, HALF_LIFE)
        assert s == pytest.approx(0.8 * 0.5 ** (30 / 7), rel=1e-3) and s < 0.05


def test_an_export_is_the_state_at_its_lsn(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600)) as e:
        e.apply([{"op": "create_memory", "id": f"m{i:04d}", "content": "x"} for i in range(2500)])
        e.apply([{"op": "create_edge", "src": f"m{i:04d}", "dst": f"m{i + 1:04d}"}
                 for i in range(0, 2499, 2)])
        lsn, digest = e.last_lsn, e.digest.hex
        want = {(m.id, m.strength) for m in e.iter_memories()}
        snap = export(e)
        assert (snap.lsn, snap.digest) == (lsn, digest)
        first = next(snap)
        # Writes after the export started: none of them shows in it.
        e.apply([{"op": "delete_memory", "id": "m0001"}])
        e.apply([{"op": "create_memory", "id": "m0000a", "content": "late"},
                 {"op": "create_edge", "src": "m0000a", "dst": "m2000"}])
        e.apply([{"op": "activate", "id": "m2400"}])
        ops = [first, *snap]
    mems = {(o["id"], o["strength"]) for o in ops if o["op"] == "create_memory"}
    edges = [(o["src"], o["dst"]) for o in ops if o["op"] == "create_edge"]
    assert mems == want
    assert len(edges) == 1250 and ("m0000", "m0001") in edges
    ids = {mid for mid, _ in mems}
    assert all(s in ids and d in ids for s, d in edges)


def _open_files(name: str) -> int:
    fd_dir = Path("/proc/self/fd")
    n = 0
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(fd_dir / fd).endswith(name):
                n += 1
        except OSError:
            pass
    return n


def wal_fully_checkpointable(e: Engine) -> bool:
    """Commit, then copy the WAL into the database: every frame can be copied unless a reader
    still holds an older snapshot."""
    with e.lock:
        e.checkpoint()
        busy, frames, copied = e.warm.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return bool(busy == 0 and frames == copied)


def test_an_unfinished_export_blocks_no_writer_and_is_released_on_close(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "d", EngineConfig(checkpoint_interval=3600)) as e:
        e.apply([{"op": "create_memory", "id": f"m{i:05d}", "content": "x"} for i in range(3000)])
        baseline = _open_files("warm/engram.db")
        snap = export(e)
        next(snap)
        assert _open_files("warm/engram.db") == baseline + 1  # its own read connection
        t0 = time.monotonic()
        for i in range(200):  # writes and checkpoints go on while the export is open
            e.apply([{"op": "create_memory", "id": f"w{i}", "content": "y"}])
            if i % 50 == 0:
                assert e.checkpoint() == e.last_lsn
        assert time.monotonic() - t0 < 10
        assert not wal_fully_checkpointable(e)  # the export's snapshot is still pinned
        snap.close()
        assert wal_fully_checkpointable(e)
        # Read to the end, a stream releases its snapshot by itself.
        done = list(export(e))
        e.apply([{"op": "create_memory", "id": "after", "content": "z"}])
        assert len(done) == 3200 and wal_fully_checkpointable(e)
