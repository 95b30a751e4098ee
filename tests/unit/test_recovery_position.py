"""Open reads what is unapplied (docs/FORMAT.md "Reading and recovery"): the warm tier records,
with applied_lsn, where the transaction holding it starts in its segment; recovery reads from
there once the record at that offset proves it, and reads the segment from its start otherwise.
The crash checks (torn tail, damage named with segment and offset) hold either way."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

import crashdriver
from engram import digest as dg
from engram.backup.verify import verify_data_dir
from engram.backup.verify.report import render_text
from engram.errors import CorruptLog
from engram.format import record as fmt
from engram.graph import Engine, EngineConfig
from engram.oplog.reader import LogFile, list_segments
from engram.oplog.writer import LogWriter
from engram.recovery import LOG_POSITION, LogPosition, log_position

NO_CKPT = {"checkpoint_interval": 3600.0, "checkpoint_ops": 10**9}


def put(e: Engine, i: int, n: int = 3) -> None:
    e.apply([{"op": "create_memory", "id": f"m{i}-{j}", "content": f"memory {i} {j}"}
             for j in range(n)])


def meta(root: Path, key: str) -> str | None:
    conn = sqlite3.connect(f"file:{root / 'warm' / 'engram.db'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None
    finally:
        conn.close()


def set_meta(root: Path, key: str, value: str | None) -> None:
    conn = sqlite3.connect(root / "warm" / "engram.db")
    try:
        if value is None:
            conn.execute("DELETE FROM meta WHERE key=?", (key,))
        else:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        conn.commit()
    finally:
        conn.close()


def records(path: Path) -> list[tuple[int, int, int]]:
    """(offset, end, lsn) of each record of a log file."""
    lf = LogFile.open(path)
    out, off = [], lf.header_size
    while off < len(lf.data):
        blen, _ = fmt.unpack_frame(lf.data, off)
        end = off + fmt.FRAME_SIZE + blen
        out.append((off, end, fmt.unpack_lsn(lf.data[off + fmt.FRAME_SIZE : end])))
        off = end
    return out


def closed_store(root: Path, batches: int = 20) -> dict:
    with Engine.open(root, EngineConfig(**NO_CKPT)) as e:
        for i in range(batches):
            put(e, i)
        state = e.stats()
    return state


def test_a_checkpoint_records_where_the_last_transaction_starts(tmp_path: Path) -> None:
    root = tmp_path / "d"
    state = closed_store(root)
    pos = LogPosition.from_meta(meta(root, LOG_POSITION))
    assert pos is not None and pos.at == state["lsn"]
    first, seg = list_segments(root / "oplog")[-1]
    assert pos.segment == first
    # The last transaction: three records, the last of which is applied_lsn.
    assert pos.lsn == state["lsn"] - 2
    assert (pos.offset, pos.lsn) in {(off, lsn) for off, _, lsn in records(seg)}


def test_open_does_not_read_the_applied_records_before_the_position(tmp_path: Path) -> None:
    root = tmp_path / "d"
    state = closed_store(root)
    seg = list_segments(root / "oplog")[-1][1]
    off, _, _ = records(seg)[2]  # an applied record well before the position
    data = bytearray(seg.read_bytes())
    data[off + fmt.FRAME_SIZE + 3] ^= 0x10
    seg.write_bytes(bytes(data))
    with Engine.open(root) as e:  # open reads only from the position on
        assert e.stats()["lsn"] == state["lsn"]
        assert e.digest.hex == state["digest"] == e.recompute_digest().hex
    # A scan of every record is verify's: it names the damage.
    report = verify_data_dir(root)
    text = render_text(report)
    assert not report.ok, text
    assert seg.name in text and str(off) in text, text


def test_unapplied_records_after_the_position_are_replayed(tmp_path: Path) -> None:
    root = tmp_path / "d"
    d = crashdriver.Driver(root, {**NO_CKPT, "checkpoint_ops": 12})
    d.ready()
    acks = [d.call([{"op": "create_memory", "id": f"m{i}", "content": "x"}]) for i in range(30)]
    assert d.kill() == []
    applied = LogPosition.from_meta(meta(root, LOG_POSITION))
    assert applied is not None and applied.at < acks[-1]["lsn"]
    with Engine.open(root) as e:
        assert e.last_lsn == acks[-1]["lsn"]
        assert e.digest.hex == acks[-1]["digest"] == e.recompute_digest().hex
    # Recovery recorded where the next open starts: the log's last transaction.
    pos = LogPosition.from_meta(meta(root, LOG_POSITION))
    assert pos is not None and (pos.at, pos.lsn) == (acks[-1]["lsn"], acks[-1]["lsn"])


def test_a_torn_tail_after_the_position_is_cut_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "d"
    d = crashdriver.Driver(root, {**NO_CKPT, "checkpoint_ops": 6})
    d.ready()
    acks = [d.call([{"op": "create_memory", "id": f"m{i}", "content": "x"},
                    {"op": "create_memory", "id": f"n{i}", "content": "y"}]) for i in range(10)]
    assert d.kill() == []
    assert LogPosition.from_meta(meta(root, LOG_POSITION)) is not None
    seg = list_segments(root / "oplog")[-1][1]
    off, end, _ = records(seg)[-1]
    seg.write_bytes(seg.read_bytes()[: off + (end - off) // 2])  # the last write, torn
    with caplog.at_level(logging.WARNING, logger="engram"), Engine.open(root) as e:
        assert e.last_lsn == acks[-2]["lsn"]
        assert e.digest.hex == acks[-2]["digest"] == e.recompute_digest().hex
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(seg.name in w and "torn tail" in w for w in warnings), warnings


def test_damage_after_the_position_is_named_with_segment_and_offset(tmp_path: Path) -> None:
    root = tmp_path / "d"
    d = crashdriver.Driver(root, {**NO_CKPT, "checkpoint_ops": 6})
    d.ready()
    for i in range(10):
        d.call([{"op": "create_memory", "id": f"m{i}", "content": "x"}])
    d.kill()
    pos = LogPosition.from_meta(meta(root, LOG_POSITION))
    assert pos is not None
    seg = list_segments(root / "oplog")[-1][1]
    off = next(o for o, _, lsn in records(seg) if lsn == pos.at + 2)
    data = bytearray(seg.read_bytes())
    data[off + fmt.FRAME_SIZE + 3] ^= 0x10
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as ei:
        Engine.open(root)
    assert seg.name in str(ei.value) and f"offset {off}" in str(ei.value)
    assert ei.value.offset == off  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "how", ["mid_record", "wrong_lsn", "past_the_end", "inside_header", "damaged_record"]
)
def test_a_position_that_does_not_hold_its_record_is_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    root = tmp_path / "d"
    state = closed_store(root)
    pos = LogPosition.from_meta(meta(root, LOG_POSITION))
    assert pos is not None
    seg = list_segments(root / "oplog")[-1][1]
    if how == "mid_record":
        bad = LogPosition(pos.at, pos.segment, pos.offset + 5, pos.lsn)
    elif how == "wrong_lsn":
        earlier = records(seg)[3]
        bad = LogPosition(pos.at, pos.segment, earlier[0], pos.lsn)
    elif how == "past_the_end":
        bad = LogPosition(pos.at, pos.segment, seg.stat().st_size + 100, pos.lsn)
    elif how == "inside_header":
        bad = LogPosition(pos.at, pos.segment, 3, pos.lsn)
    else:
        bad = pos
        data = bytearray(seg.read_bytes())
        data[pos.offset + fmt.FRAME_SIZE + 3] ^= 0x10
        seg.write_bytes(bytes(data))
    set_meta(root, LOG_POSITION, bad.to_meta())
    if how == "damaged_record":
        # Read from the segment's start instead, which names the damage as it always did.
        with pytest.raises(CorruptLog) as ei:
            Engine.open(root)
        assert seg.name in str(ei.value) and f"offset {pos.offset}" in str(ei.value)
        return
    with caplog.at_level(logging.WARNING, logger="engram"), Engine.open(root) as e:
        assert e.stats()["lsn"] == state["lsn"]
        assert e.digest.hex == state["digest"] == e.recompute_digest().hex
    if how not in ("past_the_end", "inside_header"):
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("log position" in w for w in warnings), warnings
    # The open put a true position back.
    assert LogPosition.from_meta(meta(root, LOG_POSITION)) == pos


def test_a_data_dir_without_a_position_opens_and_gets_one(tmp_path: Path) -> None:
    root = tmp_path / "d"
    state = closed_store(root)
    want = meta(root, LOG_POSITION)
    set_meta(root, LOG_POSITION, None)  # as written before positions were recorded
    with Engine.open(root) as e:
        assert e.stats()["lsn"] == state["lsn"]
        assert e.digest.hex == state["digest"]
    assert meta(root, LOG_POSITION) == want


def test_a_position_of_another_applied_lsn_is_ignored(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with Engine.open(root, EngineConfig(segment_bytes=2048, **NO_CKPT)) as e:
        for i in range(10):
            put(e, i)
            if i == 4:
                e.checkpoint()
                old = meta(root, LOG_POSITION)
        state = e.stats()
    assert len(list_segments(root / "oplog")) > 1
    assert old is not None and meta(root, LOG_POSITION) != old
    set_meta(root, LOG_POSITION, old)  # a position left by an older applied_lsn
    with Engine.open(root) as e:
        assert e.stats()["lsn"] == state["lsn"] and e.digest.hex == state["digest"]


@pytest.mark.parametrize(
    "text",
    [None, "", "garbage", "[]", "{}", '{"at": 5, "segment": 1, "offset": 40}',
     '{"at": 5, "segment": 1, "offset": 40, "lsn": 6}',  # lsn after at
     '{"at": 5, "segment": 0, "offset": 40, "lsn": 3}',
     '{"at": 5, "segment": 4, "offset": 40, "lsn": 3}',  # lsn before its segment
     '{"at": 5, "segment": 1, "offset": -1, "lsn": 3}',
     '{"at": "x", "segment": 1, "offset": 40, "lsn": 3}'],
)
def test_bad_position_meta_is_not_a_position(text: str | None) -> None:
    assert LogPosition.from_meta(text) is None


def test_position_meta_round_trips() -> None:
    pos = LogPosition(at=9, segment=4, offset=123, lsn=7)
    assert LogPosition.from_meta(pos.to_meta()) == pos
    assert log_position(9, (4, 123, 7)) == pos.to_meta()
    assert log_position(6, (4, 123, 7)) is None  # a position must not be after applied_lsn
    assert log_position(9, None) is None


def test_writer_position_is_the_start_of_the_last_append(tmp_path: Path) -> None:
    w = LogWriter(tmp_path, "db", durability="none")
    w.start_segment(1, dg.EMPTY)
    assert w.position() is None  # nothing appended to this segment yet
    one = fmt.encode_record(1, 10, 1, True, 1, "a", None, b"\x90")
    two = b"".join(
        fmt.encode_record(lsn, 11, 2, lsn == 3, 1, "b", None, b"\x90") for lsn in (2, 3)
    )
    w.append(one, 1)
    seg = tmp_path / fmt.segment_name(1)
    hsize = LogFile.open(seg).header_size
    assert w.position() == (1, hsize, 1)
    w.append(two, 3)
    assert w.position() == (1, hsize + len(one), 2)
    w.start_segment(4, dg.EMPTY)
    assert w.position() is None
    w.close()
