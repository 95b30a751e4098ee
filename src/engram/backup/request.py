"""A backup request: what to back up, where to, and how gently — one set of rules for every caller.

``engram backup``, ``POST /v1/admin/backup`` and a scheduler reading a config file all describe a
backup as one ``BackupRequest`` and check it with one ``validate``. A broken rule is a
``ValidationError`` whose ``field`` is the request's field name (the HTTP route answers 400 with
it) and whose message names the field the way the caller does: ``validate(OPTION_NAMES)`` speaks
of ``--cpu-share``, ``validate(FIELD_NAMES)`` of ``cpu_share``, the default of "cpu share". The
wording is otherwise the same whoever asks.

The rules:

- ``kind`` is "full" or "incremental".
- Full backups only: ``compression`` ("zstd" or "gzip"), ``priority`` ("low": a worker process on
  idle CPU; "normal": every core) and ``cpu_share`` (the most of one core a low-priority worker
  uses while the log grows, ``MIN_CPU_SHARE`` to 1; it implies priority "low" and is refused
  with "normal").
- Incrementals only: ``since_s`` (more than 0, at most ``MAX_SINCE_S``) or ``since_lsn``, not
  both; ``start_by_lsn`` with ``parent`` (the newest backup of the writer's directory: the range
  starts at or before that LSN). LSNs are 1 … ``MAX_LSN``.
- ``output`` names a file: a full backup's name says its compression (.tar.zst, .tar.gz, .tgz),
  an incremental's must not (it is a .log). A request with an output takes no ``compression``,
  ``start_by_lsn`` or ``parent``: the file's name and its own directory decide those. A request
  without one is streamed to a client, and a streamed incremental needs a start.
- Written by a server (``backup_dirs`` given): ``output`` must be a new plain file inside one
  of the server's ``--backup-dir`` directories (absolute, no ``..``, its directory resolved
  before it is compared, so a symlink out of it is refused).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.errors import Refused, ValidationError
from engram.format.manifest import compression_for

KINDS = ("full", "incremental")
PRIORITIES = ("low", "normal")
COMPRESSIONS = ("zstd", "gzip")
MIN_CPU_SHARE = 0.05
MAX_SINCE_S = 10 * 365.25 * 86400  # ten years
MAX_LSN = 2**63 - 1
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096

FIELDS = (
    "kind", "output", "compression", "since_s", "since_lsn", "start_by_lsn", "parent",
    "priority", "cpu_share",
)  # fmt: skip

# How a caller names the request's fields in its messages.
Names = Mapping[str, str]
FIELD_NAMES: Names = {f: f for f in FIELDS}  # an HTTP body, a config file
OPTION_NAMES: Names = {  # engram backup
    "kind": "--full/--incremental",
    "output": "--output",
    "since_s": "--since",
    "since_lsn": "--since-lsn",
    "priority": "--priority",
    "cpu_share": "--cpu-share",
}
PLAIN_NAMES: Names = {  # Python callers
    "kind": "backup kind",
    "output": "output",
    "compression": "compression",
    "since_s": "since",
    "since_lsn": "since LSN",
    "start_by_lsn": "start-by LSN",
    "parent": "parent",
    "priority": "priority",
    "cpu_share": "cpu share",
}


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _number(value: Any) -> float:
    """``value`` as a float; NaN for anything that is not a number (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float
        return math.inf


def check_priority(value: Any, name: str = "priority") -> str:
    """``value`` as a priority ("low" or "normal"), or a ValidationError naming ``name``."""
    if not isinstance(value, str) or value not in PRIORITIES:
        raise ValidationError(f"{name} must be low or normal, got {_got(value)}", field="priority")
    return value


def check_cpu_share(share: Any, name: str = "cpu share") -> float:
    """``share`` as a float in [MIN_CPU_SHARE, 1], or a ValidationError naming ``name``."""
    f = _number(share)
    if not MIN_CPU_SHARE <= f <= 1.0:  # NaN fails both
        raise ValidationError(
            f"{name} must be a number from {MIN_CPU_SHARE} to 1 (a fraction of one core), "
            f"got {_got(share)}",
            field="cpu_share",
        )
    return f


def output_compression(kind: str, name: str, display: str = "output") -> str | None:
    """The compression of a backup of ``kind`` named ``name`` (None for an incremental), or a
    ValidationError naming the field ``display``."""
    compression = compression_for(name)
    if kind == "full" and compression is None:
        raise ValidationError(
            f"{display} must end in .tar.zst (recommended) or .tar.gz for a full backup, "
            f"got {_got(name)}",
            field="output",
        )
    if kind != "full" and compression is not None:
        raise ValidationError(
            f"{display} names a full backup archive ({_got(name)}); an incremental is a .log file",
            field="output",
        )
    return compression


@dataclass(frozen=True)
class BackupRequest:
    """One backup, as asked for. ``validate`` returns the request checked and normalised
    (numbers as floats, ``priority`` "low" when a ``cpu_share`` implies it); None means "not
    given" everywhere, and a runner's default applies (``priority_or``)."""

    kind: str
    output: str | None = None  # a file to write; None: streamed to a client
    compression: str | None = None  # streamed full backups; a file's comes from its name
    since_s: float | None = None
    since_lsn: int | None = None
    start_by_lsn: int | None = None
    parent: str | None = None
    priority: str | None = None
    cpu_share: float | None = None

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        names: Names = FIELD_NAMES,
        backup_dirs: Sequence[Path] | None = None,
    ) -> BackupRequest:
        """The validated request a JSON-like mapping describes (an HTTP body, a table of a
        config file): a key that is no field, or a value of the wrong type, is a
        ValidationError naming it like any other broken rule. A None value is "not given"."""
        for key in data:
            if key not in FIELDS:
                raise ValidationError(f"unknown field {_got(key)} for backup", field=str(key))
        given = {k: v for k, v in data.items() if v is not None}
        return cls(**({"kind": None} | given)).validate(names, backup_dirs)

    def to_mapping(self) -> dict[str, Any]:
        """The fields given, as ``from_mapping`` reads them back."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def validate(
        self, names: Names = PLAIN_NAMES, backup_dirs: Sequence[Path] | None = None
    ) -> BackupRequest:
        """This request checked against every rule (module docstring), normalised; the first
        rule it breaks is a ValidationError whose message names the field by ``names`` (a
        field missing from it by its field name). ``backup_dirs``: the output is written by a
        server with these ``--backup-dir`` directories (an empty sequence: none)."""

        def n(f: str) -> str:
            return names.get(f, f)

        def refuse(f: str, message: str) -> ValidationError:
            return ValidationError(message, field=f)

        if self.kind not in KINDS or not isinstance(self.kind, str):
            got = "" if self.kind is None else f", got {_got(self.kind)}"
            raise refuse("kind", f"{n('kind')} must be full or incremental{got}")
        full = self.kind == "full"
        new: dict[str, Any] = {}
        # Each value on its own.
        if self.compression is not None and (
            not isinstance(self.compression, str) or self.compression not in COMPRESSIONS
        ):
            raise refuse(
                "compression",
                f"{n('compression')} must be zstd or gzip, got {_got(self.compression)}",
            )
        if self.since_s is not None:
            seconds = _number(self.since_s)
            if not 0 < seconds <= MAX_SINCE_S:  # also refuses NaN
                raise refuse(
                    "since_s",
                    f"{n('since_s')} must be more than 0 and at most {MAX_SINCE_S:g} seconds "
                    f"(ten years), got {_got(self.since_s)}",
                )
            new["since_s"] = seconds
        for f in ("since_lsn", "start_by_lsn"):
            v = getattr(self, f)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_LSN
            ):
                raise refuse(f, f"{n(f)} must be an LSN from 1 to 2^63-1, got {_got(v)}")
        if self.parent is not None and not _file_name(self.parent):
            raise refuse(
                "parent",
                f"{n('parent')} must be a file name of 1 to {MAX_NAME_BYTES} bytes, without "
                f"'/' or NUL, got {_got(self.parent)}",
            )
        if self.priority is not None:
            check_priority(self.priority, n("priority"))
        if self.cpu_share is not None:
            new["cpu_share"] = check_cpu_share(self.cpu_share, n("cpu_share"))
        # What applies to which kind.
        only = (
            ("since_s", "since_lsn", "start_by_lsn", "parent")
            if full
            else ("compression", "priority", "cpu_share")
        )
        for f in only:
            if getattr(self, f) is not None:
                other = "incremental" if full else "full"
                raise refuse(f, f"{n(f)} applies to {other} backups only")
        # Fields together.
        if self.since_s is not None and self.since_lsn is not None:
            raise refuse("since_lsn", f"give {n('since_s')} or {n('since_lsn')}, not both")
        if self.cpu_share is not None:
            if self.priority == "normal":
                raise refuse(
                    "cpu_share",
                    f"{n('cpu_share')} applies to {n('priority')} low only (normal uses every "
                    "core)",
                )
            new["priority"] = "low"
        if self.output is not None:
            if self.compression is not None:
                raise refuse(
                    "compression",
                    f"{n('compression')} applies to a streamed backup only (a file's "
                    "compression comes from its name)",
                )
            for f in ("start_by_lsn", "parent"):
                if getattr(self, f) is not None:
                    raise refuse(
                        f,
                        f"{n(f)} applies to a streamed backup only (a file continues the newest "
                        "backup of its own directory)",
                    )
            new["output"] = _check_output(self.kind, self.output, n("output"), backup_dirs)
        elif not full and self.since_s is None and self.since_lsn is None:
            if self.start_by_lsn is None:
                raise refuse(
                    "since_s",
                    f"a streamed incremental needs {n('since_s')}, {n('since_lsn')} or "
                    f"{n('start_by_lsn')} (the LSN right after the newest backup of the "
                    "client's directory)",
                )
        return dataclasses.replace(self, **new) if new else self

    def priority_or(self, default: str) -> str | None:
        """The priority this backup runs at: the one asked for, else ``default`` (a runner's);
        None for an incremental, which always runs in the engine's process."""
        if self.kind != "full":
            return None
        return self.priority or default

    def streamed(self) -> BackupRequest:
        """This request (validated, with an output) as the streamed request whose bytes a
        client writes to ``output`` itself: the file's name gives the compression."""
        assert self.output is not None
        compression = compression_for(Path(self.output).name)
        return dataclasses.replace(self, output=None, compression=compression)


def _file_name(value: Any) -> bool:
    """A plain file name: not empty, "." or "..", no "/" or NUL, at most MAX_NAME_BYTES."""
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and "/" not in value
        and "\0" not in value
        and len(value.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES
    )


def _check_output(kind: str, value: Any, name: str, backup_dirs: Sequence[Path] | None) -> str:
    """``value`` as the path of the file to write, or a ValidationError naming ``name``.
    With ``backup_dirs`` (a server writes it): a new plain file inside one of them, its
    directory resolved (realpath) before it is compared, so a symlink out of one is refused;
    the file is then created with O_EXCL|O_NOFOLLOW and published without replacing."""

    def refuse(message: str) -> ValidationError:
        return ValidationError(message, field="output")

    if backup_dirs is not None and not backup_dirs:
        raise refuse(
            "this server writes no backup files (it was started without --backup-dir); "
            f"leave out {name} to have the backup streamed to you"
        )
    if not isinstance(value, str):
        raise refuse(f"{name} must be a path, got {_got(value)}")
    if "\0" in value:
        raise refuse(f"{name} holds a NUL byte")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise refuse(f"{name} is longer than {MAX_PATH_BYTES} bytes")
    parts = value.split("/")
    if backup_dirs is not None:
        if not os.path.isabs(value):
            raise refuse(f"{name} must be an absolute path on the server")
        if ".." in parts:
            raise refuse(f"{name} must not hold a '..' component")
    file = parts[-1]
    if not _file_name(file):
        raise refuse(f"{name} must end in a file name of 1 to {MAX_NAME_BYTES} bytes")
    output_compression(kind, file, name)
    if backup_dirs is None:
        return value
    parent = os.path.realpath(os.path.dirname(value))
    dirs = [os.path.realpath(d) for d in backup_dirs]
    if not any(parent == d or parent.startswith(d.rstrip("/") + "/") for d in dirs):
        raise refuse(
            f"{name} must be inside a backup directory of this server (--backup-dir: "
            + ", ".join(dirs)
            + ")"
        )
    if not os.path.isdir(parent):
        raise refuse(f"{name}'s directory {parent} does not exist")
    path = os.path.join(parent, file)
    for p in (path, path + ".sha256", path + ".info.json"):
        if os.path.lexists(p):
            raise Refused(
                f"{p} already exists; choose a new name (backups are never overwritten)",
                field="output",
            )
    return path


__all__ = [
    "FIELD_NAMES",
    "MIN_CPU_SHARE",
    "OPTION_NAMES",
    "PLAIN_NAMES",
    "PRIORITIES",
    "BackupRequest",
    "check_cpu_share",
    "check_priority",
    "output_compression",
]
