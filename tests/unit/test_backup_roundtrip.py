"""Full backups restore to exactly the source (issue 3, "Tests that must exist").

A seeded random history of batches (create/update/activate/delete/link/unlink) runs on an Engine
with tiny log segments and checkpoints only when the test asks, so at some backups the warm tier
is behind the snapshot (W < S: the archive carries log records and fast-tier activations) and at
others it is not (W = S). At each backup point the source is exported (every memory field, every
edge) and its digest noted; the archive, restored into a fresh dir, must give back exactly that.
"""

from __future__ import annotations

import json
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engram.backup.full import full_backup
from engram.backup.restore import restore
from engram.backup.verify import verify_data_dir
from engram.graph import Engine, EngineConfig
from engram.oplog.reader import list_segments
from opgen import OpGen

# Checkpoints only when the test calls engine.checkpoint(); segments of a few KiB.
CFG = EngineConfig(segment_bytes=4096, checkpoint_interval=3600, checkpoint_ops=10**9)


def export(engine: Engine) -> tuple[dict[str, tuple], dict[tuple[str, str, str], tuple]]:
    """Every memory with all its fields, every edge, as plain comparable values."""
    mems = {m.id: msgspec.structs.astuple(m) for m in engine.iter_memories()}
    edges = {e.key(): msgspec.structs.astuple(e) for e in engine.iter_edges()}
    return mems, edges


def check_restored(archive: Path, to: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Restore ``archive`` into ``to`` and compare with the source as it was at the backup."""
    res = restore(archive, to)
    assert res.snapshot_lsn == expect["lsn"]
    assert res.digest == expect["digest"]
    assert res.sidecar_checked
    manifest = json.loads((to / "backup-manifest.json").read_text())
    eng = Engine.open(to, CFG, create=False)
    try:
        assert eng.last_lsn == expect["lsn"]
        assert eng.digest.hex == expect["digest"]
        assert eng.recompute_digest().hex == expect["digest"]
        mems, edges = export(eng)
        assert mems == expect["mems"]
        assert edges == expect["edges"]
        assert (eng.n_memories, eng.n_edges) == (len(mems), len(edges))
    finally:
        eng.close()
    rep = verify_data_dir(to, check_all=True)
    assert rep.ok, [p.to_dict() for p in rep.problems]
    return manifest


def _snapshot(engine: Engine) -> dict[str, Any]:
    mems, edges = export(engine)
    return {"lsn": engine.last_lsn, "digest": engine.digest.hex, "mems": mems, "edges": edges}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_round_trips_at_random_points_equal_the_source(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    gen = OpGen(rng)
    src = tmp_path / "src"
    backups = tmp_path / "backups"
    backups.mkdir()
    n_batches = 220
    points = set(rng.sample(range(10, n_batches), 6)) | {n_batches}
    seen_w_lt_s = seen_w_eq_s = seen_multi_segment = False
    exts = [".tar.zst", ".tar.gz"]
    eng = Engine.open(src, CFG)
    try:
        for i in range(1, n_batches + 1):
            eng.apply(gen.batch())
            if rng.random() < 0.08:
                eng.checkpoint()
            if i not in points:
                continue
            k = len(list(backups.glob("*.sha256")))
            if k % 3 == 1:
                eng.checkpoint()  # W = S for this one, whatever happened before
            expect = _snapshot(eng)
            ext = exts[k % 2]
            archive = backups / f"full-{i:04d}{ext}"
            res = full_backup(eng, archive)
            assert (res.snapshot_lsn, res.digest) == (expect["lsn"], expect["digest"])
            manifest = check_restored(archive, tmp_path / f"restored-{i}", expect)
            w, s = manifest["warm_lsn"], manifest["snapshot_lsn"]
            assert w <= s
            seen_w_lt_s |= w < s
            seen_w_eq_s |= w == s
            if w < s:
                # (W, S] spans segments of the source: the archive's one segment joins them.
                firsts = [f for f, _ in list_segments(src / "oplog")]
                seen_multi_segment |= sum(1 for f in firsts if w + 1 < f <= s) >= 1
                assert f"oplog/{w + 1:016x}.log" in manifest["files"]
            else:
                assert not any(n.startswith("oplog/") for n in manifest["files"])
            if ext == ".tar.gz":
                with tarfile.open(archive, "r:gz") as tf:
                    assert tf.getnames()[-1] == "manifest.json"
            shutil.rmtree(tmp_path / f"restored-{i}")
        assert len(list_segments(src / "oplog")) > 3
    finally:
        eng.close()
    assert seen_w_lt_s and seen_w_eq_s and seen_multi_segment


def test_both_compressions_at_one_point_restore_alike(tmp_path: Path) -> None:
    rng = random.Random(11)
    gen = OpGen(rng)
    eng = Engine.open(tmp_path / "src", CFG)
    try:
        for _ in range(80):
            eng.apply(gen.batch())
        expect = _snapshot(eng)
        zst, gz = tmp_path / "b.tar.zst", tmp_path / "b.tar.gz"
        full_backup(eng, zst)
        full_backup(eng, gz)
    finally:
        eng.close()
    m1 = check_restored(zst, tmp_path / "r1", expect)
    m2 = check_restored(gz, tmp_path / "r2", expect)
    assert m1["files"].keys() == m2["files"].keys()
    # The log segment's header has a timestamp; the warm files differ once the first backup's
    # release has checkpointed the WAL into the main file (same logical state, checked above).
    same = {n for n in m1["files"] if not n.startswith(("oplog/", "warm/"))}
    assert {n: m1["files"][n] for n in same} == {n: m2["files"][n] for n in same}
    assert zst.read_bytes()[:4] == b"\x28\xb5\x2f\xfd" and gz.read_bytes()[:2] == b"\x1f\x8b"


def test_empty_database_round_trips(tmp_path: Path) -> None:
    eng = Engine.open(tmp_path / "src", CFG)
    try:
        expect = _snapshot(eng)
        full_backup(eng, tmp_path / "empty.tar.zst")
    finally:
        eng.close()
    assert expect["lsn"] == 0 and not expect["mems"]
    check_restored(tmp_path / "empty.tar.zst", tmp_path / "r", expect)


def test_activations_held_only_in_the_fast_tier_are_in_the_backup(tmp_path: Path) -> None:
    eng = Engine.open(tmp_path / "src", CFG)
    try:
        eng.apply(
            [
                {"op": "create_memory", "id": f"a{i}", "content": f"hot {i}", "strength": 0.2}
                for i in range(20)
            ]
        )
        eng.checkpoint()  # the memories are in the warm tier; the activations below are not
        w = eng.last_lsn
        activated: dict[str, tuple[float, int]] = {}
        for rnd in range(3):
            for i in range(0, 20, 2 + rnd):
                r = eng.apply([{"op": "activate", "id": f"a{i}", "boost": 0.15}])
                activated[f"a{i}"] = (r.results[0]["strength"], 0)
        for mid in activated:
            m = eng.memory(mid)
            assert m.strength == activated[mid][0]
            activated[mid] = (m.strength, m.activation_count)
        # Held only in the fast tier: dirty there, the warm tier still has the old values.
        assert eng.fast.dirty_count == len(activated)
        assert eng.checkpoint_lsn == w
        for mid in activated:
            cold = eng.warm.get_memory(mid)
            assert cold is not None and (cold.strength, cold.activation_count) == (0.2, 0)
        expect = _snapshot(eng)
        full_backup(eng, tmp_path / "hot.tar.zst")
        assert eng.fast.dirty_count == len(activated)  # a backup does not checkpoint
    finally:
        eng.close()
    manifest = check_restored(tmp_path / "hot.tar.zst", tmp_path / "r", expect)
    assert manifest["warm_lsn"] == w < manifest["snapshot_lsn"]
    eng = Engine.open(tmp_path / "r", CFG, create=False)
    try:
        for mid, (strength, count) in activated.items():
            m = eng.memory(mid)
            assert (m.strength, m.activation_count) == (strength, count)
            assert count >= 1 and strength > 0.2
        assert eng.memory("a1").activation_count == 0
    finally:
        eng.close()


def test_restore_into_a_non_empty_dir_needs_force_and_keeps_the_old(tmp_path: Path) -> None:
    gen = OpGen(random.Random(5))
    eng = Engine.open(tmp_path / "src", CFG)
    try:
        for _ in range(30):
            eng.apply(gen.batch())
        expect = _snapshot(eng)
        full_backup(eng, tmp_path / "b.tar.zst")
    finally:
        eng.close()
    target = tmp_path / "t"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    from engram.errors import Refused

    with pytest.raises(Refused, match="--force"):
        restore(tmp_path / "b.tar.zst", target)
    assert sorted(p.name for p in target.iterdir()) == ["precious.txt"]
    res = restore(tmp_path / "b.tar.zst", target, force=True)
    assert res.moved_aside is not None
    assert (Path(res.moved_aside) / "precious.txt").read_text() == "keep me"
    eng = Engine.open(target, CFG, create=False)
    try:
        assert export(eng) == (expect["mems"], expect["edges"])
    finally:
        eng.close()
