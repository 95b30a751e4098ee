"""The backup catalog: one ``NAME.info.json`` beside each backup, saying what it covers.

The info file is a convenience index (kind, database id, LSN and time range, digest, validation
result); the archive and its sidecar remain the authority. Choosing backups for PITR reads the
info files, then every chosen file is checked again when it is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.fsutil import atomic_write

INFO_SUFFIX = ".info.json"


def info_path(backup: Path) -> Path:
    return backup.with_name(backup.name + INFO_SUFFIX)


def write_info(backup: Path, info: dict[str, Any]) -> None:
    atomic_write(info_path(backup), (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())


def read_info(backup: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(info_path(backup).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def update_info(backup: Path, **changes: Any) -> None:
    info = read_info(backup) or {}
    info.update(changes)
    write_info(backup, info)


@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str  # "full" or "incremental"
    database_id: str
    from_lsn: int
    to_lsn: int
    from_time_ns: int
    to_time_ns: int
    validated: bool | None

    @property
    def name(self) -> str:
        return self.path.name


def scan(directory: Path) -> list[Entry]:
    """Backups in ``directory`` (and one level of subdirectories) that have an info file."""
    out: list[Entry] = []
    d = Path(directory)
    if not d.is_dir():
        return out
    candidates = list(d.glob("*" + INFO_SUFFIX)) + list(d.glob("*/*" + INFO_SUFFIX))
    for ip in candidates:
        backup = ip.with_name(ip.name[: -len(INFO_SUFFIX)])
        if not backup.is_file():
            continue
        info = read_info(backup)
        if not info:
            continue
        try:
            v = info.get("validation")
            out.append(
                Entry(
                    path=backup,
                    kind=str(info["kind"]),
                    database_id=str(info["database_id"]),
                    from_lsn=int(info.get("from_lsn", 1)),
                    to_lsn=int(info["snapshot_lsn"]),
                    from_time_ns=int(info.get("from_time_ns", 0)),
                    to_time_ns=int(info.get("snapshot_time_ns", 0)),
                    validated=None if not isinstance(v, dict) else bool(v.get("ok")),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    out.sort(key=lambda e: (e.to_lsn, e.kind != "full", e.name))
    return out


def newest_end(directory: Path, database_id: str) -> Entry | None:
    """The backup of ``database_id`` in ``directory`` that ends at the highest LSN."""
    entries = [e for e in scan(directory) if e.database_id == database_id]
    return max(entries, key=lambda e: e.to_lsn) if entries else None
