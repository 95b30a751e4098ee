"""`verify_data_dir`: every problem found with its location, nothing written, and a live data dir
with writes not yet checkpointed is clean (DESIGN "Validation levels", STYLE habit 9)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from engram.backup.verify import MAX_LISTED, VerifyReport, render_text, verify_data_dir
from engram.format import record as fmt
from engram.graph import Engine, EngineConfig
from engram.oplog.reader import LogFile, list_segments
from engram.procs import Resources

SMALL = EngineConfig(segment_bytes=2048, checkpoint_interval=3600)


def populate(eng: Engine, n: int = 30, prefix: str = "m") -> None:
    for i in range(n):
        eng.apply(
            [
                {
                    "op": "create_memory",
                    "id": f"{prefix}{i}",
                    "content": f"memory number {i} about things",
                    "metadata": {"i": i},
                }
            ]
        )
    for i in range(n - 1):
        eng.apply([{"op": "create_edge", "src": f"{prefix}{i}", "dst": f"{prefix}{i + 1}"}])
    eng.apply([{"op": "activate", "id": f"{prefix}0"}, {"op": "mark", "name": f"{prefix}half"}])
    eng.apply([{"op": "update_memory", "id": f"{prefix}1", "content": "changed"}])
    eng.apply([{"op": "delete_memory", "id": f"{prefix}{n - 1}"}])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    with Engine.open(root, SMALL) as eng:
        populate(eng)
    return root


def sql(root: Path, statement: str, params: tuple = ()) -> None:
    conn = sqlite3.connect(root / "warm" / "engram.db")
    with conn:
        conn.execute(statement, params)
    conn.close()


def segments(root: Path) -> list[Path]:
    return [p for _, p in list_segments(root / "oplog")]


def rewrite_header(path: Path, **changes: object) -> None:
    lf = LogFile.open(path)
    header = dict(lf.header, **changes)
    path.write_bytes(fmt.encode_file_header(fmt.KIND_SEGMENT, header) + lf.data[lf.header_size :])


def locations(report: VerifyReport, check: str) -> list[str]:
    return [p.location for p in report.problems if p.check == check]


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- clean data dirs ---------------------------------------------------------------------------


def test_clean_data_dir_is_ok_with_figures(data_dir: Path) -> None:
    with Engine.open(data_dir, SMALL) as eng:
        digest, last = eng.digest.hex, eng.last_lsn
        memories, edges, dbid = eng.n_memories, eng.n_edges, eng.database_id
    report = verify_data_dir(data_dir)
    assert report.ok, render_text(report)
    assert report.warnings == []
    assert report.database_id == dbid
    assert not report.live
    assert (report.memories, report.edges) == (memories, edges) == (29, 28)
    assert report.applied_lsn == last == report.log_last_lsn
    assert report.log_first_lsn == 1
    assert report.segments_checked == len(segments(data_dir)) > 2
    assert report.records_checked == last
    assert report.digest_stored == report.digest_recomputed == report.log_end_digest == digest
    assert report.sqlite_check == "quick_check"
    assert set(report.durations) == {
        "identity",
        "sqlite",
        "memories",
        "edges",
        "cold",
        "oplog",
        "digest",
    }
    assert all(c.status == "ok" for c in report.checks.values())
    text = render_text(report)
    assert "result: OK" in text and "FAIL" not in text


def test_check_all_runs_integrity_check_and_replays_the_whole_log(data_dir: Path) -> None:
    report = verify_data_dir(data_dir, check_all=True)
    assert report.ok, render_text(report)
    assert report.sqlite_check == "integrity_check"
    assert "integrity_check: ok" in render_text(report)


def test_verify_writes_nothing(data_dir: Path) -> None:
    before = snapshot(data_dir)
    verify_data_dir(data_dir)
    verify_data_dir(data_dir, check_all=True)
    assert snapshot(data_dir) == before


def test_live_data_dir_with_unflushed_writes_is_clean(tmp_path: Path) -> None:
    root = tmp_path / "live"
    with Engine.open(root, SMALL) as eng:
        populate(eng, 20, "a")
        checkpointed = eng.checkpoint()
        # Past the checkpoint: in the log and the open warm transaction, dirty activations only
        # in the fast tier, and a segment rotation or two.
        populate(eng, 20, "b")
        for i in range(10):
            eng.submit([{"op": "activate", "id": f"a{i}"}])
        assert eng.last_lsn > checkpointed
        for check_all in (False, True):
            report = verify_data_dir(root, check_all=check_all)
            assert report.ok, render_text(report)
            assert report.live
            assert report.applied_lsn == checkpointed
            assert report.log_last_lsn == eng.last_lsn
            assert report.log_end_digest == eng.digest.hex
            assert report.digest_stored == report.digest_recomputed == eng.checkpoint_digest


def test_crashed_data_dir_with_a_wal_reads_committed_state(tmp_path: Path) -> None:
    root, crashed = tmp_path / "src", tmp_path / "crashed"
    with Engine.open(root, SMALL) as eng:
        populate(eng, 10)
        applied = eng.checkpoint()
        eng.apply([{"op": "create_memory", "id": "late", "content": "not checkpointed"}])
        # Copy as a crash would leave it: committed WAL, lock file not held, no final checkpoint.
        shutil.copytree(root, crashed)
        last, digest = eng.last_lsn, eng.digest.hex
    assert (crashed / "warm" / "engram.db-wal").exists()
    report = verify_data_dir(crashed)
    assert report.ok, render_text(report)
    assert not report.live
    assert report.applied_lsn == applied < last == report.log_last_lsn
    assert report.log_end_digest == digest


def test_torn_tail_of_last_segment_is_a_warning(data_dir: Path) -> None:
    with open(segments(data_dir)[-1], "ab") as f:
        f.write(b"\x40\x00\x00\x00partial")
    report = verify_data_dir(data_dir)
    assert report.ok, render_text(report)
    assert [w.check for w in report.warnings] == ["oplog"]
    assert "torn tail" in report.warnings[0].message
    assert segments(data_dir)[-1].name in report.warnings[0].location


def test_missing_data_dir_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    report = verify_data_dir(tmp_path / "nope")
    assert not report.ok
    assert report.problems[0].message == "the data dir does not exist"
    assert report.checks["oplog"].status == "skipped"


# -- damage, one kind at a time ------------------------------------------------------------------


def test_edge_to_missing_memory(data_dir: Path) -> None:
    sql(data_dir, "INSERT INTO edges VALUES ('m3', 'ghost', 'related', 1.0, 1)")
    report = verify_data_dir(data_dir)
    assert not report.ok
    assert locations(report, "edges") == ["edge m3->ghost (related)"]
    (p,) = [p for p in report.problems if p.check == "edges"]
    assert "dst 'ghost' does not exist" in p.message
    # The row is part of the stored graph now, so the digest disagrees too.
    assert "meta digest" in locations(report, "digest")


def test_dangling_edges_are_listed_up_to_the_cap(data_dir: Path) -> None:
    conn = sqlite3.connect(data_dir / "warm" / "engram.db")
    with conn:
        conn.executemany(
            "INSERT INTO edges VALUES (?, ?, 'related', 1.0, 1)",
            [(f"x{i}", "m2") for i in range(MAX_LISTED + 50)],
        )
    conn.close()
    report = verify_data_dir(data_dir)
    edges = [p for p in report.problems if p.check == "edges"]
    assert len(edges) == MAX_LISTED + 1
    assert edges[-1].message == "and 50 more problems of this check not listed"
    assert report.checks["edges"].problems == MAX_LISTED + 50


def test_strength_out_of_range_and_bad_rows(data_dir: Path) -> None:
    sql(data_dir, "UPDATE memories SET strength = 1.5 WHERE id = 'm4'")
    sql(data_dir, "UPDATE memories SET activation_count = -1 WHERE id = 'm5'")
    sql(data_dir, "UPDATE memories SET metadata = '[1, 2]' WHERE id = 'm6'")
    sql(data_dir, "UPDATE memories SET id = 'bad id' WHERE id = 'm7'")
    report = verify_data_dir(data_dir)
    problems = {(p.location, p.message) for p in report.problems if p.check == "memories"}
    assert ("memory m4", "strength 1.5 is outside [0, 1]") in problems
    assert ("memory m5", "activation_count -1 is not a count >= 0") in problems
    assert ("memory m6", "metadata is not a JSON object") in problems
    assert any(loc == "memory 'bad id'" for loc, _ in problems)
    assert report.checks["digest"].status == "fail"


def test_wrong_stored_digest(data_dir: Path) -> None:
    sql(data_dir, "UPDATE meta SET value = ? WHERE key = 'digest'", ("0" * 63 + "1",))
    report = verify_data_dir(data_dir)
    assert not report.ok
    locs = locations(report, "digest")
    assert "meta digest" in locs
    # The log, replayed from its segment's base digest, disagrees with the stored value too.
    assert any("LSN" in loc for loc in locs)
    assert report.digest_recomputed != report.digest_stored


def test_flipped_byte_in_a_middle_segment(data_dir: Path) -> None:
    segs = segments(data_dir)
    victim = segs[len(segs) // 2]
    data = bytearray(victim.read_bytes())
    hsize = LogFile.open(victim).header_size
    data[hsize + (len(data) - hsize) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    for check_all in (False, True):
        report = verify_data_dir(data_dir, check_all=check_all)
        assert not report.ok
        locs = locations(report, "oplog")
        assert len(locs) == 1 and locs[0].startswith(f"oplog/{victim.name}@")
        # Reading went on past the damage: every segment was checked.
        assert report.segments_checked == len(segs)
        assert report.log_last_lsn == report.applied_lsn


def test_segment_of_another_database(data_dir: Path) -> None:
    victim = segments(data_dir)[1]
    rewrite_header(victim, database_id="00000000-0000-0000-0000-000000000000")
    report = verify_data_dir(data_dir)
    assert locations(report, "oplog") == [f"oplog/{victim.name}"]
    assert "00000000-0000-0000-0000-000000000000" in report.problems[0].message


def test_missing_middle_segment_is_a_gap(data_dir: Path) -> None:
    segs = segments(data_dir)
    segs[1].unlink()
    report = verify_data_dir(data_dir)
    (p,) = [p for p in report.problems if p.check == "oplog"]
    assert p.location == f"oplog/{segs[2].name}"
    assert "are missing" in p.message


def test_applied_lsn_past_log_end(data_dir: Path) -> None:
    with Engine.open(data_dir, SMALL) as eng:
        last = eng.last_lsn
    sql(data_dir, "UPDATE meta SET value = ? WHERE key = 'applied_lsn'", (str(last + 10),))
    report = verify_data_dir(data_dir)
    (p,) = [p for p in report.problems if p.check == "oplog"]
    assert p.location == "meta applied_lsn"
    assert f"applied_lsn {last + 10} is past the log end {last}" in p.message


def test_log_must_reach_back_to_applied_lsn(data_dir: Path) -> None:
    segs = segments(data_dir)
    first_kept = fmt.parse_segment_name(segs[-1].name)
    assert first_kept is not None
    for p in segs[:-1]:
        p.unlink()
    sql(data_dir, "UPDATE meta SET value = '3' WHERE key = 'applied_lsn'")
    report = verify_data_dir(data_dir)
    msgs = [p.message for p in report.problems if p.check == "oplog"]
    assert any(f"records 4..{first_kept - 1} are missing" in m for m in msgs)


def test_cold_stubs_to_missing_and_mismatched_segments(data_dir: Path) -> None:
    cold = data_dir / "cold"
    good = b"archived memories"
    good_hash = hashlib.sha256(good).hexdigest()
    (cold / f"{good_hash}.seg").write_bytes(good)
    wrong_hash = hashlib.sha256(b"what it was").hexdigest()
    (cold / f"{wrong_hash}.seg").write_bytes(b"what it is now")
    missing_hash = hashlib.sha256(b"gone").hexdigest()
    conn = sqlite3.connect(data_dir / "warm" / "engram.db")
    with conn:
        conn.executemany(
            "INSERT INTO cold_stubs VALUES (?, ?, 1)",
            [("old1", good_hash), ("old2", wrong_hash), ("old3", missing_hash), ("old4", "junk")],
        )
    conn.close()
    report = verify_data_dir(data_dir)
    problems = {p.location: p.message for p in report.problems if p.check == "cold"}
    assert set(problems) == {f"cold/{wrong_hash}.seg", f"cold/{missing_hash}.seg", "cold stub old4"}
    assert "content sha256 is" in problems[f"cold/{wrong_hash}.seg"]
    assert "missing" in problems[f"cold/{missing_hash}.seg"]
    assert (report.cold_stubs, report.cold_segments) == (4, 3)


def test_corrupt_sqlite_page_is_a_problem(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with Engine.open(root, SMALL) as eng:
        for i in range(200):
            eng.submit([{"op": "create_memory", "id": f"m{i}", "content": "text " * 60}])
    db = root / "warm" / "engram.db"
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    mid = (len(data) // page // 2) * page
    data[mid : mid + page] = b"\xaa" * page
    db.write_bytes(bytes(data))
    for check_all in (False, True):
        report = verify_data_dir(root, check_all=check_all)
        assert not report.ok
        assert report.checks["sqlite"].status == "fail" or any(
            "check failed" in p.message for p in report.problems
        )
        assert all(p.location for p in report.problems)
        # The log checks still ran.
        assert report.segments_checked == len(segments(root))


def test_unreadable_warm_tier_and_identity(data_dir: Path) -> None:
    (data_dir / "warm" / "engram.db").write_bytes(b"not a database at all" * 200)
    (data_dir / "identity.json").write_text("{")
    report = verify_data_dir(data_dir)
    assert "identity.json" in locations(report, "identity")
    assert locations(report, "sqlite") == ["warm/engram.db"]
    assert report.checks["memories"].status == "skipped"
    assert report.checks["oplog"].status == "ok"
    assert report.segments_checked == len(segments(data_dir))


def test_several_problems_at_once_are_all_reported(data_dir: Path) -> None:
    sql(data_dir, "INSERT INTO edges VALUES ('m3', 'ghost', 'related', 1.0, 1)")
    sql(data_dir, "UPDATE memories SET strength = 1.5 WHERE id = 'm4'")
    sql(data_dir, "INSERT INTO cold_stubs VALUES ('old', ?, 1)", ("ab" * 32,))
    segs = segments(data_dir)
    data = bytearray(segs[1].read_bytes())
    data[-3] ^= 0xFF
    segs[1].write_bytes(bytes(data))
    report = verify_data_dir(data_dir)
    failed = {n for n, c in report.checks.items() if c.status == "fail"}
    assert failed == {"memories", "edges", "cold", "oplog", "digest"}
    text = render_text(report)
    assert "result: FAIL" in text
    for loc in ("edge m3->ghost (related)", "memory m4", f"cold/{'ab' * 32}.seg"):
        assert f"  {loc}: " in text
    assert f"  oplog/{segs[1].name}@" in text
    d = report.to_dict()
    assert d["ok"] is False and len(d["problems"]) == len(report.problems)


def test_wrong_base_digest_in_a_segment_header(data_dir: Path) -> None:
    segs = segments(data_dir)
    bogus = "f" * 64
    rewrite_header(segs[1], base_digest=bogus)
    # The default replays from the segment holding applied_lsn + 1 only.
    assert verify_data_dir(data_dir).ok
    report = verify_data_dir(data_dir, check_all=True)
    assert locations(report, "digest") == [f"oplog/{segs[1].name}"]
    assert f"header base_digest {bogus} differs" in report.problems[0].message
    # The last segment's base digest leads to applied_lsn: it must give the stored digest.
    rewrite_header(segs[-1], base_digest=bogus)
    report = verify_data_dir(data_dir)
    (p,) = report.problems
    assert p.location.startswith(f"oplog/{segs[-1].name} LSN ")
    assert "warm tier stores" in p.message


def test_segments_past_applied_lsn_are_checked_against_the_stored_digest(tmp_path: Path) -> None:
    root, crashed = tmp_path / "src", tmp_path / "crashed"
    with Engine.open(root, SMALL) as eng:
        populate(eng, 10)
        applied = eng.checkpoint()
        populate(eng, 40, "late")
        shutil.copytree(root, crashed)
    late = [p for p in segments(crashed) if (fmt.parse_segment_name(p.name) or 0) > applied + 1]
    assert len(late) >= 2
    rewrite_header(late[0], base_digest="0" * 64)
    report = verify_data_dir(crashed)
    assert locations(report, "digest") == [f"oplog/{late[0].name}"]
    # The log-end digest still comes from the stored digest and the records, not that header.
    with Engine.open(root, SMALL) as eng:
        assert report.log_end_digest == eng.digest.hex


def _spy_helpers(monkeypatch: pytest.MonkeyPatch, started: list[str]) -> None:
    """Record the module of each scan helper process and the name of each thread verify
    starts, in ``started``; a row scan splits from 10 rows on."""
    import engram.backup.verify.warm_checks as warm_checks
    from engram.backup import rowscan

    monkeypatch.setattr(rowscan, "PARALLEL_MIN_ROWS", 10)
    real_popen, real_thread = rowscan.subprocess.Popen, warm_checks.threading.Thread
    monkeypatch.setattr(
        rowscan.subprocess,
        "Popen",
        lambda argv, **kw: started.append(argv[2]) or real_popen(argv, **kw),
    )
    monkeypatch.setattr(
        warm_checks.threading,
        "Thread",
        lambda **kw: started.append(kw["name"]) or real_thread(**kw),
    )


def test_rows_scanned_in_helper_processes_give_the_same_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engram.backup import rowscan

    root = tmp_path / "data"
    with Engine.open(root, SMALL) as eng:
        eng.apply([{"op": "create_memory", "id": f"m{i}", "content": f"c {i}"} for i in range(600)])
    # Problems in every third of the rowid range, more than the listing cap in all.
    sql(root, "UPDATE memories SET strength = 2.0 WHERE rowid % 4 = 0")
    sql(root, "UPDATE memories SET metadata = 'x' WHERE rowid % 97 = 0")

    def facts(r: VerifyReport) -> tuple:
        listed = sorted((p.location, p.message) for p in r.problems if p.check == "memories")
        return (
            r.memories,
            r.checks["memories"].problems,
            len(listed),
            r.checks["digest"].status,
            r.digest_recomputed,
            {k: c.status for k, c in r.checks.items()},
        )

    three = Resources(scan_workers=3)
    one = verify_data_dir(root, check_all=True, resources=three)  # too few rows to split
    assert one.checks["memories"].problems == 150 + 6
    started: list[str] = []
    _spy_helpers(monkeypatch, started)
    split = verify_data_dir(root, check_all=True, resources=three)
    assert started.count("engram.backup.rowcheck") == 2
    assert facts(split) == facts(one)
    # Without the bad metadata the digest is recomputed, the same both ways.
    sql(root, "UPDATE memories SET metadata = '{}' WHERE metadata = 'x'")
    one = verify_data_dir(root, resources=Resources(scan_workers=1))
    started.clear()
    split = verify_data_dir(root, resources=three)
    assert started.count(rowscan.MODULE) == 0 and started.count("engram.backup.rowcheck") == 2
    assert split.digest_recomputed == one.digest_recomputed is not None
    assert facts(split) == facts(one)


def test_verify_with_one_scan_worker_runs_in_turn_and_reports_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resources with one scan worker (a validation at low priority): no helper processes and
    no structure-check thread beside the scans (they would take the core the writers need),
    and the same findings. The resources decide, not the priority the caller's thread runs at:
    with two workers verify splits even at idle priority."""
    root = tmp_path / "data"
    with Engine.open(root, SMALL) as eng:
        eng.apply([{"op": "create_memory", "id": f"m{i}", "content": f"c {i}"} for i in range(600)])
    sql(root, "UPDATE memories SET strength = 2.0 WHERE rowid % 4 = 0")
    started: list[str] = []
    _spy_helpers(monkeypatch, started)
    normal = verify_data_dir(root, check_all=True, resources=Resources(scan_workers=2))
    assert sorted(started) == ["engram-verify-sqlite", "engram.backup.rowcheck"]
    started.clear()
    low = verify_data_dir(root, check_all=True, resources=Resources.low())
    assert started == []
    assert [(p.check, p.location, p.message) for p in low.problems] == [
        (p.check, p.location, p.message) for p in normal.problems
    ]
    assert {k: c.status for k, c in low.checks.items()} == {
        k: c.status for k, c in normal.checks.items()
    }
    assert normal.checks["memories"].problems == 150
    if hasattr(os, "SCHED_IDLE"):
        from engram.procs import idle_priority

        with idle_priority():
            verify_data_dir(root, check_all=True, resources=Resources(scan_workers=2))
        assert sorted(started) == ["engram-verify-sqlite", "engram.backup.rowcheck"]


def test_damaged_index_is_found_by_the_structure_check(data_dir: Path) -> None:
    """Only SQLite's own check reads the edges_by_dst index: its findings must reach the report
    (on a data dir nobody owns it runs beside the row scans)."""
    db = data_dir / "warm" / "engram.db"
    conn = sqlite3.connect(db)
    root_page = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'edges_by_dst'"
    ).fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    start = (root_page - 1) * page
    data[start : start + page] = b"\x00" * page  # a page that is no b-tree page at all
    db.write_bytes(bytes(data))
    for check_all in (False, True):
        report = verify_data_dir(data_dir, check_all=check_all)
        sqlite_problems = [p for p in report.problems if p.check == "sqlite"]
        assert sqlite_problems, render_text(report)
        assert report.checks["sqlite"].status == "fail"
        assert report.checks["memories"].status == "ok"  # the rows themselves are fine


def test_edge_row_rules() -> None:
    """rowcheck holds the edge-row rules verify applies: every rule a row breaks is reported at
    the edge's location, and a dangling end is said and counted."""
    from engram.backup.rowcheck import check_edge_row

    found: list[tuple[str, str]] = []

    def problem(location: str, message: str) -> None:
        found.append((location, message))

    edge, dangles = check_edge_row(("a", "b", "related", 0.5, 7, 0, 0), problem)
    assert (found, dangles, edge.weight, edge.created_at) == ([], False, 0.5, 7)
    edge, dangles = check_edge_row(("a", "b", "no such kind!", float("nan"), "x", 1, 1), problem)
    assert dangles
    assert found == [
        ("edge a->b (no such kind!)", "src 'a' and dst 'b' does not exist"),
        ("edge a->b (no such kind!)", "kind does not follow the kind rule"),
        ("edge a->b (no such kind!)", "weight nan is not a finite number"),
        ("edge a->b (no such kind!)", "created_at 'x' is not a timestamp"),
    ]
    found.clear()
    check_edge_row(("a", "b", "related", True, 1, 0, 1), problem)
    assert found == [
        ("edge a->b (related)", "dst 'b' does not exist"),
        ("edge a->b (related)", "weight True is not a finite number"),
    ]
