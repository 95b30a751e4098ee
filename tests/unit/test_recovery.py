"""Recovery on open (DESIGN O5): replay after applied_lsn, cut a torn tail with a warning, refuse
damage anywhere else, foreign segments and a warm tier ahead of the log. Crashes are real: the
data dir is written by tests/crashdriver.py, which is SIGKILLed."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import struct
from pathlib import Path

import pytest

import crashdriver
from engram import digest as dg
from engram.errors import CorruptData, CorruptLog, ForeignLog, LogGap
from engram.format import record as fmt
from engram.graph import Engine, EngineConfig
from engram.model import OpType
from engram.oplog.reader import LogFile, list_segments

NO_CKPT = {"checkpoint_interval": 3600.0, "checkpoint_ops": 10**9}


def batch(i: int) -> list[dict]:
    ops: list[dict] = [{"op": "create_memory", "id": f"m{i}", "content": f"memory number {i}",
                        "metadata": {"i": i}}]
    if i:
        ops.append({"op": "create_edge", "src": f"m{i}", "dst": f"m{i - 1}"})
    if i % 4 == 3:
        ops.append({"op": "activate", "id": f"m{i - 2}"})
    if i % 10 == 9:
        ops.append({"op": "delete_memory", "id": f"m{i - 5}"})
    return ops


def crashed(root: Path, n: int, config: dict | None = None) -> list[dict]:
    """Apply batch(0..n-1) in a driver, then SIGKILL it; returns its acknowledgements."""
    d = crashdriver.Driver(root, {**NO_CKPT, **(config or {})})
    d.ready()
    acks = [d.call(batch(i)) for i in range(n)]
    assert all(a["ok"] for a in acks), acks
    assert d.kill() == []
    return acks


def snapshot(e: Engine) -> tuple:
    mems = [(m.id, m.content, m.strength, m.metadata, m.activation_count, m.created_at,
             m.updated_at) for m in e.iter_memories()]
    edges = [(x.src, x.dst, x.kind, x.weight, x.created_at) for x in e.iter_edges()]
    return mems, edges, e.last_lsn, e.digest.hex


def applied_lsn(root: Path) -> int:
    conn = sqlite3.connect(f"file:{root / 'warm' / 'engram.db'}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT value FROM meta WHERE key='applied_lsn'").fetchone()[0])
    finally:
        conn.close()


def last_segment(root: Path) -> Path:
    return list_segments(root / "oplog")[-1][1]


def record_offsets(path: Path) -> list[tuple[int, int, int]]:
    """(offset, end, lsn) of each record of a log file."""
    lf = LogFile.open(path)
    out, off = [], lf.header_size
    while off < len(lf.data):
        blen, _ = fmt.unpack_frame(lf.data, off)
        end = off + fmt.FRAME_SIZE + blen
        out.append((off, end, fmt.unpack_lsn(lf.data[off + fmt.FRAME_SIZE : end])))
        off = end
    return out


# -- clean and crashed reopen ------------------------------------------------------------------


def test_reopen_after_close_is_identical(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with Engine.open(root, EngineConfig(segment_bytes=4096)) as e:
        for i in range(40):
            e.apply(batch(i))
        before = snapshot(e)
        stats = e.stats()
    assert applied_lsn(root) == before[2]
    with Engine.open(root) as e:
        assert snapshot(e) == before
        assert e.digest.hex == e.recompute_digest().hex
        s = e.stats()
        assert (s["memories"], s["edges"], s["lsn"]) == (
            stats["memories"], stats["edges"], stats["lsn"]
        )


@pytest.mark.parametrize("config", [{}, {"checkpoint_ops": 15}, {"segment_bytes": 2048,
                                                                 "fast_tier_bytes": 400}])
def test_reopen_after_kill_replays_from_applied_lsn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, config: dict
) -> None:
    root = tmp_path / "d"
    acks = crashed(root, 30, config)
    applied = applied_lsn(root)
    assert applied < acks[-1]["lsn"]  # the warm tier is behind: replay has work to do
    progress: list[tuple[int, int]] = []
    with caplog.at_level(logging.INFO, logger="engram"):
        e = Engine.open(root, progress=lambda n, lsn: progress.append((n, lsn)))
    try:
        assert e.last_lsn == acks[-1]["lsn"]
        assert e.digest.hex == acks[-1]["digest"] == e.recompute_digest().hex
        assert progress[-1] == (acks[-1]["lsn"] - applied, acks[-1]["lsn"])
        assert any("replayed" in r.getMessage() for r in caplog.records)
        ids = {m.id for m in e.iter_memories()}
        assert {"m0", "m29"} <= ids and "m4" not in ids  # m4 deleted by batch 9
        e.apply(batch(30))
        assert e.last_lsn > acks[-1]["lsn"]
    finally:
        e.close()


def test_recovery_is_idempotent_over_repeated_crashes(tmp_path: Path) -> None:
    root = tmp_path / "d"
    crashed(root, 5)
    # Recovery itself is killed: opened and killed again before it writes anything.
    for _ in range(3):
        d = crashdriver.Driver(root, NO_CKPT)
        d.ready()
        d.kill()
    with Engine.open(root) as e:
        assert e.last_lsn == sum(len(batch(i)) for i in range(5)) + 0  # no delete before 9
        assert e.digest.hex == e.recompute_digest().hex


# -- torn tails --------------------------------------------------------------------------------


def _tear(path: Path, how: str) -> int:
    """Damage the end of ``path`` like a crash would; returns the LSN that must survive."""
    recs = record_offsets(path)
    data = path.read_bytes()
    if how == "partial_frame":
        path.write_bytes(data + b"\x2a\x00\x00")
        return recs[-1][2]
    if how == "partial_body":
        off, end, _ = recs[-1]
        path.write_bytes(data[: off + (end - off) // 2])
    elif how == "zero_tail":
        path.write_bytes(data + bytes(8192))
        return recs[-1][2]
    elif how == "zeroed_last_record":
        off, end, _ = recs[-1]
        path.write_bytes(data[:off] + bytes(end - off))
    elif how == "no_txn_end":
        off, _, _ = recs[-1]  # the last batch has several records: drop its end marker record
        path.write_bytes(data[:off])
    # The last transaction is gone: what survives is the one before it.
    lf = LogFile.open(path)
    lf.verify(allow_torn_tail=True)
    return lf.last_lsn or 0


@pytest.mark.parametrize(
    "how", ["partial_frame", "partial_body", "zero_tail", "zeroed_last_record", "no_txn_end"]
)
def test_torn_tail_is_cut_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    root = tmp_path / "d"
    acks = crashed(root, 12)  # batch 11 has three records: a multi-record last transaction
    seg = last_segment(root)
    keep = _tear(seg, how)
    digests = {0: dg.EMPTY, **{a["lsn"]: a["digest"] for a in acks}}
    with caplog.at_level(logging.WARNING, logger="engram"):
        e = Engine.open(root)
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(seg.name in w and "torn tail" in w for w in warnings), warnings
        assert e.last_lsn == keep
        assert e.digest.hex == digests[keep] == e.recompute_digest().hex
        e.apply([{"op": "create_memory", "id": "after", "content": "x"}])
        after = snapshot(e)
    finally:
        e.close()
    lf = LogFile.open(last_segment(root))
    lf.verify()  # the cut tail is gone: the file is clean again
    assert lf.torn is None
    with Engine.open(root) as e:
        assert snapshot(e) == after


# -- damage anywhere else ----------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _assert_refused(root: Path, exc: type, *needles: str) -> Exception:
    files = {p: p.read_bytes() for p in (root / "oplog").iterdir()}
    with pytest.raises(exc) as ei:
        Engine.open(root)
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    # Refusing harms nothing: the log is untouched and the dir is not left locked.
    assert {p: p.read_bytes() for p in (root / "oplog").iterdir()} == files
    from engram.datadir import read_owner

    assert read_owner(root) is None
    return ei.value


def test_damage_in_the_middle_of_the_last_segment_refuses(tmp_path: Path) -> None:
    root = tmp_path / "d"
    crashed(root, 10)
    seg = last_segment(root)
    off, end, _ = record_offsets(seg)[4]
    _flip(seg, off + fmt.FRAME_SIZE + 3)
    err = _assert_refused(root, CorruptLog, seg.name, f"offset {off}", "restore")
    assert err.segment == str(seg) and err.offset == off  # type: ignore[attr-defined]


def test_bad_length_in_the_middle_of_the_last_segment_refuses(tmp_path: Path) -> None:
    root = tmp_path / "d"
    crashed(root, 10)
    seg = last_segment(root)
    off, _, _ = record_offsets(seg)[3]
    data = bytearray(seg.read_bytes())
    struct.pack_into("<I", data, off, 5 << 20)  # claims to run past the end of the file
    seg.write_bytes(bytes(data))
    _assert_refused(root, CorruptLog, seg.name, f"offset {off}")


def test_damage_in_an_earlier_segment_refuses(tmp_path: Path) -> None:
    root = tmp_path / "d"
    crashed(root, 30, {"segment_bytes": 1024})
    segs = list_segments(root / "oplog")
    assert len(segs) > 2 and applied_lsn(root) == 0
    seg = segs[1][1]
    off, _, _ = record_offsets(seg)[1]
    _flip(seg, off + fmt.FRAME_SIZE + fmt.BODY_FIXED)
    _assert_refused(root, CorruptLog, seg.name, f"offset {off}")


def test_torn_tail_in_an_earlier_segment_refuses(tmp_path: Path) -> None:
    root = tmp_path / "d"
    crashed(root, 30, {"segment_bytes": 1024})
    seg = list_segments(root / "oplog")[0][1]
    seg.write_bytes(seg.read_bytes() + b"\x01\x02\x03")
    _assert_refused(root, CorruptLog, seg.name)


def test_damaged_segment_header_refuses(tmp_path: Path) -> None:
    root = tmp_path / "d"
    crashed(root, 10, {"segment_bytes": 1024})
    seg = list_segments(root / "oplog")[0][1]
    _flip(seg, 20)
    _assert_refused(root, CorruptLog, seg.name, "header")


def test_segment_of_another_database_is_refused(tmp_path: Path) -> None:
    root, other = tmp_path / "d", tmp_path / "other"
    with Engine.open(root) as e:
        e.apply(batch(0))
        me = e.database_id
    with Engine.open(other) as e:
        for i in range(3):
            e.apply(batch(i))
        them = e.database_id
    src = list_segments(other / "oplog")[0][1]
    dst = root / "oplog" / fmt.segment_name(2)
    shutil.copy(src, dst)
    err = _assert_refused(root, ForeignLog, dst.name, them, me, "move")
    assert err.code == "foreign_log"


def test_warm_tier_ahead_of_the_log_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with Engine.open(root) as e:
        for i in range(6):
            e.apply(batch(i))
        end = e.last_lsn
    seg = last_segment(root)
    recs = record_offsets(seg)
    cut = next(off for off, _, lsn in recs if lsn == end - 3)
    seg.write_bytes(seg.read_bytes()[:cut])  # whole records lost at a clean boundary
    err = _assert_refused(root, CorruptData, f"LSN {end}", "restore")
    assert err.code == "corrupt_data"


def test_log_missing_its_beginning_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    crashed(root, 30, {"segment_bytes": 1024})
    first = list_segments(root / "oplog")[0][1]
    first.unlink()
    _assert_refused(root, LogGap, "missing")


def test_empty_last_segment_after_a_gap_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with Engine.open(root) as e:
        e.apply(batch(0))
        e.apply(batch(1))
        end, db = e.last_lsn, e.database_id
    header = fmt.encode_file_header(
        fmt.KIND_SEGMENT,
        {"database_id": db, "format_version": fmt.FORMAT_VERSION, "first_lsn": end + 5,
         "created_at_ns": 1, "base_digest": dg.EMPTY},
    )
    (root / "oplog" / fmt.segment_name(end + 5)).write_bytes(header)
    _assert_refused(root, LogGap, f"{end + 1}..{end + 4}")


def test_segment_name_must_match_its_header(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with Engine.open(root) as e:
        e.apply(batch(0))
    seg = last_segment(root)
    seg.rename(seg.with_name(fmt.segment_name(7)))
    _assert_refused(root, CorruptLog, fmt.segment_name(7), "first LSN")


def test_crafted_record_with_a_bad_image_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with Engine.open(root) as e:
        e.apply(batch(0))
        end, ts = e.last_lsn, e.last_ts
    seg = last_segment(root)
    # A record with a valid checksum whose after-image is not a memory.
    bad = fmt.encode_record(end + 1, ts, end + 1, True, OpType.CREATE_MEMORY, "x", None,
                            fmt.encode_image({"not": "a memory"}))
    seg.write_bytes(seg.read_bytes() + bad)
    _assert_refused(root, CorruptLog, f"LSN {end + 1}")


def test_empty_data_dir_after_header_only_segment(tmp_path: Path) -> None:
    """A crash right after a rotation leaves a header-only last segment: that is fine."""
    root = tmp_path / "d"
    acks = crashed(root, 20, {"segment_bytes": 600})
    segs = list_segments(root / "oplog")
    last_first, last_path = segs[-1]
    recs = record_offsets(last_path)
    if recs:  # make the newest segment header-only, as if the crash came right after rotation
        last_path.write_bytes(last_path.read_bytes()[: recs[0][0]])
    with Engine.open(root) as e:
        assert e.last_lsn == last_first - 1
        assert e.digest.hex == e.recompute_digest().hex
        e.apply([{"op": "create_memory", "id": "after", "content": "x"}])
        assert e.last_lsn > last_first - 1
    assert acks


# -- the promise: kill -9 during concurrent writes loses no acknowledged write -----------------


@pytest.mark.parametrize("durability", ["sync", "batch", "none"])
def test_kill_during_concurrent_writes_loses_no_acknowledged_write(
    tmp_path: Path, durability: str
) -> None:
    root = tmp_path / "d"
    config = {"durability": durability, "checkpoint_interval": 0.02, "segment_bytes": 16384,
              "fast_tier_bytes": 4096, "batch_interval": 0.002}
    d = crashdriver.Driver(root, config, threads=4, count=400)
    d.ready()
    acked = [d.line() for _ in range(150)]
    acked += d.kill()  # whatever it acknowledged before the signal landed
    acked = [a for a in acked if "ack" in a]
    assert len(acked) >= 150
    with Engine.open(root) as e:
        have = {m.id for m in e.iter_memories()}
        edges = {(x.src, x.dst) for x in e.iter_edges()}
        missing = [a["ack"] for a in acked if a["ack"] not in have]
        assert not missing, f"acknowledged but lost: {missing[:10]}"
        for a in acked:
            t, n = a["ack"].split("-")
            if int(n):
                assert (a["ack"], f"{t}-{int(n) - 1}") in edges
            assert e.last_lsn >= a["lsn"]
        assert e.digest.hex == e.recompute_digest().hex
        # Whatever else made it in came whole: every memory with n > 0 has its edge.
        for mid in have:
            t, n = mid.split("-")
            if int(n):
                assert (mid, f"{t}-{int(n) - 1}") in edges


def test_lock_is_released_by_a_killed_owner(tmp_path: Path) -> None:
    root = tmp_path / "d"
    d = crashdriver.Driver(root, NO_CKPT)
    d.ready()
    from engram.datadir import read_owner
    from engram.errors import DataDirLocked

    owner = read_owner(root)
    assert owner is not None and owner["pid"] == d.proc.pid
    with pytest.raises(DataDirLocked) as ei:
        Engine.open(root)
    assert str(d.proc.pid) in str(ei.value)
    d.kill()
    assert read_owner(root) is None
    Engine.open(root).close()


def test_files_and_dirs_are_private(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    with Engine.open(root) as e:
        e.apply(batch(0))
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        if p.is_dir():
            assert mode == 0o700, p
        else:
            assert mode & 0o077 == 0, (p, oct(mode))


def test_replayed_records_are_made_durable_before_the_warm_tier_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "d"
    crashed(root, 5)
    events: list[str] = []
    real_fsync = os.fsync

    def tracing_fsync(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    from engram.tiers.warm import WarmTier

    real_commit = WarmTier.commit

    def tracing_commit(self: WarmTier, applied: int, *a: object, **kw: object) -> None:
        events.append(f"commit {applied}")
        real_commit(self, applied, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", tracing_fsync)
    monkeypatch.setattr(WarmTier, "commit", tracing_commit)
    seg = str(last_segment(root))
    with Engine.open(root) as e:
        end = e.last_lsn
    first_commit = events.index(f"commit {end}")
    assert seg in events[:first_commit]


def test_lost_warm_tier_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with Engine.open(root, EngineConfig(segment_bytes=2048)) as e:
        for i in range(25):
            e.apply(batch(i))
        before = snapshot(e)
    for p in (root / "warm").iterdir():
        p.unlink()
    with Engine.open(root) as e:
        assert snapshot(e) == before
        assert e.digest.hex == e.recompute_digest().hex


def test_warm_tier_of_another_database_is_refused(tmp_path: Path) -> None:
    root, other = tmp_path / "d", tmp_path / "other"
    for r in (root, other):
        with Engine.open(r) as e:
            e.apply(batch(0))
    shutil.copy(other / "warm" / "engram.db", root / "warm" / "engram.db")
    for suffix in ("-wal", "-shm"):
        (root / "warm" / f"engram.db{suffix}").unlink(missing_ok=True)
    with pytest.raises(CorruptData) as ei:
        Engine.open(root)
    assert "belongs to database" in str(ei.value)


def test_interrupted_init_can_be_redone(tmp_path: Path) -> None:
    from engram.datadir import init_data_dir
    from engram.errors import DataDirError

    root = tmp_path / "d"
    for sub in ("oplog", "warm", "cold"):
        (root / sub).mkdir(parents=True)
    (root / ".identity.json.tmp-123").write_bytes(b"{")
    ident = init_data_dir(root)
    assert (root / "identity.json").is_file() and ident.database_id
    other = tmp_path / "other"
    (other / "warm").mkdir(parents=True)
    (other / "warm" / "data.bin").write_bytes(b"x")
    with pytest.raises(DataDirError):
        init_data_dir(other)  # a non-empty dir that is not engram's is still refused


def test_open_is_not_refused_because_of_an_owner_probe(tmp_path: Path) -> None:
    """read_owner() holds a shared lock for a moment; an open at that moment must not fail
    with 'in use by pid None'."""
    import fcntl
    import threading

    root = tmp_path / "d"
    Engine.open(root).close()
    fd = os.open(root / "engram.lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what read_owner() does
    t = threading.Timer(0.05, lambda: (fcntl.flock(fd, fcntl.LOCK_UN), os.close(fd)))
    t.start()
    try:
        Engine.open(root).close()
    finally:
        t.join()
