"""Histories (docs/FORMAT.md "Histories"): codecs and the rules of a lineage, no I/O.

A history is a line of records of one database. The original one has the database id as its id
and begins at LSN 0; every other one branched from its parent after ``branch_lsn``: it shares
its parent's records up to ``branch_lsn`` and owns every record after it. A lineage is the list
of histories from the original one to a history (each the parent of the next), which is what a
data dir, a log header and a backup manifest carry: it says which history owns each LSN on that
path, so records of two histories are never combined.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HISTORY_FILE_VERSION = 1
CHECKSUM = "checksum"


@dataclass(frozen=True)
class History:
    id: str
    parent: str | None  # None for the original history
    branch_lsn: int  # the last LSN shared with the parent (0 for the original history)
    branch_time_ns: int  # when it began (0: the original history, time unknown)
    command: str  # why it began: "init", or the recovery whose data dir wrote first
    target: str | None = None  # that recovery's target, as it described it

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent,
            "branch_lsn": self.branch_lsn,
            "branch_time_ns": self.branch_time_ns,
            "command": self.command,
            "target": self.target,
        }

    @classmethod
    def from_json(cls, d: Any) -> History:
        """ValueError when ``d`` is not a history record."""
        if not isinstance(d, dict):
            raise ValueError("a history record is a JSON object")
        try:
            h = cls(
                str(d["id"]),
                None if d.get("parent") is None else str(d["parent"]),
                int(d["branch_lsn"]),
                int(d.get("branch_time_ns") or 0),
                str(d.get("command") or "init"),
                None if d.get("target") is None else str(d["target"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"a history record lacks or mistypes {e}") from None
        if not h.id or h.branch_lsn < 0 or (h.parent is None and h.branch_lsn != 0):
            raise ValueError(f"history {h.id!r}: parent and branch LSN do not agree")
        return h


def original(database_id: str) -> History:
    """The history of a database before any recovery branched from it: files without a history
    field belong to it."""
    return History(database_id, None, 0, 0, "init")


def new_history(parent: str, branch_lsn: int, command: str, target: str | None) -> History:
    return History(str(uuid.uuid4()), parent, branch_lsn, time.time_ns(), command, target)


Lineage = tuple[History, ...]


def lineage_to_json(lineage: Sequence[History]) -> list[dict[str, Any]]:
    return [h.to_json() for h in lineage]


def lineage_from_json(data: Any, database_id: str) -> Lineage:
    """The lineage a header or identity carries; the original history alone when absent (a file
    written before histories). ValueError when it is not a chain from the original history."""
    if data is None:
        return (original(database_id),)
    if not isinstance(data, list) or not data:
        raise ValueError("a lineage is a non-empty list of history records")
    out = tuple(History.from_json(d) for d in data)
    check_lineage(out, database_id)
    return out


def check_lineage(lineage: Sequence[History], database_id: str) -> None:
    if lineage[0].id != database_id or lineage[0].parent is not None:
        raise ValueError(f"a lineage starts at the original history {database_id}")
    for a, b in zip(lineage, lineage[1:], strict=False):
        if b.parent != a.id or b.branch_lsn < a.branch_lsn:
            raise ValueError(f"history {b.id} does not branch from {a.id}")


def history_of(header: dict[str, Any]) -> str:
    """The history id of a log header or manifest (the database's original one when absent)."""
    return str(header.get("history") or header["database_id"])


def header_lineage(header: dict[str, Any]) -> Lineage:
    """The lineage of a log header or manifest; ValueError when it is malformed or does not end
    at the header's own history."""
    lin = lineage_from_json(header.get("lineage"), str(header["database_id"]))
    if lin[-1].id != history_of(header):
        raise ValueError(f"its lineage ends at {lin[-1].id}, not at its history")
    return lin


def caps(lineage: Sequence[History]) -> dict[str, int | None]:
    """Each history of ``lineage`` and the last LSN it holds on this path (None: no end): a
    history's records after its child's branch LSN belong to another path."""
    out: dict[str, int | None] = {}
    for i, h in enumerate(lineage):
        out[h.id] = lineage[i + 1].branch_lsn if i + 1 < len(lineage) else None
    return out


def owner(lineage: Sequence[History], lsn: int) -> History:
    """The history that wrote record ``lsn`` on this path."""
    found = lineage[0]
    for h in lineage[1:]:
        if h.branch_lsn < lsn:
            found = h
    return found


def upto(lineage: Sequence[History], lsn: int) -> Lineage:
    """The lineage of whatever owns ``lsn`` on this path (the path cut at ``lsn``)."""
    return tuple(h for i, h in enumerate(lineage) if i == 0 or h.branch_lsn < lsn)


def agree(a: Sequence[History], b: Sequence[History], lsn: int) -> bool:
    """Whether two paths hold the same records up to ``lsn`` (one history owns each LSN in
    both)."""
    return [h.id for h in upto(a, lsn)] == [h.id for h in upto(b, lsn)]


def describe(h: History) -> str:
    if h.parent is None:
        return f"{h.id} (the original history)"
    return f"{h.id} (branched from {h.parent} after LSN {h.branch_lsn})"


# -- history files (histories/<id>.json in a repository) --------------------------------------


def history_file_name(history_id: str) -> str:
    return f"histories/{history_id}.json"


def encode_history_file(h: History, database_id: str) -> bytes:
    body: dict[str, Any] = {
        "format_version": HISTORY_FILE_VERSION,
        "database_id": database_id,
        **h.to_json(),
    }
    body[CHECKSUM] = _checksum(body)
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def decode_history_file(data: bytes) -> tuple[History, str]:
    """(history, database id) of a history file; ValueError when it is damaged."""
    d = json.loads(data)
    if not isinstance(d, dict) or d.get(CHECKSUM) != _checksum(d):
        raise ValueError("its checksum does not match its content")
    if d.get("format_version") != HISTORY_FILE_VERSION:
        raise ValueError(f"format version {d.get('format_version')!r} is not supported")
    return History.from_json(d), str(d["database_id"])


def _checksum(d: dict[str, Any]) -> str:
    rest = {k: v for k, v in d.items() if k != CHECKSUM}
    return hashlib.sha256(
        json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
