"""verify's row scan (backup/rowcheck.py): a batch is only hashed when the column checks accept
it, and those accept no batch holding a row the per-row rules would report — so the report and
the digest are the ones the rows checked one by one give, whatever the damage."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from engram import digest as dg
from engram.backup import rowcheck
from engram.backup.rowcheck import (
    HASH_ERRORS,
    MAX_LISTED,
    RowScan,
    check_edge_row,
    check_memory_row,
    edge_rows_pass,
    loc_id,
    memory_rows_pass,
)
from engram.graph import Engine, EngineConfig
from engram.tiers.warm import memory_rows

GOOD = ("m1", "some content", 0.5, '{"n": 1}', 10, 20, 0, 3)
GOOD_EDGE = ("a", "b", "related", 0.5, 7, 0, 0)
_meta = msgspec.json.Decoder(dict).decode


def problems_of(row: tuple, check: object = check_memory_row) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    check(row, lambda loc, msg: found.append((loc, msg)))  # type: ignore[operator]
    return found


def with_field(i: int, value: object, base: tuple = GOOD) -> tuple:
    return base[:i] + (value,) + base[i + 1 :]


# Values that break a rule at its edges: unicode that looks like an allowed character, a
# newline (the batch check's separator) inside an id, lengths at and past the limit, NaN and
# the infinities, numbers of the wrong type, NULLs and blobs.
BAD_FIELDS = [
    (0, ""),
    (0, "x" * 257),
    (0, "é"),
    (0, "m\u0301"),
    (0, "\uff11"),  # a fullwidth digit: a digit to str.isdigit, not to the id rule
    (0, "a\nb"),
    (0, "a\n"),
    (0, "a\x00b"),
    (0, "bad id"),
    (0, b"m1"),
    (0, 7),
    (0, None),
    (1, b"bytes"),
    (1, None),
    (1, 3),
    (2, 1.0000001),
    (2, -1e-300),
    (2, math.inf),
    (2, -math.inf),
    (2, math.nan),
    (2, None),
    (2, "0.5"),
    (2, b"\x00"),
    (4, -1),
    (4, 1.0),
    (4, "1"),
    (4, None),
    (5, -(2**62)),
    (6, 2.5),
    (7, -1),
    (7, b"1"),
]


def test_sound_rows_are_accepted_at_their_edges() -> None:
    """Values exactly at a rule's limits pass both ways: the batch check is not so strict that
    a sound store never takes the fast path."""
    rows = [
        GOOD,
        with_field(0, "x" * 256),
        with_field(0, "A-z_0.9:@/"),
        with_field(2, 0),
        with_field(2, 1),
        with_field(2, -0.0),
        with_field(2, 1.0),
        with_field(7, 2**63 - 1),
        with_field(1, ""),
        with_field(1, "é\n" * 600_000),  # content is any text, here over 1 MB
    ]
    assert all(problems_of(r) == [] for r in rows)
    assert memory_rows_pass(rows)
    edges = [GOOD_EDGE, with_field(2, "k" * 64, GOOD_EDGE), with_field(3, -1e6, GOOD_EDGE)]
    assert all(problems_of(r, check_edge_row) == [] for r in edges)
    assert edge_rows_pass(edges)


def test_a_batch_with_one_bad_field_is_never_accepted() -> None:
    for i, value in BAD_FIELDS:
        bad = with_field(i, value)
        assert problems_of(bad), (i, value)
        for at in (0, 3, 7):
            rows = [GOOD] * 7
            rows.insert(at, bad)
            assert not memory_rows_pass(rows), (i, value, at)


def test_an_edge_batch_with_one_bad_row_is_never_accepted() -> None:
    bad_edges = [
        with_field(2, "no such kind!", GOOD_EDGE),
        with_field(2, "k" * 65, GOOD_EDGE),
        with_field(2, "a\nb", GOOD_EDGE),
        with_field(2, None, GOOD_EDGE),
        with_field(3, math.nan, GOOD_EDGE),
        with_field(3, math.inf, GOOD_EDGE),
        with_field(3, None, GOOD_EDGE),
        with_field(3, "1", GOOD_EDGE),
        with_field(4, "x", GOOD_EDGE),
        with_field(4, 1.5, GOOD_EDGE),
        with_field(5, 1, GOOD_EDGE),
        with_field(6, 1, GOOD_EDGE),
    ]
    for bad in bad_edges:
        assert problems_of(bad, check_edge_row), bad
        assert not edge_rows_pass([GOOD_EDGE, bad, GOOD_EDGE]), bad


VALUES = st.one_of(
    st.text(alphabet=st.sampled_from("az09-_.:@/ \n\x00é\uff11"), max_size=8),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.binary(max_size=3),
)


def rows_near(good: tuple) -> st.SearchStrategy[list[tuple]]:
    """Batches of rows whose every field is the sound one or any value at all."""
    fields = [st.one_of(st.just(v), VALUES) for v in good]
    return st.lists(st.tuples(*fields), min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(rows_near(GOOD))
def test_accepted_memory_batches_hold_no_row_the_rules_report(rows: list[tuple]) -> None:
    """The rules (check_memory_row, metadata aside: decoding it is the hash's) against the
    batch check: what it accepts, they accept row by row."""
    rows = [r[:3] + ("{}",) + r[4:] for r in rows]
    if memory_rows_pass(rows):
        assert [problems_of(r) for r in rows] == [[]] * len(rows)


@settings(max_examples=400, deadline=None)
@given(rows_near(GOOD_EDGE))
def test_accepted_edge_batches_hold_no_row_the_rules_report(rows: list[tuple]) -> None:
    if edge_rows_pass(rows):
        assert [problems_of(r, check_edge_row) for r in rows] == [[]] * len(rows)


def test_edge_rows_sum_is_the_sum_of_edge_hashes() -> None:
    rows = [("a", "b", "related", 0.5, 7, 0, 0), ("b", "a", "x", -1.0, 0, 1, 1)]
    edges = [check_edge_row(r, lambda loc, msg: None)[0] for r in rows]
    assert dg.edge_rows_sum(rows) == sum(dg.edge_hash(e) for e in edges)


# -- the scan of a warm tier -------------------------------------------------------------------


def one_by_one(conn: sqlite3.Connection) -> RowScan:
    """The scan as the rules define it: every row checked, every row that decodes hashed."""
    res = RowScan()
    total = 0
    for r in memory_rows(conn):
        res.rows += 1
        found = problems_of(r)
        m = check_memory_row(r, lambda loc, msg: None)
        if m is not None:
            try:
                total += dg.memory_hash(m)
            except HASH_ERRORS as e:
                found.append((loc_id("memory", r[0]), f"metadata cannot be hashed ({e})"))
                m = None
        res.undecodable += m is None
        res.problems += len(found)
        res.listed.extend(found)
    res.listed = res.listed[:MAX_LISTED]
    res.hash_hex = format(total % dg.MOD, "x")
    return res


def test_scan_reports_what_the_rows_checked_one_by_one_report(tmp_path: Path) -> None:
    root = tmp_path / "data"
    n = 3 * rowcheck.BATCH + 17
    with Engine.open(root, EngineConfig(checkpoint_interval=3600)) as eng:
        for i in range(0, n, 1000):
            eng.apply(
                [
                    {"op": "create_memory", "id": f"m{j}", "content": f"c {j}", "metadata": {}}
                    for j in range(i, min(n, i + 1000))
                ]
            )
    conn = sqlite3.connect(root / "warm" / "engram.db")
    with conn:
        conn.execute("UPDATE memories SET id = 'mé' WHERE rowid = 3")
        conn.execute("UPDATE memories SET strength = 9e999 WHERE rowid = 4")
        conn.execute("UPDATE memories SET created_at = 1.5 WHERE rowid = 5")
        conn.execute("UPDATE memories SET metadata = '[1]' WHERE rowid = ?", (rowcheck.BATCH + 9,))
        conn.execute(
            "UPDATE memories SET metadata = '{\"a\": 123456789012345678901234567890}' "
            "WHERE rowid = ?",
            (2 * rowcheck.BATCH + 2,),
        )
        conn.execute("UPDATE memories SET content = ? WHERE rowid = ?", ("huge " * 400_000, n - 1))
    conn.close()
    ro = sqlite3.connect(f"file:{root / 'warm' / 'engram.db'}?mode=ro", uri=True)
    try:
        got, want = rowcheck.scan(ro), one_by_one(ro)
    finally:
        ro.close()
    got.hash_seconds = want.hash_seconds = 0.0
    assert got == want
    assert got.undecodable == 2 and got.problems == 5
    assert (
        "memory 'mé'",
        "id does not follow the id rule (1-256 of A-Za-z0-9-_.:@/)",
    ) in got.listed
    assert ("memory m3", "strength inf is outside [0, 1]") in got.listed
    assert ("memory m4", "created_at 1.5 is not a timestamp") in got.listed
    assert (f"memory m{rowcheck.BATCH + 8}", "metadata is not a JSON object") in got.listed
    (too_big,) = [m for loc, m in got.listed if loc == f"memory m{2 * rowcheck.BATCH + 1}"]
    assert too_big.startswith("metadata cannot be hashed (")
