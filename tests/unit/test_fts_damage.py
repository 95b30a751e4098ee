"""Damage in the full-text index (memories_fts) that PRAGMA integrity_check cannot see: verify
--check-all and validation report it, a restore rebuilds it from the rows, `engram
rebuild-index` repairs a data dir, and a read that meets it is a CorruptData (503), never a raw
sqlite3 error, a TypeError or a 500."""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from engram.backup.full import full_backup
from engram.backup.restore import restore
from engram.backup.validate import validate_backup
from engram.backup.verify import FTS_LOCATION, rebuild_index, render_text, verify_data_dir
from engram.cli.main import app
from engram.errors import CorruptData, DataDirLocked
from engram.graph import Engine, EngineConfig
from engram.server import create_app
from engram.tiers.warm import WarmTier, index_problem

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
QUERIES = WORDS + [f"tag{i}" for i in range(0, 50, 3)]
CFG = EngineConfig(checkpoint_interval=3600)


def build(root: Path, n: int = 3000) -> None:
    rng = random.Random(11)
    with Engine.open(root, CFG) as eng:
        for i in range(0, n, 500):
            eng.apply(
                [
                    {
                        "op": "create_memory",
                        "id": f"m{j}",
                        "content": " ".join(rng.choice(WORDS) for _ in range(8)) + f" tag{j % 50}",
                    }
                    for j in range(i, i + 500)
                ]
            )


def warm_db(root: Path) -> Path:
    return root / "warm" / "engram.db"


def answers(db: Path) -> list[Any]:
    """Every query's matching ids, or the error a search raised, through a read-only tier."""
    warm = WarmTier(db, readonly=True)
    out: list[Any] = []
    try:
        for q in QUERIES:
            try:
                out.append(sorted(mid for mid, _ in warm.search(q, 10_000)))
            except CorruptData as e:
                out.append(e)
    finally:
        warm.close()
    return out


def integrity_ok(db: Path) -> bool:
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()


def fts_damaged(db: Path) -> bool:
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        return index_problem(conn, db, readonly=True) is not None
    finally:
        conn.close()


def damage_fts(root: Path, want: Callable[[list[Any], list[Any]], bool]) -> list[Any]:
    """Flip one bit in a memories_fts_data page (deterministic seed) such that integrity_check
    stays ok, FTS5's check fails and ``want(good answers, damaged answers)`` holds; returns the
    answers from before the damage."""
    db = warm_db(root)
    good = answers(db)
    clean = db.read_bytes()
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    pages = [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name='memories_fts_data'")]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    rng = random.Random(2)
    for _ in range(300):
        data = bytearray(clean)
        offset = (rng.choice(pages) - 1) * page_size + rng.randrange(page_size)
        data[offset] ^= 1 << rng.randrange(8)
        db.write_bytes(data)
        if integrity_ok(db) and fts_damaged(db) and want(good, answers(db)):
            return good
    raise AssertionError("no bit flip of the wanted kind found")


def silently_wrong(good: list[Any], bad: list[Any]) -> bool:
    return bad != good and not any(isinstance(a, Exception) for a in bad)


def search_fails(good: list[Any], bad: list[Any]) -> bool:
    return any(isinstance(a, CorruptData) for a in bad)


def files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    build(root)
    return root


def test_silent_index_damage_fails_check_all_and_nothing_is_written(store: Path) -> None:
    good = damage_fts(store, silently_wrong)
    assert answers(warm_db(store)) != good  # recall is wrong, and nothing says so
    before = files(store)
    quick = verify_data_dir(store)
    assert quick.ok, render_text(quick)  # quick mode leaves the index to --check-all
    rep = verify_data_dir(store, check_all=True)
    assert not rep.ok
    assert rep.checks["sqlite"].status == "fail"
    (p,) = [p for p in rep.problems if p.check == "sqlite"]  # integrity_check itself is ok
    assert p.location == FTS_LOCATION
    assert "does not match the memories rows" in p.message
    assert f"engram rebuild-index --data-dir {store}" in p.message
    assert all(c.status == "ok" for n, c in rep.checks.items() if n != "sqlite")
    assert files(store) == before  # read-only: no -wal, -shm or temp file in the data dir


def test_check_all_passes_a_sound_index(store: Path) -> None:
    rep = verify_data_dir(store, check_all=True)
    assert rep.ok, render_text(rep)
    assert rep.checks["sqlite"].detail == "integrity_check: ok, full-text index: ok"


def test_check_all_of_a_live_data_dir_checks_the_index(store: Path) -> None:
    damage_fts(store, silently_wrong)
    with Engine.open(store, CFG):  # owned: verify reads through the WAL in one transaction
        rep = verify_data_dir(store, check_all=True)
    assert rep.live
    assert [p.location for p in rep.problems] == [FTS_LOCATION]


def test_rebuild_index_repairs_a_stopped_data_dir(store: Path) -> None:
    good = damage_fts(store, silently_wrong)
    with Engine.open(store, CFG) as eng:
        digest = eng.digest.hex
        with pytest.raises(DataDirLocked):  # never under a running engine
            rebuild_index(store)
    r = CliRunner().invoke(app, ["rebuild-index", "--data-dir", str(store)])
    assert r.exit_code == 0, r.output
    assert "did not match them" in r.output and "3000 memories" in r.output
    assert answers(warm_db(store)) == good
    rep = verify_data_dir(store, check_all=True)
    assert rep.ok, render_text(rep)
    assert rep.digest_recomputed == digest  # the rows were not touched
    again = rebuild_index(store)
    assert again.problem is None and again.memories == 3000


def test_backup_with_a_damaged_index_fails_validation_and_restore_rebuilds_it(
    store: Path, tmp_path: Path
) -> None:
    good = damage_fts(store, silently_wrong)
    archive = tmp_path / "full.tar.zst"
    with Engine.open(store, CFG) as eng:
        full_backup(eng, archive)
    rep = validate_backup(archive, level=3, record=False, workdir=tmp_path)
    assert not rep.ok
    assert "full-text index" in (rep.reason or ""), rep.reason
    res = restore(archive, tmp_path / "restored")
    assert len(res.warnings) == 1 and "rebuilt from the rows" in res.warnings[0]
    assert answers(warm_db(tmp_path / "restored")) == good
    after = verify_data_dir(tmp_path / "restored", check_all=True)
    assert after.ok, render_text(after)


def test_restore_of_a_sound_backup_has_no_warning(store: Path, tmp_path: Path) -> None:
    archive = tmp_path / "full.tar.zst"
    with Engine.open(store, CFG) as eng:
        full_backup(eng, archive)
    assert restore(archive, tmp_path / "restored").warnings == []


def _get(eng: Engine, path: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(eng, None, 1024))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path)

    return asyncio.run(go())


def test_search_meeting_damage_is_corrupt_data_and_a_503(store: Path) -> None:
    damage_fts(store, search_fails)
    with Engine.open(store, CFG) as eng:
        for q in QUERIES:
            try:
                eng.warm.search(q, 100)
            except CorruptData as e:
                assert "the full-text index is damaged" in e.message
                assert "engram verify --check-all" in e.message
                break
        else:
            raise AssertionError("no query met the damage through the engine")
        r = _get(eng, f"/v1/recall?query={q}&limit=5")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["error"] == "corrupt_data"
    assert "the full-text index is damaged" in body["message"]


def test_a_null_bm25_is_corrupt_data_not_a_type_error(store: Path) -> None:
    # bm25 needs the index's row count and sizes: without the averages record it is NULL.
    conn = sqlite3.connect(warm_db(store))
    with conn:
        conn.execute("DELETE FROM memories_fts_data WHERE id = 1")
    conn.close()
    warm = WarmTier(warm_db(store), readonly=True)
    try:
        with pytest.raises(CorruptData, match="the full-text index is damaged"):
            warm.search("alpha", 10)
    finally:
        warm.close()


def test_reads_of_a_malformed_page_are_corrupt_data(store: Path) -> None:
    db = warm_db(store)
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    (page,) = conn.execute(
        "SELECT pageno FROM dbstat WHERE name='memories' AND pagetype='leaf' LIMIT 1"
    ).fetchone()
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    data[(page - 1) * page_size] = 0x42  # not a b-tree page type
    db.write_bytes(data)
    warm = WarmTier(db, readonly=True)
    try:
        with pytest.raises(CorruptData, match="engram verify --check-all"):
            list(warm.iter_memories())
        with pytest.raises(CorruptData, match="reading memories failed"):
            warm.get_memories(f"m{i}" for i in range(3000))
    finally:
        warm.close()
