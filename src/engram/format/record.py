"""Op-log framing: file headers and records (docs/FORMAT.md). Codecs only, no I/O.

A log file (segment or incremental backup) is::

    magic "ENGRAMLG" | u16 version | u16 kind | u32 header_len | header (JSON) | u32 crc32c

followed by records::

    u32 body_len | u32 crc32c(body) | body
    body = <QQQBBHII lsn, ts_ns, txid, flags, op, target_len, before_len, after_len>
           | target (utf-8) | before (msgpack) | after (msgpack)

All integers little-endian. ``flags``: bit 0 ends a transaction, bit 1 a before image is present,
bit 2 an after image is present.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc
import msgspec

from engram.errors import CorruptLog
from engram.model import Edge, Memory, OpType

MAGIC = b"ENGRAMLG"
FORMAT_VERSION = 1
KIND_SEGMENT = 1
KIND_INCREMENTAL = 2

_FILE_PREFIX = struct.Struct("<8sHHI")
_U32 = struct.Struct("<I")
_FRAME = struct.Struct("<II")
_BODY = struct.Struct("<QQQBBHII")
FRAME_SIZE = _FRAME.size
BODY_FIXED = _BODY.size
MAX_RECORD = 64 << 20

F_TXN_END = 1
F_BEFORE = 2
F_AFTER = 4


def crc32c(data: bytes | memoryview) -> int:
    return _crc.crc32c(data)


@dataclass(frozen=True, slots=True)
class Record:
    lsn: int
    ts_ns: int
    txid: int
    txn_end: bool
    op: OpType
    target: str
    before: bytes | None  # msgpack image
    after: bytes | None
    raw: bytes | None = field(default=None, compare=False, repr=False)  # the framed record as read

    def decode_before(self) -> Any:
        return decode_image(self.op, self.before)

    def decode_after(self) -> Any:
        return decode_image(self.op, self.after)


_mem_dec = msgspec.msgpack.Decoder(Memory)
_edge_dec = msgspec.msgpack.Decoder(Edge)
_any_dec = msgspec.msgpack.Decoder()
_enc = msgspec.msgpack.Encoder()


def encode_image(obj: Any) -> bytes | None:
    if obj is None:
        return None
    return _enc.encode(obj)


def decode_image(op: OpType, data: bytes | None) -> Any:
    if data is None:
        return None
    if op in (
        OpType.CREATE_MEMORY,
        OpType.UPDATE_MEMORY,
        OpType.UPDATE_STRENGTH,
        OpType.DELETE_MEMORY,
    ):
        return _mem_dec.decode(data)
    if op in (OpType.CREATE_EDGE, OpType.DELETE_EDGE):
        return _edge_dec.decode(data)
    return _any_dec.decode(data)


def encode_record(
    lsn: int,
    ts_ns: int,
    txid: int,
    txn_end: bool,
    op: int,
    target: str,
    before: bytes | None,
    after: bytes | None,
) -> bytes:
    t = target.encode("utf-8")
    flags = (F_TXN_END if txn_end else 0) | (F_BEFORE if before is not None else 0)
    flags |= F_AFTER if after is not None else 0
    b = before or b""
    a = after or b""
    body = _BODY.pack(lsn, ts_ns, txid, flags, op, len(t), len(b), len(a)) + t + b + a
    if len(body) > MAX_RECORD:
        # The reader refuses such a record as damage: never write one.
        raise ValueError(f"record of {len(body)} bytes is over the {MAX_RECORD}-byte limit")
    return _FRAME.pack(len(body), crc32c(body)) + body


def decode_body(body: bytes | memoryview, raw: bytes | None = None) -> Record:
    lsn, ts, txid, flags, op, tl, bl, al = _BODY.unpack_from(body, 0)
    if BODY_FIXED + tl + bl + al != len(body):
        raise ValueError("record field lengths do not add up to the body length")
    p = BODY_FIXED
    target = bytes(body[p : p + tl]).decode("utf-8")
    p += tl
    before = bytes(body[p : p + bl]) if flags & F_BEFORE else None
    p += bl
    after = bytes(body[p : p + al]) if flags & F_AFTER else None
    return Record(lsn, ts, txid, bool(flags & F_TXN_END), OpType(op), target, before, after, raw)


def record_bytes(r: Record) -> bytes:
    if r.raw is not None:  # verified when read: copy it as it is
        return r.raw
    return encode_record(r.lsn, r.ts_ns, r.txid, r.txn_end, r.op, r.target, r.before, r.after)


def encode_file_header(kind: int, header: dict[str, Any]) -> bytes:
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head = _FILE_PREFIX.pack(MAGIC, FORMAT_VERSION, kind, len(h)) + h
    return head + _U32.pack(crc32c(head))


def decode_file_header(data: bytes, name: str) -> tuple[int, dict[str, Any], int]:
    """Parse a log file header; returns (kind, header, header_size)."""
    if len(data) < _FILE_PREFIX.size:
        raise CorruptLog(f"{name}: too short to be an engram log file", segment=name, offset=0)
    magic, version, kind, hl = _FILE_PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptLog(f"{name}: not an engram log file (bad magic)", segment=name, offset=0)
    if version != FORMAT_VERSION:
        raise CorruptLog(
            f"{name}: log format version {version} is not supported (this engram reads "
            f"{FORMAT_VERSION}); use a matching engram version",
            segment=name,
            offset=0,
        )
    end = _FILE_PREFIX.size + hl
    if hl > 1 << 20 or len(data) < end + 4:
        raise CorruptLog(f"{name}: header is truncated", segment=name, offset=0)
    (crc,) = _U32.unpack_from(data, end)
    if crc != crc32c(data[:end]):
        raise CorruptLog(f"{name}: header checksum mismatch", segment=name, offset=0)
    try:
        header = json.loads(data[_FILE_PREFIX.size : end])
    except ValueError:
        raise CorruptLog(f"{name}: header is not valid JSON", segment=name, offset=0) from None
    if not isinstance(header, dict) or "database_id" not in header:
        raise CorruptLog(f"{name}: header lacks database_id", segment=name, offset=0)
    return kind, header, end + 4


def max_header_size() -> int:
    return _FILE_PREFIX.size + (1 << 20) + 4


def unpack_frame(buf: bytes | memoryview, off: int) -> tuple[int, int]:
    return _FRAME.unpack_from(buf, off)


_HEAD = struct.Struct("<QQQ")


def unpack_head(body: bytes | memoryview) -> tuple[int, int, int]:
    """(lsn, ts_ns, txid) of a record body without decoding the rest."""
    return _HEAD.unpack_from(body, 0)  # type: ignore[return-value]


def unpack_lsn(body: bytes | memoryview) -> int:
    """The LSN of a record body (its first field) without decoding the rest."""
    return int(_BODY.unpack_from(body, 0)[0])


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:016x}.log"


def parse_segment_name(name: str) -> int | None:
    if len(name) != 20 or not name.endswith(".log"):
        return None
    try:
        return int(name[:16], 16)
    except ValueError:
        return None
