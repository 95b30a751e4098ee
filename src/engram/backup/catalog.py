"""The backup catalog: one ``NAME.info.json`` beside each backup, saying what it covers.

Entries are objects of the backup's store (``storage.BackupStore``), named relative to it, and
read and written only through it: a path given here means the file of that name in its
directory (``storage.LocalBackupStore``).

The info file is an index (kind, database id, LSN and time range, digest, validation verdict);
the backup file stays the authority. An entry is created once and never replaced by another
backup's (``write_info`` refuses an existing one); it carries a checksum of its own content, and
whenever it is read for a choice its key fields are checked against the file it describes: an
incremental's log header, a full archive's header (docs/FORMAT.md "Archive header"), both
covered by the sidecar's hash and by a CRC of their own. An entry that fails either check is
reported and never trusted: its backup is left out of the choice, and where a range matters (the
start of the next incremental) the file's own header gives it. Entries written before entries
had checksums are checked against the file's header when it has one; a legacy full archive
without a header can only be checked against its sidecar (its sha256 and size): such an entry is
used, marked "legacy, unverified" (a restore checks the archive in full anyway). An encrypted
backup's entry (``encryption``, docs/FORMAT.md "An encrypted backup") read through a store that
cannot decrypt it is checked by its checksum, the sidecar and the size alone (all of the stored
bytes): its header is inside the ciphertext. Through a store holding an identity it gets the
full check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engram.backup.archive import ARCHIVE_HEAD_BYTES, parse_archive_header
from engram.backup.history import publish_lineage
from engram.errors import EngramError
from engram.format import record as fmt
from engram.format.history import history_of
from engram.format.manifest import compression_for, decode_sidecar
from engram.model import ns_to_iso
from engram.storage import BackupStore, LocalBackupStore, Ref, as_ref, as_store, sidecar_name
from engram.storage.base import INFO_SUFFIX

log = logging.getLogger("engram")

CHECKSUM = "checksum"
# Validation states of an entry: "pending" is written before a validation starts, so a
# validation that dies, or whose verdict cannot be recorded, never leaves a backup looking good.
NOT_VALIDATED, PENDING, PASSED, FAILED = "not validated", "pending", "passed", "failed"


class CatalogError(EngramError):
    """The backup's catalog entry cannot be used."""

    code = "catalog"


def info_path(backup: Path) -> Path:
    return backup.with_name(backup.name + INFO_SUFFIX)


def _info(ref: Ref) -> str:
    return ref.name + INFO_SUFFIX


# -- writing -----------------------------------------------------------------------------------


class EntryWriter(Protocol):
    """What writes catalog entries of local backups, by path (a seam: tests put a failing one in
    its place). ``LOCAL`` writes through the backup's store."""

    def create(self, path: Path, data: bytes) -> None:
        """Create ``path``; FileExistsError if it exists (never replaces)."""

    def replace(self, path: Path, data: bytes) -> None:
        """Replace ``path`` atomically."""


class LocalEntries:
    def create(self, path: Path, data: bytes) -> None:
        LocalBackupStore(path.parent).create(path.name, data)

    def replace(self, path: Path, data: bytes) -> None:
        LocalBackupStore(path.parent).replace(path.name, data)


LOCAL = LocalEntries()


def entry_checksum(info: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the entry without its checksum."""
    rest = {k: v for k, v in info.items() if k != CHECKSUM}
    return hashlib.sha256(
        json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()


def encode_entry(info: dict[str, Any]) -> bytes:
    body = {k: v for k, v in info.items() if k != CHECKSUM}
    body[CHECKSUM] = entry_checksum(body)
    return (json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_info(backup: Path | Ref, info: dict[str, Any], writer: EntryWriter = LOCAL) -> None:
    """Create the catalog entry of ``backup``; FileExistsError if it has one (never replaced)."""
    ref = as_ref(backup)
    if info.get("lineage") is not None:  # the histories it refers to exist before it does
        publish_lineage(ref.store, str(info["database_id"]), info["lineage"])
    if isinstance(writer, LocalEntries):
        ref.store.create(_info(ref), encode_entry(info))
    else:
        writer.create(Path(ref.store.describe(_info(ref))), encode_entry(info))


def replace_info(backup: Path | Ref, info: dict[str, Any], writer: EntryWriter = LOCAL) -> None:
    """Replace the entry of ``backup`` as a whole (validation verdicts, a rebuilt entry)."""
    ref = as_ref(backup)
    if isinstance(writer, LocalEntries):
        ref.store.replace(_info(ref), encode_entry(info))
    else:
        writer.replace(Path(ref.store.describe(_info(ref))), encode_entry(info))


def read_info(backup: Path | Ref) -> dict[str, Any] | None:
    """The entry as stored (unchecked), or None when it is missing or not a JSON object."""
    ref = as_ref(backup)
    try:
        d = json.loads(ref.store.read(_info(ref)))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def update_info(
    backup: Path | Ref, writer: EntryWriter = LOCAL, **changes: Any
) -> dict[str, Any]:
    """Change fields of an intact entry (``check_entry`` finds nothing wrong); a damaged one is
    never written into: CatalogError naming what is wrong."""
    ref = as_ref(backup)
    info = read_info(ref)
    ip, where = Path(_info(ref)).name, ref.describe()
    if info is None:
        raise CatalogError(
            f"{ip} is missing or unreadable; run `engram validate-backup {where}` to rebuild it"
        )
    problems = check_entry(ref, info, None if sealed(ref, info) else file_facts(ref))
    if problems:
        raise CatalogError(
            f"{ip} is damaged ({'; '.join(problems)}); run `engram validate-backup {where}` to "
            "rebuild it from the file"
        )
    info.update(changes)
    replace_info(backup, info, writer)
    return info


# -- checking against the file -----------------------------------------------------------------

# The entry fields that must equal what the file itself says.
FULL_KEYS = ("kind", "database_id", "snapshot_lsn", "snapshot_time_ns", "snapshot_time", "digest")
INCREMENTAL_KEYS = FULL_KEYS + ("from_lsn", "from_time_ns", "parent")


def _time_text(ns: int) -> str:
    return ns_to_iso(ns) if ns else ""


def facts_from_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The entry fields a full archive's header or manifest fixes."""
    return {
        "kind": "full",
        "database_id": manifest["database_id"],
        "snapshot_lsn": manifest["snapshot_lsn"],
        "snapshot_time_ns": manifest["snapshot_time_ns"],
        "snapshot_time": manifest["snapshot_time"],
        "digest": manifest["digest"],
        "counts": manifest["counts"],
        "history": history_of(manifest),
    }


def facts_from_log_header(h: dict[str, Any]) -> dict[str, Any]:
    """The entry fields an incremental's log header fixes."""
    return {
        "kind": "incremental",
        "database_id": h["database_id"],
        "from_lsn": h["from_lsn"],
        "snapshot_lsn": h["to_lsn"],
        "from_time_ns": h["from_time_ns"],
        "snapshot_time_ns": h["to_time_ns"],
        "snapshot_time": _time_text(h["to_time_ns"]),
        "digest": h["digest"],
        "parent": h.get("parent"),
        "counts": {"records": h["record_count"]},
        "history": history_of(h),
    }


def sealed(backup: Path | Ref, info: dict[str, Any] | None) -> bool:
    """Whether ``info`` is the entry of an encrypted backup that its store cannot decrypt (no
    identity): its header cannot be read, so only its checksum, sidecar and size are checked."""
    enc = info.get("encryption") if isinstance(info, dict) else None
    return isinstance(enc, dict) and not getattr(as_ref(backup).store, "decrypts", False)


def file_facts(backup: Path | Ref) -> dict[str, Any] | None:
    """What ``backup`` says about itself, read from its header (a few KB): None for a full
    archive written before archives had headers. EngramError if the header is damaged."""
    ref = as_ref(backup)
    name = ref.name.rsplit("/", 1)[-1]
    # A store that decrypts reads a header from the first chunks, not the whole backup.
    open_head = getattr(ref.store, "open_head", ref.store.open)
    if compression_for(name):
        with open_head(ref.name) as f:
            header = parse_archive_header(f.read(ARCHIVE_HEAD_BYTES), name)
        return None if header is None else facts_from_manifest(header)
    with open_head(ref.name) as f:
        kind, h, _ = fmt.decode_file_header(f.read(fmt.max_header_size()), name)
    if kind != fmt.KIND_INCREMENTAL:
        raise CatalogError(f"{name} is not an incremental backup (log kind {kind})")
    try:
        return facts_from_log_header(h)
    except KeyError as e:
        raise CatalogError(f"{name}: its header lacks {e}; not an engram incremental") from None


def _sidecar_hash(ref: Ref) -> str | None:
    side = sidecar_name(ref.name)
    try:
        return decode_sidecar(ref.store.read(side), Path(side).name)
    except (OSError, EngramError):
        return None


def check_entry(
    backup: Path | Ref, info: dict[str, Any], facts: dict[str, Any] | None
) -> list[str]:
    """What is wrong with the entry ``info`` of ``backup``: its checksum, its key fields against
    the file's ``facts``, its sha256 against the sidecar and its size against the file."""
    ref = as_ref(backup)
    problems: list[str] = []
    stored = info.get(CHECKSUM)
    if stored is not None and stored != entry_checksum(info):
        problems.append("its checksum does not match its content")
    if facts is not None:
        keys = FULL_KEYS if facts["kind"] == "full" else INCREMENTAL_KEYS
        for k in (*keys, "counts"):
            if info.get(k) != facts.get(k):
                problems.append(f"{k} is {info.get(k)!r}, the file says {facts.get(k)!r}")
        # An entry without a history (written before histories) is on the original one.
        ih = info.get("history") or info.get("database_id")
        if ih != facts["history"]:
            problems.append(f"history is {ih!r}, the file says {facts['history']!r}")
    side = sidecar_name(ref.name).rsplit("/", 1)[-1]
    try:
        expected: str | None = decode_sidecar(ref.store.read(sidecar_name(ref.name)), side)
    except FileNotFoundError:
        expected = None  # accepted without one (docs/FORMAT.md "Restore")
    except (OSError, EngramError) as e:
        expected = None
        problems.append(e.message if isinstance(e, EngramError) else f"{side}: {e.strerror}")
    if expected is not None and info.get("sha256") != expected:
        problems.append(f"sha256 is {info.get('sha256')!r}, {side} says {expected!r}")
    try:
        size: int | None = ref.store.size(ref.name)
    except OSError:
        size = None
    if size is not None and info.get("size") != size:
        problems.append(f"size is {info.get('size')!r}, the file has {size} bytes")
    return problems


def rebuilt_entry(backup: Path | Ref, facts: dict[str, Any]) -> dict[str, Any]:
    """An entry made from the file alone (what ``validate-backup`` writes in place of a damaged
    one): the file's facts, its size, the sidecar's sha256. What only the backup run knew
    (duration, priority, restore points up to a full backup's snapshot) is left out: nothing
    of the damaged entry is carried over."""
    ref = as_ref(backup)
    base = Path(ref.name).name
    info: dict[str, Any] = {
        "path": base,
        "from_lsn": 1,
        "from_time_ns": 0,
        "size": ref.store.size(ref.name),
        "sha256": _sidecar_hash(ref),
        "sidecar": sidecar_name(base),
        "duration_s": None,
        "stall_ms": None,
        "priority": None,
        "cpu_share": None,
        "paused_s": None,
        "note": f"rebuilt from the file's header by validate-backup at {ns_to_iso(time.time_ns())}",
        "validation": None,
    }
    info.update(facts)
    return info


# -- reading the catalog -----------------------------------------------------------------------


def validation_status(info: dict[str, Any]) -> str:
    """The validation state: "passed", "failed", "pending" or "not validated" (entries from
    before "status" existed say only ``ok``)."""
    v = info.get("validation")
    if not isinstance(v, dict):
        return NOT_VALIDATED
    status = v.get("status")
    if status in (PENDING, PASSED, FAILED):
        return str(status)
    return PASSED if v.get("ok") is True else FAILED


@dataclass(frozen=True)
class Entry:
    path: Path  # how messages name the backup (its file, for a local store)
    kind: str  # "full" or "incremental"
    database_id: str
    from_lsn: int
    to_lsn: int
    from_time_ns: int
    to_time_ns: int
    status: str = NOT_VALIDATED  # validation: passed, failed, pending, not validated
    verified: bool = True  # False: a legacy entry that no header could confirm
    ref: Ref | None = field(default=None, compare=False)  # the backup in its store
    history: str = ""  # its history (the database id: the original history)
    # The entry as stored, when it is trusted (size, parent, the validation's reason, …).
    info: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def where(self) -> str:
        """How messages name the backup: its path, or its URL in an object store."""
        return self.ref.describe() if self.ref is not None else str(self.path)

    @property
    def validated(self) -> bool | None:
        return {PASSED: True, FAILED: False}.get(self.status)


@dataclass(frozen=True)
class Problem:
    """A catalog entry that is not trusted, and why."""

    path: Path  # the backup
    reason: str
    name: str = ""  # the backup's name in its store
    where: str = ""  # how messages name the backup (a path, or an s3:// URL); default: path

    @property
    def message(self) -> str:
        return (
            f"{info_path(self.path).name}: {self.reason}; not trusted — run `engram "
            f"validate-backup {self.where or self.path}` to check the backup and rebuild its entry"
        )


@dataclass
class Catalog:
    entries: list[Entry] = field(default_factory=list)  # trusted entries
    problems: list[Problem] = field(default_factory=list)
    # Backups whose entry is not trusted but whose file says what it covers (its header).
    from_files: list[Entry] = field(default_factory=list)


def _entry(
    ref: Ref, f: dict[str, Any], status: str, verified: bool, info: dict[str, Any] | None = None
) -> Entry:
    return Entry(
        path=Path(ref.describe()),
        kind=str(f["kind"]),
        database_id=str(f["database_id"]),
        from_lsn=int(f.get("from_lsn", 1)),
        to_lsn=int(f["snapshot_lsn"]),
        from_time_ns=int(f.get("from_time_ns", 0)),
        to_time_ns=int(f.get("snapshot_time_ns", 0)),
        status=status,
        verified=verified,
        ref=ref,
        history=history_of(f) if "history" in f else str(f["database_id"]),
        info=info,
    )


def read_catalog(where: Path | BackupStore) -> Catalog:
    """Every backup in ``where`` (a store, or a directory and one level of subdirectories) that
    has an entry, each entry checked against its file (module docstring)."""
    cat = Catalog()
    store = as_store(where)
    names = store.list()
    present = set(names)
    for ip in names:
        if not ip.endswith(INFO_SUFFIX) or ip[: -len(INFO_SUFFIX)] not in present:
            continue
        backup = Ref(store, ip[: -len(INFO_SUFFIX)])
        info = read_info(backup)
        encrypted = sealed(backup, info)
        try:
            facts = None if encrypted else file_facts(backup)
        except (OSError, EngramError) as e:
            msg = e.message if isinstance(e, EngramError) else (e.strerror or str(e))
            why = f"its file's header cannot be read ({msg})"
            cat.problems.append(
                Problem(Path(backup.describe()), why, backup.name, backup.describe())
            )
            continue
        problems = (
            ["it is missing or not a JSON object"]
            if info is None
            else check_entry(backup, info, facts)
        )
        if info is not None and not problems:
            try:
                verified = facts is not None or encrypted
                status = validation_status(info)
                cat.entries.append(_entry(backup, facts or info, status, verified, info))
                continue
            except (KeyError, TypeError, ValueError):
                problems = ["it lacks a field a backup entry has"]
        where_ = Path(backup.describe())
        cat.problems.append(
            Problem(where_, "; ".join(problems), backup.name, backup.describe())
        )
        if facts is not None:
            cat.from_files.append(_entry(backup, facts, NOT_VALIDATED, True))
    order = lambda e: (e.to_lsn, e.kind != "full", e.name)  # noqa: E731
    cat.entries.sort(key=order)
    cat.from_files.sort(key=order)
    return cat


def scan(where: Path | BackupStore) -> list[Entry]:
    """The trusted entries of ``where`` (``read_catalog``), oldest end first."""
    return read_catalog(where).entries


def backups_of(where: Path | BackupStore, database_id: str) -> list[Entry]:
    """Every backup of ``database_id`` in ``where`` by what the files' own headers say: a backup
    whose entry is damaged still counts (with a warning), so a range that continues the newest
    one starts right after its true end."""
    cat = read_catalog(where)
    for p in cat.problems:
        log.warning(p.message)
    return [e for e in cat.entries + cat.from_files if e.database_id == database_id]
