"""The log reader: verify every record, cut a torn tail only at the end of the last segment,
refuse damage anywhere else with the segment and offset named (DESIGN O2, O5)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.errors import CorruptLog, ForeignLog, LogGap
from engram.format import record as fmt
from engram.model import Memory, OpType
from engram.oplog.reader import LogFile, iter_log_files, list_segments

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _load_fixture_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MF = _load_fixture_module()
DB = MF.DB_ID


def build(txn_sizes: list[int], first_lsn: int = 1, db: str = DB) -> tuple[bytes, list[tuple]]:
    """A segment with one transaction per entry of ``txn_sizes``; also returns, per record,
    (offset, end, lsn, txn_index)."""
    data = bytearray(MF.header(db, first_lsn))
    index = []
    lsn = first_lsn
    for t, size in enumerate(txn_sizes):
        txid = lsn
        for i in range(size):
            m = Memory(f"m{lsn}", "x" * (lsn % 7), 0.5, {}, lsn, lsn, 0, 0)
            rec = fmt.encode_record(
                lsn, 1000 + t, txid, i == size - 1, OpType.CREATE_MEMORY, m.id, None,
                fmt.encode_image(m),
            )
            index.append((len(data), len(data) + len(rec), lsn, t))
            data += rec
            lsn += 1
    return bytes(data), index


def write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def lsns(lf: LogFile, allow_torn_tail: bool) -> list[int]:
    return [r.lsn for r in lf.records(allow_torn_tail)]


# -- the committed fixtures --------------------------------------------------------------------


def test_committed_fixtures_match_the_generator() -> None:
    built = MF.fixtures()
    on_disk = {p.name for p in (FIXTURES / "segments").iterdir()}
    assert on_disk == set(built), "run tests/fixtures/make_fixtures.py"
    for name, (data, _) in built.items():
        assert (FIXTURES / "segments" / name).read_bytes() == data, name


@pytest.mark.parametrize("name", sorted(MF.fixtures()))
def test_fixture_as_last_segment(name: str) -> None:
    path = FIXTURES / "segments" / name
    kind, expect_lsns, *rest = MF.fixtures()[name][1]
    if kind == "header":
        with pytest.raises(CorruptLog) as ei:
            LogFile.open(path)
        assert ei.value.offset == 0 and name in str(ei.value)
        return
    lf = LogFile.open(path)
    got: list[int] = []
    if kind == "corrupt":
        with pytest.raises(CorruptLog) as ei:
            for r in lf.records(allow_torn_tail=True):
                got.append(r.lsn)
        err = ei.value
        assert err.offset == rest[0]
        assert name in str(err) and f"offset {rest[0]}" in str(err)
        assert "\n" not in str(err)
        assert got == expect_lsns
        return
    got = lsns(lf, allow_torn_tail=True)
    assert got == expect_lsns
    if kind == "torn":
        assert lf.torn is not None and lf.torn.offset == rest[0]
        assert lf.valid_end == rest[0]
    else:
        assert lf.torn is None and lf.valid_end == len(lf.data)
    assert lf.last_lsn == expect_lsns[-1]


@pytest.mark.parametrize(
    "name", sorted(n for n, (_, e) in MF.fixtures().items() if e[0] in ("torn", "corrupt"))
)
def test_fixture_damage_in_a_non_last_segment_is_refused(name: str) -> None:
    kind, expect_lsns, offset = MF.fixtures()[name][1]
    lf = LogFile.open(FIXTURES / "segments" / name)
    got: list[int] = []
    with pytest.raises(CorruptLog) as ei:
        for r in lf.records(allow_torn_tail=False):
            got.append(r.lsn)
    assert ei.value.offset == offset
    assert ei.value.segment == str(FIXTURES / "segments" / name)
    assert f"{name}: " in str(ei.value) and "\n" not in str(ei.value)
    assert got == expect_lsns


# -- records of one file -----------------------------------------------------------------------


def test_every_record_is_yielded_and_counted(tmp_path: Path) -> None:
    data, index = build([1, 3, 2, 1], first_lsn=40)
    lf = LogFile.open(write(tmp_path, "s.log", data))
    recs = list(lf.records())
    assert [r.lsn for r in recs] == list(range(40, 47))
    assert [r.txn_end for r in recs] == [True, False, False, True, False, True, True]
    assert (lf.first_lsn, lf.last_lsn, lf.count, lf.valid_end) == (40, 46, 7, len(data))
    assert lf.database_id == DB


def test_verify_then_records_gives_the_same_answer(tmp_path: Path) -> None:
    data, _ = build([2, 2])
    lf = LogFile.open(write(tmp_path, "s.log", data + b"\x01\x02"))
    lf.verify(allow_torn_tail=True)
    first = (lf.first_lsn, lf.last_lsn, lf.count, lf.valid_end, lf.torn)
    assert lsns(lf, allow_torn_tail=True) == [1, 2, 3, 4]
    assert (lf.first_lsn, lf.last_lsn, lf.count, lf.valid_end, lf.torn) == first


def test_header_only_segment_is_empty(tmp_path: Path) -> None:
    lf = LogFile.open(write(tmp_path, "s.log", MF.header(DB, 5)))
    assert lsns(lf, False) == [] and lf.last_lsn is None and lf.valid_end == len(lf.data)


def test_lsn_discontinuity_inside_a_file(tmp_path: Path) -> None:
    d1, idx = build([1, 1])
    d2, _ = build([1], first_lsn=9)
    data = d1 + d2[len(MF.header(DB, 9)) :]
    lf = LogFile.open(write(tmp_path, "s.log", data))
    with pytest.raises(CorruptLog) as ei:
        list(lf.records(allow_torn_tail=True))
    assert ei.value.offset == idx[-1][1] and "LSN 9 follows 2" in str(ei.value)


def test_timestamps_never_go_backwards(tmp_path: Path) -> None:
    data = bytearray(MF.header(DB, 1))
    data += fmt.encode_record(1, 50, 1, True, OpType.MARKER, "a", None, None)
    off = len(data)
    data += fmt.encode_record(2, 49, 2, True, OpType.MARKER, "b", None, None)
    lf = LogFile.open(write(tmp_path, "s.log", bytes(data)))
    with pytest.raises(CorruptLog) as ei:
        list(lf.records(allow_torn_tail=True))
    assert ei.value.offset == off and "backwards" in str(ei.value)


def test_transaction_without_end_followed_by_another(tmp_path: Path) -> None:
    data = bytearray(MF.header(DB, 1))
    data += fmt.encode_record(1, 1, 1, False, OpType.MARKER, "a", None, None)
    off = len(data)
    data += fmt.encode_record(2, 1, 2, True, OpType.MARKER, "b", None, None)
    lf = LogFile.open(write(tmp_path, "s.log", bytes(data)))
    with pytest.raises(CorruptLog) as ei:
        list(lf.records(allow_torn_tail=True))
    assert ei.value.offset == off and "no end marker" in str(ei.value)


def test_unreadable_file_is_corrupt_log(tmp_path: Path) -> None:
    with pytest.raises(CorruptLog) as ei:
        LogFile.open(tmp_path / "missing.log")
    assert "missing.log" in str(ei.value)


# -- properties: any truncation is a clean cut, any flipped byte is caught ---------------------

SEG, SEG_INDEX = build([1, 3, 1, 2, 1, 1])
HSIZE = len(MF.header(DB, 1))


def _whole_txns_before(offset: int) -> list[int]:
    """LSNs of the transactions that end at or before ``offset``."""
    ends: dict[int, int] = {}
    for _, end, _, t in SEG_INDEX:
        ends[t] = end
    return [lsn for _, _, lsn, t in SEG_INDEX if ends[t] <= offset]


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=HSIZE, max_value=len(SEG)), zeros=st.integers(0, 600))
def test_any_truncation_of_the_last_segment_is_cut_cleanly(
    tmp_path_factory: pytest.TempPathFactory, cut: int, zeros: int
) -> None:
    path = tmp_path_factory.mktemp("t") / "s.log"
    data = SEG[:cut] + bytes(zeros)  # a crash: a prefix, maybe zero-filled blocks
    path.write_bytes(data)
    lf = LogFile.open(path)
    got = [r.lsn for r in lf.records(allow_torn_tail=True)]
    # The zeros may happen to equal the bytes they replace (msgpack encodes 0 as 0x00).
    same = next((i for i in range(min(len(data), len(SEG))) if data[i] != SEG[i]), len(SEG))
    expect = _whole_txns_before(min(same, len(data)))
    assert got == expect
    valid_end = max([e for _, e, lsn, _ in SEG_INDEX if lsn in expect], default=HSIZE)
    assert lf.valid_end == valid_end
    assert (lf.torn is None) == (valid_end == len(data))
    if lf.torn is not None:
        assert lf.torn.offset == valid_end
        # The same file as a non-last segment is damage.
        with pytest.raises(CorruptLog):
            LogFile.open(path).verify(allow_torn_tail=False)


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(min_value=HSIZE, max_value=len(SEG) - 1), bit=st.integers(0, 7))
def test_a_flipped_bit_never_passes_and_never_loses_later_records(
    tmp_path_factory: pytest.TempPathFactory, pos: int, bit: int
) -> None:
    data = bytearray(SEG)
    data[pos] ^= 1 << bit
    path = tmp_path_factory.mktemp("f") / "s.log"
    path.write_bytes(bytes(data))
    damaged_txn = next(t for off, end, _, t in SEG_INDEX if off <= pos < end)
    last_txn = SEG_INDEX[-1][3]
    lf = LogFile.open(path)
    try:
        got = [r.lsn for r in lf.records(allow_torn_tail=True)]
    except CorruptLog as e:
        assert e.offset is not None and "\n" not in str(e)
        return
    # Forgiven only as a torn tail: the damage is in the last transaction, which is dropped.
    assert damaged_txn == last_txn
    assert got == [lsn for _, _, lsn, t in SEG_INDEX if t < last_txn]
    assert lf.torn is not None


# -- several files -----------------------------------------------------------------------------


def test_files_in_sequence(tmp_path: Path) -> None:
    a, _ = build([2, 1], first_lsn=1)
    b, _ = build([1, 2], first_lsn=4)
    files = [write(tmp_path, "a.log", a), write(tmp_path, "b.log", b)]
    assert [r.lsn for r in iter_log_files(files, DB)] == list(range(1, 7))
    assert [r.lsn for r in iter_log_files(files, DB, after_lsn=3)] == [4, 5, 6]
    opened: list[LogFile] = []
    assert [r.lsn for r in iter_log_files(files, None, after_lsn=6, opened=opened)] == []
    assert len(opened) == 2


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    a, _ = build([1])
    b, _ = build([1], first_lsn=2, db=MF.OTHER_DB_ID)
    files = [write(tmp_path, "a.log", a), write(tmp_path, "b.log", b)]
    with pytest.raises(ForeignLog) as ei:
        list(iter_log_files(files, DB))
    assert MF.OTHER_DB_ID in str(ei.value) and "b.log" in str(ei.value)


def test_gap_between_files_names_the_missing_range(tmp_path: Path) -> None:
    a, _ = build([1, 1], first_lsn=1)
    b, _ = build([1], first_lsn=6)
    files = [write(tmp_path, "a.log", a), write(tmp_path, "b.log", b)]
    got = []
    with pytest.raises(LogGap) as ei:
        for r in iter_log_files(files, DB):
            got.append(r.lsn)
    assert got == [1, 2]
    assert "3..5" in str(ei.value) and "b.log" in str(ei.value)
    assert ei.value.details["missing_from"] == 3 and ei.value.details["missing_to"] == 5


def test_gap_before_the_first_file(tmp_path: Path) -> None:
    b, _ = build([1], first_lsn=6)
    with pytest.raises(LogGap) as ei:
        list(iter_log_files([write(tmp_path, "b.log", b)], DB, after_lsn=2))
    assert "3..5" in str(ei.value)


def test_overlapping_files_skip_records_already_seen(tmp_path: Path) -> None:
    a, _ = build([1, 2, 1, 1], first_lsn=1)  # 1..5
    b, _ = build([1, 1, 1, 1, 1, 1], first_lsn=3)  # 3..8
    c, _ = build([1], first_lsn=2)  # entirely old
    files = [write(tmp_path, n, d) for n, d in (("a.log", a), ("c.log", c), ("b.log", b))]
    assert [r.lsn for r in iter_log_files(files, DB)] == list(range(1, 9))


def test_torn_tail_is_forgiven_only_in_the_last_file(tmp_path: Path) -> None:
    a, _ = build([1, 1], first_lsn=1)
    b, _ = build([1], first_lsn=3)
    pa = write(tmp_path, "a.log", a + b"\x07\x00")
    pb = write(tmp_path, "b.log", b + b"\x07\x00")
    opened: list[LogFile] = []
    with pytest.raises(CorruptLog) as ei:
        list(iter_log_files([pa, pb], DB, torn_tail_last=True))
    assert ei.value.segment == str(pa)
    got = [r.lsn for r in iter_log_files([write(tmp_path, "a2.log", a), pb], DB,
                                         torn_tail_last=True, opened=opened)]
    assert got == [1, 2, 3]
    assert opened[-1].torn is not None and opened[-1].valid_end == len(b)


def test_list_segments_ignores_other_files(tmp_path: Path) -> None:
    for name in ("0000000000000010.log", "0000000000000002.log", ".0000000000000020.log.tmp",
                 "notes.txt", "00000000000000zz.log"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "0000000000000030.log").mkdir()
    assert [(f, p.name) for f, p in list_segments(tmp_path)] == [
        (2, "0000000000000002.log"),
        (16, "0000000000000010.log"),
    ]
    assert list_segments(tmp_path / "absent") == []
