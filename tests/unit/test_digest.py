"""The logical digest (O7): order independent, maintained per op, equal to a recomputation."""

from __future__ import annotations

import random
import tempfile
from functools import partial
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram import digest as dg
from engram.errors import EngramError
from engram.graph import Engine, EngineConfig
from engram.model import Edge, Memory
from engram.procs import Resources


def mem(mid: str, **kw: object) -> Memory:
    base = dict(content=f"c {mid}", strength=0.5, metadata={"a": 1, "b": [1, 2]}, created_at=1,
                updated_at=2, last_activated_at=0, activation_count=0)
    base.update(kw)
    return Memory(mid, **base)  # type: ignore[arg-type]


ITEMS: list[Memory | Edge] = [mem(f"m{i}") for i in range(20)] + [
    Edge(f"m{i}", f"m{i + 1}", "related", 1.0, 5) for i in range(19)
]


def test_order_independent() -> None:
    a = dg.compute(ITEMS)
    rng = random.Random(7)
    for _ in range(5):
        items = ITEMS[:]
        rng.shuffle(items)
        assert dg.compute(items) == a
    assert dg.compute(reversed(ITEMS)).hex == a.hex


def test_incremental_equals_compute_and_removal_undoes() -> None:
    d = dg.Digest()
    for it in ITEMS:
        d.replace(None, it)
    assert d == dg.compute(ITEMS)
    for it in reversed(ITEMS):
        d.replace(it, None)
    assert d.hex == dg.EMPTY == "0" * 64


def test_replace_is_remove_plus_add() -> None:
    d = dg.compute(ITEMS)
    new = mem("m3", strength=0.9)
    d.replace(ITEMS[3], new)
    assert d == dg.compute([*ITEMS[:3], new, *ITEMS[4:]])


def test_every_field_counts() -> None:
    base = mem("x")
    variants = [
        mem("y"), mem("x", content="other"), mem("x", strength=0.50001),
        mem("x", metadata={"a": 1}), mem("x", created_at=9), mem("x", updated_at=9),
        mem("x", last_activated_at=9), mem("x", activation_count=1),
    ]
    hashes = {dg.memory_hash(v) for v in variants}
    assert dg.memory_hash(base) not in hashes and len(hashes) == len(variants)
    e = Edge("a", "b", "k", 1.0, 1)
    others = [Edge("b", "a", "k", 1.0, 1), Edge("a", "b", "j", 1.0, 1), Edge("a", "b", "k", 2.0, 1),
              Edge("a", "b", "k", 1.0, 2)]
    assert dg.edge_hash(e) not in {dg.edge_hash(o) for o in others}


def test_metadata_key_order_does_not_matter() -> None:
    a = mem("x", metadata={"a": 1, "b": {"c": 1, "d": 2}})
    b = mem("x", metadata={"b": {"d": 2, "c": 1}, "a": 1})
    assert dg.memory_hash(a) == dg.memory_hash(b)


def test_hex_round_trip_and_wraparound() -> None:
    d = dg.Digest(dg.MOD - 1)
    assert len(d.hex) == 64 and dg.Digest.from_hex(d.hex) == d
    d.replace(None, ITEMS[0])
    d.replace(ITEMS[0], None)
    assert d.value == dg.MOD - 1
    assert dg.Digest(dg.MOD + 5).value == 5
    c = d.copy()
    c.replace(None, ITEMS[1])
    assert c != d


# -- maintained == recomputed, on a real engine ------------------------------------------------

IDS = ["a", "b", "c", "d"]
op_strategy = st.one_of(
    st.fixed_dictionaries({"op": st.just("create_memory"), "id": st.sampled_from(IDS),
                           "content": st.text(max_size=8)},
                          optional={"strength": st.floats(0, 1),
                                    "metadata": st.dictionaries(st.text(max_size=3),
                                                                st.integers(-5, 5), max_size=2)}),
    st.fixed_dictionaries({"op": st.just("update_memory"), "id": st.sampled_from(IDS)},
                          optional={"content": st.text(max_size=8), "strength": st.floats(0, 1)}),
    st.fixed_dictionaries({"op": st.just("activate"), "id": st.sampled_from(IDS)},
                          optional={"boost": st.floats(0, 1)}),
    st.fixed_dictionaries({"op": st.just("delete_memory"), "id": st.sampled_from(IDS)}),
    st.fixed_dictionaries({"op": st.just("create_edge"), "src": st.sampled_from(IDS),
                           "dst": st.sampled_from(IDS)},
                          optional={"kind": st.sampled_from(["related", "k"]),
                                    "weight": st.floats(allow_nan=False, allow_infinity=False)}),
    st.fixed_dictionaries({"op": st.just("delete_edge"), "src": st.sampled_from(IDS),
                           "dst": st.sampled_from(IDS)},
                          optional={"kind": st.sampled_from(["related", "k"])}),
    st.fixed_dictionaries({"op": st.just("mark"), "name": st.sampled_from(["p1", "p2"])}),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(op_strategy, min_size=1, max_size=3), min_size=1, max_size=25),
    fast_bytes=st.sampled_from([0, 500, 1 << 20]),
    half_life=st.sampled_from([0.0, 1e-3, 86400.0]),
)
def test_maintained_digest_equals_recomputed(
    batches: list[list[dict]], fast_bytes: int, half_life: float
) -> None:
    cfg = EngineConfig(fast_tier_bytes=fast_bytes, half_life_s=half_life, checkpoint_ops=7,
                       segment_bytes=2048, checkpoint_interval=3600)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "d"
        eng = Engine.open(root, cfg)
        try:
            for ops in batches:
                before = eng.digest.hex
                try:
                    eng.apply(ops)
                except EngramError:
                    assert eng.digest.hex == before
                assert eng.digest.hex == eng.recompute_digest().hex
            final = eng.digest.hex
        finally:
            eng.close()
        with Engine.open(root, cfg) as eng:
            assert eng.digest.hex == final == eng.recompute_digest().hex


def test_negative_zero_does_not_split_the_digest(tmp_path: Path) -> None:
    """SQLite stores -0.0 as 0.0; the maintained digest must hash what is stored."""
    root = tmp_path / "d"
    with Engine.open(root) as e:
        e.apply([
            {"op": "create_memory", "id": "a", "content": "x", "strength": -0.0},
            {"op": "create_memory", "id": "b", "content": "x"},
            {"op": "create_edge", "src": "a", "dst": "b", "weight": -0.0},
            {"op": "create_edge", "src": "b", "dst": "a", "weight": 1e6},  # the largest
            {"op": "activate", "id": "b", "boost": -0.0},
        ])
        assert e.digest.hex == e.recompute_digest().hex
        digest = e.digest.hex
    with Engine.open(root) as e:
        assert e.digest.hex == digest == e.recompute_digest().hex



def _store_with_holes(root: Path) -> None:
    """A few thousand memories, some deleted (rowid holes), committed and closed."""
    with Engine.open(root) as e:
        e.apply([{"op": "create_memory", "id": f"m{i}", "content": f"c {i}", "metadata": {"i": i}}
                 for i in range(3000)])
        e.apply([{"op": "delete_memory", "id": f"m{i}"} for i in range(0, 3000, 7)])


def _split(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Row scans split from 10 rows on; the command line of every helper started."""
    from engram.backup import rowscan

    monkeypatch.setattr(rowscan, "PARALLEL_MIN_ROWS", 10)
    calls: list[list[str]] = []
    real = rowscan.subprocess.Popen

    def spy(argv: list[str], **kw: object) -> object:
        calls.append(argv)
        return real(argv, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(rowscan.subprocess, "Popen", spy)
    return calls


def test_split_scan_equals_one_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engram.backup import rowscan
    from engram.tiers.warm import WarmTier

    _store_with_holes(tmp_path / "d")
    w = WarmTier(tmp_path / "d" / "warm" / "engram.db")
    three = partial(rowscan.committed_sum, workers=3)
    try:
        newer = {m.id: msgspec.structs.replace(m, strength=0.125, activation_count=3)
                 for m in w.get_memories(["m1", "m2", "m2999", "gone"]).values()}
        one, one_newer = w.digest_sum({}), w.digest_sum(newer)  # one scan here
        assert one != one_newer
        calls = _split(monkeypatch)
        w.conn.execute("BEGIN")  # an open transaction: one scan through this connection
        assert (w.digest_sum({}, three), w.digest_sum(newer, three)) == (one, one_newer)
        w.conn.execute("ROLLBACK")
        assert calls == []
        assert (w.digest_sum({}, three), w.digest_sum(newer, three)) == (one, one_newer)
        assert len(calls) == 4  # per sum: this process scans a third, two helpers the rest
        assert calls[0][2] == rowscan.MODULE
    finally:
        w.close()
    with Engine.open(tmp_path / "d") as e:  # and through the engine, after the close
        assert rowscan.recompute_digest(e, Resources(scan_workers=3)).hex == e.digest.hex
        assert len(calls) == 6
        assert rowscan.recompute_digest(e, Resources(scan_workers=1)).hex == e.digest.hex
        assert e.recompute_digest().hex == e.digest.hex  # the engine alone scans here
        assert len(calls) == 6


def test_split_scan_survives_a_failing_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from engram.backup import rowscan

    two = Resources(scan_workers=2)
    _store_with_holes(tmp_path / "d")
    with Engine.open(tmp_path / "d") as e:
        one = e.recompute_digest().hex
        _split(monkeypatch)
        monkeypatch.setattr(rowscan.sys, "executable", "/bin/false")  # exits 1, prints nothing
        assert rowscan.recompute_digest(e, two).hex == one
        assert "scanning here" in caplog.text
        monkeypatch.setattr(rowscan.sys, "executable", str(tmp_path / "no-such-python"))
        assert rowscan.recompute_digest(e, two).hex == one
        assert "could not start" in caplog.text


def test_memory_rows_of_a_rowid_range(tmp_path: Path) -> None:
    """The warm tier's SQL the row scans use: rowid bounds, and the rows of a range."""
    import sqlite3

    from engram.tiers.warm import memory_rowids, memory_rows

    _store_with_holes(tmp_path / "d")
    conn = sqlite3.connect(f"file:{tmp_path / 'd' / 'warm' / 'engram.db'}?mode=ro", uri=True)
    try:
        lo, hi, count = memory_rowids(conn)
        # m{i} has rowid i + 1; m0 (rowid 1) was deleted, m2999 (rowid 3000) was not.
        assert (lo, hi, count) == (2, 3000, 3000 - len(range(0, 3000, 7)))
        every = list(memory_rows(conn))
        assert len(every) == count and every[0][0] == "m1" and len(every[0]) == 8
        assert list(memory_rows(conn, None, 10)) == every  # a missing bound: every row
        parts = [list(memory_rows(conn, a, a + 999)) for a in (lo - 1, 1001, 2001)]
        assert sum(parts, []) == every
        assert [r[0] for r in memory_rows(conn, 7, 9)] == ["m6", "m8"]  # m7 was deleted
        empty = sqlite3.connect(":memory:")
        empty.execute("CREATE TABLE memories (id TEXT)")
        assert memory_rowids(empty) == (None, None, 0)
    finally:
        conn.close()
