"""The full-text index is kept by WarmTier, not by triggers: it must match the content exactly
after every kind of write, write-back, replay (batched and single) and restore."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from engram import query
from engram.graph import Engine, EngineConfig


def _fts_ok(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        # FTS5's own check of an external-content index against its content table.
        conn.execute("INSERT INTO memories_fts(memories_fts, rank) VALUES ('integrity-check', 1)")
    finally:
        conn.close()


def _rows(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT rowid, * FROM memories ORDER BY rowid").fetchall()
    finally:
        conn.close()


def _ops(rng: random.Random, ids: list[str], n: int) -> list[dict]:
    out: list[dict] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35 or not ids:
            mid = f"m{rng.randrange(10**6)}"
            ids.append(mid)
            out.append({"op": "create_memory", "id": mid, "content": f"alpha {rng.random()}"})
        elif r < 0.6:
            out.append({"op": "update_memory", "id": rng.choice(ids), "content": f"beta {r}"})
        elif r < 0.85:
            out.append({"op": "activate", "id": rng.choice(ids)})
        else:
            out.append({"op": "delete_memory", "id": ids.pop(rng.randrange(len(ids)))})
    return out


def test_index_matches_content_live_and_after_batched_replay(tmp_path: Path) -> None:
    rng = random.Random(5)
    ids: list[str] = []
    cfg = EngineConfig(checkpoint_interval=3600, checkpoint_ops=10**9, fast_tier_bytes=4000)
    e = Engine.open(tmp_path / "d", cfg)
    for _ in range(60):
        batch = _ops(rng, ids, rng.randint(1, 40))
        # A batch may name one id twice (create, then update): a replayed run keeps the id
        # once, where it first appears, with its last image.
        try:
            e.apply(batch)
        except Exception:
            for op in batch:
                try:
                    e.apply([op])
                except Exception:
                    pass
    live = query.recall(e, "alpha OR beta", 1000)
    e.checkpoint()
    _fts_ok(tmp_path / "d" / "warm" / "engram.db")
    rows = _rows(tmp_path / "d" / "warm" / "engram.db")
    # Replay from scratch: a copy of the log onto an empty warm tier (batched upserts).
    e.close()
    (tmp_path / "d" / "warm" / "engram.db").unlink()
    for extra in ("engram.db-wal", "engram.db-shm"):
        (tmp_path / "d" / "warm" / extra).unlink(missing_ok=True)
    e = Engine.open(tmp_path / "d", cfg)
    assert e.recompute_digest().hex == e.digest.hex
    assert {m["id"] for m in query.recall(e, "alpha OR beta", 1000)} == {m["id"] for m in live}
    e.close()
    _fts_ok(tmp_path / "d" / "warm" / "engram.db")
    # The same rows under the same rowids (the index refers to rows by rowid).
    assert _rows(tmp_path / "d" / "warm" / "engram.db") == rows
