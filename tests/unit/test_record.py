"""Record and file-header codecs (engram.format.record)."""

from __future__ import annotations

import struct

import msgspec
import pytest

from engram.errors import CorruptLog
from engram.format import record as fmt
from engram.model import Edge, Memory, OpType


def _mem(mid: str = "m1") -> Memory:
    return Memory(mid, "hello wörld ✓", 0.25, {"k": [1, 2.5, "x"], "n": None}, 10, 20, 30, 4)


def test_record_round_trip_with_both_images() -> None:
    before = fmt.encode_image(_mem())
    after = fmt.encode_image(msgspec.structs.replace(_mem(), strength=1.0, updated_at=40))
    data = fmt.encode_record(7, 123456789, 5, True, OpType.UPDATE_MEMORY, "m1", before, after)
    blen, crc = fmt.unpack_frame(data, 0)
    assert blen == len(data) - fmt.FRAME_SIZE
    assert crc == fmt.crc32c(data[fmt.FRAME_SIZE :])
    rec = fmt.decode_body(data[fmt.FRAME_SIZE :])
    assert (rec.lsn, rec.ts_ns, rec.txid, rec.txn_end) == (7, 123456789, 5, True)
    assert rec.op is OpType.UPDATE_MEMORY
    assert rec.target == "m1"
    assert rec.before == before and rec.after == after
    assert rec.decode_before() == _mem()
    assert rec.decode_after().strength == 1.0
    assert fmt.record_bytes(rec) == data
    assert fmt.unpack_lsn(data[fmt.FRAME_SIZE :]) == 7


@pytest.mark.parametrize(
    ("op", "target", "before", "after"),
    [
        (OpType.CREATE_MEMORY, "m1", None, _mem()),
        (OpType.DELETE_MEMORY, "m1", _mem(), None),
        (OpType.CREATE_EDGE, "a|b|related", None, Edge("a", "b", "related", 0.5, 9)),
        (OpType.DELETE_EDGE, "a|b|k", Edge("a", "b", "k", -2.0, 9), None),
        (OpType.MARKER, "before-upgrade", None, {"name": "before-upgrade"}),
        (OpType.UPDATE_STRENGTH, "x" * 256, _mem("x" * 256), _mem("x" * 256)),
    ],
)
def test_every_op_round_trips(op: OpType, target: str, before: object, after: object) -> None:
    data = fmt.encode_record(
        1, 2, 1, False, op, target, fmt.encode_image(before), fmt.encode_image(after)
    )
    rec = fmt.decode_body(data[fmt.FRAME_SIZE :])
    assert rec.op is op and rec.target == target and rec.txn_end is False
    assert rec.decode_before() == before
    assert rec.decode_after() == after
    # An absent image is None, not empty bytes: the flags say which images exist.
    assert (rec.before is None) == (before is None)
    assert (rec.after is None) == (after is None)


def test_empty_image_is_distinct_from_absent() -> None:
    data = fmt.encode_record(1, 2, 1, True, OpType.MARKER, "t", b"", None)
    rec = fmt.decode_body(data[fmt.FRAME_SIZE :])
    assert rec.before == b"" and rec.after is None


def test_body_with_inconsistent_lengths_is_refused() -> None:
    data = bytearray(fmt.encode_record(1, 2, 1, True, OpType.MARKER, "t", None, b"\x80"))
    body = data[fmt.FRAME_SIZE :]
    with pytest.raises(ValueError):
        fmt.decode_body(bytes(body) + b"x")
    struct.pack_into("<H", body, 26, 200)  # target_len beyond the body
    with pytest.raises(ValueError):
        fmt.decode_body(bytes(body))


def test_unknown_op_is_refused() -> None:
    data = fmt.encode_record(1, 2, 1, True, 200, "t", None, None)
    with pytest.raises(ValueError):
        fmt.decode_body(data[fmt.FRAME_SIZE :])


# -- file headers ------------------------------------------------------------------------------

HEADER = {"database_id": "db-1", "first_lsn": 17, "base_digest": "ab" * 32}


def test_file_header_round_trip() -> None:
    data = fmt.encode_file_header(fmt.KIND_SEGMENT, HEADER) + b"records"
    kind, header, size = fmt.decode_file_header(data, "seg")
    assert kind == fmt.KIND_SEGMENT
    assert header == HEADER
    assert data[size:] == b"records"
    kind, _, _ = fmt.decode_file_header(fmt.encode_file_header(fmt.KIND_INCREMENTAL, HEADER), "x")
    assert kind == fmt.KIND_INCREMENTAL


def _header_error(data: bytes) -> CorruptLog:
    with pytest.raises(CorruptLog) as ei:
        fmt.decode_file_header(data, "0000000000000011.log")
    err = ei.value
    assert err.offset == 0 and err.segment == "0000000000000011.log"
    assert "\n" not in str(err)
    return err


def test_bad_magic() -> None:
    data = fmt.encode_file_header(fmt.KIND_SEGMENT, HEADER)
    assert "bad magic" in str(_header_error(b"XXXXXXXX" + data[8:]))


def test_bad_version() -> None:
    data = bytearray(fmt.encode_file_header(fmt.KIND_SEGMENT, HEADER))
    struct.pack_into("<H", data, 8, fmt.FORMAT_VERSION + 1)
    assert "version" in str(_header_error(bytes(data)))


def test_bad_header_crc() -> None:
    data = bytearray(fmt.encode_file_header(fmt.KIND_SEGMENT, HEADER))
    data[20] ^= 1  # inside the JSON
    assert "checksum" in str(_header_error(bytes(data)))


@pytest.mark.parametrize("cut", [0, 3, 15, 16, 40])
def test_truncated_header(cut: int) -> None:
    data = fmt.encode_file_header(fmt.KIND_SEGMENT, HEADER)
    msg = str(_header_error(data[:cut]))
    assert "short" in msg or "truncated" in msg


def test_header_without_database_id() -> None:
    data = fmt.encode_file_header(fmt.KIND_SEGMENT, {"first_lsn": 1})
    assert "database_id" in str(_header_error(data))


def test_header_length_field_is_bounded() -> None:
    data = bytearray(fmt.encode_file_header(fmt.KIND_SEGMENT, HEADER))
    struct.pack_into("<I", data, 12, 0xFFFFFFFF)
    assert "truncated" in str(_header_error(bytes(data)))


def test_segment_names_are_fixed_width_and_sort_by_lsn() -> None:
    lsns = [1, 9, 10, 255, 256, 1 << 40, (1 << 64) - 1]
    names = [fmt.segment_name(n) for n in lsns]
    assert all(len(n) == 20 for n in names)
    assert sorted(names) == names
    assert [fmt.parse_segment_name(n) for n in names] == lsns
    bad_names = (
        "1.log", "000000000000000g.log", "0000000000000001.lg", ".0000000000000001.log.tmp"
    )
    for bad in bad_names:
        assert fmt.parse_segment_name(bad) is None


def test_a_record_over_the_reader_limit_is_never_written() -> None:
    with pytest.raises(ValueError):
        fmt.encode_record(1, 1, 1, True, OpType.MARKER, "t", None, b"x" * fmt.MAX_RECORD)
