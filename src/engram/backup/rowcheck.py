"""The rules a warm-tier memory row or edge row must follow (`verify`'s row checks), and the
scan of memory rows over a rowid range with their share of the digest (the hash of a row is
``digest``'s).

A scan reads rows in batches. Each batch is first checked as a whole, a column at a time, by a
few calls that run in C (``memory_rows_pass``, ``edge_rows_pass``): they accept a batch only if
every row in it follows every rule. An accepted batch is then only hashed. A batch they do not
accept (or whose metadata does not decode) is checked again row by row by ``check_memory_row``
/ ``check_edge_row``, which word every problem; so the report is the same whichever way a row
was read, and the per-row Python work of a sound store is the hash alone.

Self-contained so that ``rowscan.split_scan`` can run the memory scan in helper processes
(``python -m engram.backup.rowcheck DATABASE LO HI`` prints a ``RowScan`` as JSON) while the
verifier scans the first range itself.
"""

from __future__ import annotations

import math
import re
import sqlite3
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from operator import itemgetter

import msgspec

from engram import digest as dg
from engram.backup.rowscan import helper_main
from engram.model import ID_RE, KIND_RE, Edge, Memory
from engram.tiers.warm import memory_rows

MAX_LISTED = 100
MODULE = "engram.backup.rowcheck"  # the helper entry point of the memory scan (file's end)
BATCH = 5000  # rows read, checked and hashed at a time
_json_obj = msgspec.json.Decoder(dict)
# What hashing a row whose fields passed the checks can still raise: a metadata that is not a
# JSON object (decoding), or one holding an integer msgpack cannot encode (beyond 64 bits).
HASH_ERRORS = (msgspec.MsgspecError, TypeError, ValueError, OverflowError)


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


# ID_RE's and KIND_RE's rules over a batch joined with one newline after each value: with
# exactly as many newlines as values (none inside one), a full match means every value follows
# the rule.
_IDS = re.compile(r"(?:[A-Za-z0-9\-_.:@/]{1,256}\n)*")
_KINDS = re.compile(r"(?:[A-Za-z0-9\-_.:@/]{1,64}\n)*")
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7 = (itemgetter(i) for i in range(8))
_NUMBER, _INT = {int, float}, {int}


def _all_match(pattern: re.Pattern[str], values: list[object]) -> bool:
    joined = "\n".join(values) + "\n"  # type: ignore[arg-type]  # TypeError for a non-str
    return joined.count("\n") == len(values) and pattern.fullmatch(joined) is not None


def memory_rows_pass(rows: Sequence[tuple]) -> bool:
    """True only if every memory row in ``rows`` follows every rule ``check_memory_row``
    applies to its id, content, strength, count and timestamps (the metadata is decoded when it
    is hashed). False says only that some row may not: check those rows one by one.

    sqlite3 gives each value as int, float, str, bytes or None, never bool, and never NaN (SQLite
    reads a stored NaN as NULL; a NaN would still make the sum NaN)."""
    try:
        if not _all_match(_IDS, list(map(_C0, rows))):
            return False
        if set(map(type, map(_C1, rows))) != {str}:
            return False
        strength = list(map(_C2, rows))
        if not set(map(type, strength)) <= _NUMBER:
            return False
        if not (0.0 <= min(strength) and max(strength) <= 1.0 and not math.isnan(sum(strength))):
            return False
        counts = [*map(_C4, rows), *map(_C5, rows), *map(_C6, rows), *map(_C7, rows)]
        return set(map(type, counts)) == _INT and min(counts) >= 0
    except (TypeError, ValueError):  # ValueError: min() of no rows
        return False


def edge_rows_pass(rows: Sequence[tuple]) -> bool:
    """True only if no edge row in ``rows`` (as ``check_edge_row`` takes them) breaks a rule
    ``check_edge_row`` applies; False says only that some row may."""
    try:
        if any(map(_C5, rows)) or any(map(_C6, rows)):  # an end that does not exist
            return False
        if not _all_match(_KINDS, list(map(_C2, rows))):
            return False
        if not math.isfinite(sum(array("d", map(_C3, rows)))):  # NaN and inf stay in the sum
            return False
        array("q", map(_C4, rows))  # created_at: integers only
        return True
    except (TypeError, OverflowError):
        return False


def scan(conn: sqlite3.Connection, lo: int | None = None, hi: int | None = None) -> RowScan:
    """Check and hash the memory rows with ``lo <= rowid <= hi`` (all if None)."""
    res = RowScan()

    def problem(location: str, message: str) -> None:
        res.problems += 1
        if len(res.listed) < MAX_LISTED:
            res.listed.append((location, message))

    total = 0
    cur = memory_rows(conn, lo, hi)
    rows_sum, meta = dg.memory_rows_sum, _json_obj.decode
    while rows := cur.fetchmany(BATCH):
        res.rows += len(rows)
        if memory_rows_pass(rows):
            t = time.perf_counter()
            try:
                total += rows_sum(rows, meta)
                res.hash_seconds += time.perf_counter() - t
                continue
            except HASH_ERRORS:
                pass  # some metadata: the rows one by one say which
        valid: list[Memory] = []
        for r in rows:
            m = check_memory_row(r, problem)
            if m is None:
                res.undecodable += 1
            else:
                valid.append(m)
        t = time.perf_counter()
        for m in valid:
            try:
                total += dg.memory_hash(m)
            except HASH_ERRORS as e:
                problem(loc_id("memory", m.id), f"metadata cannot be hashed ({e})")
                res.undecodable += 1
        res.hash_seconds += time.perf_counter() - t
    res.hash_hex = format(total % dg.MOD, "x")
    return res


def decode(out: bytes) -> RowScan:
    return _decode(out)


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:], lambda c, a, b: _encode(scan(c, a, b))))
