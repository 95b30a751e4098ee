"""The rules a warm-tier memory row or edge row must follow (`verify`'s row checks), and the
scan of memory rows over a rowid range with their share of the digest (the hash of a row is
``digest``'s).

Self-contained so that ``rowscan.split_scan`` can run the memory scan in helper processes
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
from engram.backup.rowscan import helper_main
from engram.model import ID_RE, KIND_RE, Edge, Memory
from engram.tiers.warm import memory_rows

MAX_LISTED = 100
MODULE = "engram.backup.rowcheck"  # the helper entry point of the memory scan (file's end)
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


def check_edge_row(r: tuple, problem: Callable[[str, str], None]) -> tuple[Edge, bool]:
    """The edge of warm-tier row ``r`` (src, dst, kind, weight, created_at, whether src is
    missing, whether dst is missing: neither a memory nor an archived one) and whether it
    dangles; every rule it breaks goes to ``problem(location, message)``."""
    src, dst, kind, weight, created, no_src, no_dst = r
    loc = f"edge {src}->{dst} ({kind})"
    if no_src or no_dst:
        ends = [f"{w} {v!r}" for w, v, gone in (("src", src, no_src), ("dst", dst, no_dst)) if gone]
        problem(loc, " and ".join(ends) + " does not exist")
    if not isinstance(kind, str) or not KIND_RE.fullmatch(kind):
        problem(loc, "kind does not follow the kind rule")
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
    ):
        problem(loc, f"weight {weight!r} is not a finite number")
    if not isinstance(created, int):
        problem(loc, f"created_at {created!r} is not a timestamp")
    return Edge(src, dst, kind, weight, created), bool(no_src or no_dst)


def scan(conn: sqlite3.Connection, lo: int | None = None, hi: int | None = None) -> RowScan:
    """Check and hash the memory rows with ``lo <= rowid <= hi`` (all if None)."""
    res = RowScan()

    def problem(location: str, message: str) -> None:
        res.problems += 1
        if len(res.listed) < MAX_LISTED:
            res.listed.append((location, message))

    total = 0
    cur = memory_rows(conn, lo, hi)
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
