"""`verify`'s checks of memory rows and their share of the digest, over a rowid range.

Pure and self-contained so that ``rowsum.split_scan`` can run it in helper processes
(``python -m engram.backup.rowcheck DATABASE LO HI`` prints a ``RowScan`` as JSON) while the
verifier scans the first range itself.
"""

from __future__ import annotations

import math
import sqlite3
import sys
import time
from collections.abc import Callable

import msgspec

from engram import digest as dg
from engram.model import ID_RE, Memory
from engram.tiers.rowsum import helper_main, rows_in

MAX_LISTED = 100
_json_obj = msgspec.json.Decoder(dict)


class RowScan(msgspec.Struct):
    """What a scan of a range found: rows read, the digest share of the rows that decode
    (hex), rows that cannot be hashed, problems found and the first ``MAX_LISTED`` of them as
    (location, message)."""

    rows: int = 0
    hash_hex: str = "0"
    undecodable: int = 0
    problems: int = 0
    listed: list[tuple[str, str]] = msgspec.field(default_factory=list)
    hash_seconds: float = 0.0

    @property
    def hash_sum(self) -> int:
        return int(self.hash_hex, 16)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(RowScan).decode


def loc_id(kind: str, value: object) -> str:
    # Odd ids (spaces, control characters, non-strings) are shown quoted so the line stays readable.
    if isinstance(value, str) and ID_RE.fullmatch(value):
        return f"{kind} {value}"
    return f"{kind} {value!r}"


def check_memory_row(r: tuple, problem: Callable[[str, str], None]) -> Memory | None:
    """The memory of warm-tier row ``r`` if it can be hashed; every rule it breaks goes to
    ``problem(location, message)``."""
    mid, content, strength, meta, created, updated, activated, count = r

    def bad(message: str) -> None:  # the location string is built only for a problem
        problem(loc_id("memory", mid), message)

    if not isinstance(mid, str) or not ID_RE.fullmatch(mid):
        bad("id does not follow the id rule (1-256 of A-Za-z0-9-_.:@/)")
    if not isinstance(content, str):
        bad(f"content is {type(content).__name__}, not text")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        bad(f"strength {strength!r} is not a number")
    elif not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        bad(f"strength {strength!r} is outside [0, 1]")
    if not isinstance(count, int) or count < 0:
        bad(f"activation_count {count!r} is not a count >= 0")
    for name, v in (("created_at", created), ("updated_at", updated)):
        if not isinstance(v, int) or v < 0:
            bad(f"{name} {v!r} is not a timestamp")
    if not isinstance(activated, int) or activated < 0:
        bad(f"last_activated_at {activated!r} is not a timestamp")
    try:
        metadata = _json_obj.decode(meta) if isinstance(meta, (str, bytes)) else None
    except (msgspec.DecodeError, msgspec.ValidationError):
        metadata = None
    if metadata is None:
        bad("metadata is not a JSON object")
        return None
    return Memory(mid, content, strength, metadata, created, updated, activated, count)


def scan(conn: sqlite3.Connection, lo: int | None = None, hi: int | None = None) -> RowScan:
    """Check and hash the memory rows with ``lo <= rowid <= hi`` (all if None)."""
    res = RowScan()

    def problem(location: str, message: str) -> None:
        res.problems += 1
        if len(res.listed) < MAX_LISTED:
            res.listed.append((location, message))

    total = 0
    cur = rows_in(conn, lo, hi)
    while rows := cur.fetchmany(5000):
        res.rows += len(rows)
        valid: list[Memory] = []
        for r in rows:
            m = check_memory_row(r, problem)
            if m is None:
                res.undecodable += 1
            else:
                valid.append(m)
        t = time.perf_counter()
        for m in valid:
            total += dg.memory_hash(m)
        res.hash_seconds += time.perf_counter() - t
    res.hash_hex = format(total % dg.MOD, "x")
    return res


def decode(out: bytes) -> RowScan:
    return _decode(out)


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:], lambda c, a, b: _encode(scan(c, a, b))))
