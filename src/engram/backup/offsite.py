"""Copies of backups between repositories: ``engram push``, ``pull`` and ``sync`` (the seed's
copy 2 -> copy 3, offsite). Any ``BackupStore`` to any other: a directory, a bucket.

A backup is copied with what makes it usable at the far side: its file, its sidecar, the
history files of its lineage and its catalog entry, published in the order a backup is
(docs/FORMAT.md "Write order"): the file, the sidecar, the histories, the entry last.

- **Only good backups leave.** The source's catalog entry is checked the way the catalog
  checks it (its checksum, its key fields against the file's header, its sha256 against the
  sidecar, its size); a backup whose entry is damaged or missing, whose validation failed or
  is pending, or that has no sidecar, is not copied (``NotCopied``, naming why).
- **Verified on the way.** The bytes are hashed as they are copied and must equal the
  sidecar's sha256 before anything is published at the destination (``CopyCorrupt``
  otherwise, and nothing is left there). A destination in object storage checks each part and
  the whole object on its own as well.
- **Never replacing.** Everything is published with the destination's never-replace rule. A
  name already holding the same backup (the same size, and a sidecar naming the same sha256;
  without a sidecar there, the object is read and hashed) is fine and said so; one holding
  another backup is ``NameTaken`` (exit 3) and nothing is changed. The one exception is the
  catalog entry's verdict: an entry whose validation is newer at the source (``validation.at``)
  replaces the destination's, as does one that replaces a damaged entry there.
- **Nothing partial.** A copy that fails removes what it published (the destination's
  ``discard``: only its own objects); a copy cut short by a kill leaves an upload in progress
  or an owned temp file, which no listing shows and the next ``prepare`` clears. A backup
  whose file was published but whose sidecar or entry was not is finished by the next copy.

``sync`` mirrors a repository: every usable backup missing at the far side is copied, fulls
before the incrementals after them (each incremental after its parent), so an interrupted
sync leaves chains that are usable as far as they go. It never deletes anything at the far
side. A second run copies nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from engram.backup.catalog import (
    CHECKSUM,
    FAILED,
    FULL_KEYS,
    INCREMENTAL_KEYS,
    PENDING,
    check_entry,
    entry_checksum,
    file_facts,
    read_info,
    sealed,
    validation_status,
)
from engram.backup.encrypted import plain_entry, plaintext_of
from engram.backup.history import publish_lineage
from engram.backup.repository import Backup, check_destination, list_backups
from engram.errors import EngramError, Refused, UsageError
from engram.format.manifest import decode_sidecar
from engram.storage import BackupStore, Ref, info_name, sidecar_name
from engram.storage.base import TempObject
from engram.storage.objectbackup import ObjectBackupStore, ObjectTemp
from engram.storage.objects import ObjectReader

log = logging.getLogger("engram.backup")

# Bytes read from the source per write to the destination: small next to a part, so that an
# upload's buffer moves little when a part leaves it.
CHUNK = 1 << 20

# What happened to one backup (``Copied.action``).
COPIED = "copied"  # the file and everything with it were published at the destination
COMPLETED = "completed"  # the file was there; its sidecar, histories or entry were added
PRESENT = "present"  # everything was there already
ENTRY_UPDATED = "entry updated"  # only the catalog entry changed (a newer verdict)
# Dry runs: what a copy would do.
WOULD_COPY, WOULD_COMPLETE, WOULD_UPDATE = "would copy", "would complete", "would update entry"


class OffsiteError(EngramError):
    """A backup could not be copied (exit 1)."""

    code = "offsite"


class NotCopied(OffsiteError):
    """The backup is not fit to be copied: damaged, failed or pending validation, no entry or
    no sidecar (exit 1; validate it, or copy another)."""

    code = "not_copied"


class CopyCorrupt(OffsiteError):
    """The bytes read do not hash to what the backup's sidecar records (exit 1)."""

    code = "copy_corrupt"


class NameTaken(Refused):
    """The destination holds another backup under that name; nothing was replaced (exit 3)."""

    code = "name_taken"


@dataclass(frozen=True)
class Copied:
    """What a copy did to one backup at the destination."""

    name: str  # at the destination
    source: str  # how messages name the source backup
    action: str  # COPIED, COMPLETED, PRESENT, ENTRY_UPDATED, or a dry run's WOULD_*
    size: int
    sha256: str
    bytes_copied: int = 0
    created: tuple[str, ...] = ()  # the objects created at the destination
    note: str | None = None  # why an entry was updated or kept

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "action": self.action,
            "size": self.size,
            "sha256": self.sha256,
            "bytes_copied": self.bytes_copied,
            "created": list(self.created),
            "note": self.note,
        }


# -- the source -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A backup checked fit to copy: its entry (as stored, checked), sidecar bytes and hash."""

    ref: Ref
    info: dict[str, Any]
    entry_bytes: bytes
    sidecar_bytes: bytes
    sha256: str
    size: int


def _why_unfit(info: dict[str, Any]) -> str | None:
    status = validation_status(info)
    if status == FAILED:
        reason = (info.get("validation") or {}).get("reason") or "no reason recorded"
        return f"it failed validation ({reason})"
    if status == PENDING:
        return "its validation is pending (it never finished, or is still running)"
    return None


def check_source(ref: Ref) -> Source:
    """``ref`` if it may be copied (module docstring), with what the copy needs; NotCopied
    naming what is wrong, FileNotFoundError when there is no such backup."""
    where = ref.describe()
    size = ref.store.size(ref.name)  # FileNotFoundError for a backup that is not there
    how = f"run `engram validate-backup {where}` to check it"

    def unfit(why: str) -> NotCopied:
        return NotCopied(f"{where} is not copied: {why}; {how}")

    try:
        sidecar = ref.store.read(sidecar_name(ref.name))
    except FileNotFoundError:
        raise unfit(
            f"it has no sidecar ({sidecar_name(ref.name)}), so its copy cannot be verified"
        ) from None
    try:
        sha = decode_sidecar(sidecar, sidecar_name(ref.name))
    except EngramError as e:
        raise unfit(e.message) from None
    try:
        entry = ref.store.read(info_name(ref.name))
    except FileNotFoundError:
        raise unfit(f"it has no catalog entry ({info_name(ref.name)})") from None
    info = read_info(ref)
    if info is None:
        raise unfit(f"its catalog entry ({info_name(ref.name)}) is not a JSON object")
    try:
        # An encrypted backup is copied as it is stored; without the identity its entry is
        # checked by its checksum, sidecar and size, as the catalog checks it.
        facts = None if sealed(ref, info) else file_facts(ref)
    except (OSError, EngramError) as e:
        msg = e.message if isinstance(e, EngramError) else (e.strerror or str(e))
        raise unfit(f"its file's header cannot be read ({msg})") from None
    problems = check_entry(ref, info, facts)
    if problems:
        raise unfit(f"its catalog entry is not trusted ({'; '.join(problems)})")
    why = _why_unfit(info)
    if why is not None:
        raise unfit(why)
    return Source(ref, info, entry, sidecar, sha, size)


# -- the destination --------------------------------------------------------------------------


def _hash_of(store: BackupStore, name: str) -> str:
    h = hashlib.sha256()
    with store.open(name) as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _same_backup(src: Source, dst: BackupStore, name: str) -> bool:
    """Whether ``name`` at ``dst`` holds the bytes of ``src``: the same size and a sidecar
    naming the same sha256, or, without a readable sidecar there, the same hash read; an
    encrypted copy there, its entry's plaintext sha256 and size."""
    if (plain := plaintext_of(dst, name)) is not None:
        return plain == (src.sha256, src.size)
    if dst.size(name) != src.size:
        return False
    try:
        theirs: str | None = decode_sidecar(dst.read(sidecar_name(name)), sidecar_name(name))
    except (OSError, EngramError):
        theirs = None
    if theirs is None:
        theirs = _hash_of(dst, name)
    return theirs == src.sha256


def _at(info: dict[str, Any] | None) -> str:
    v = (info or {}).get("validation")
    return str(v.get("at") or "") if isinstance(v, dict) else ""


def _entry_plan(src: Source, dst: BackupStore, name: str) -> tuple[str, str | None]:
    """What to do with the destination's entry of the same backup: ("create" | "keep" |
    "replace", why)."""
    try:
        theirs_bytes = dst.read(info_name(name))
    except FileNotFoundError:
        return "create", None
    if theirs_bytes == src.entry_bytes:
        return "keep", None
    try:
        theirs = json.loads(theirs_bytes)
        if not isinstance(theirs, dict):
            raise ValueError("not an object")
    except ValueError:
        return "replace", "the destination's entry was not a JSON object"
    if theirs.get(CHECKSUM) != entry_checksum(theirs):
        return "replace", "the destination's entry failed its checksum"
    if theirs.get("encryption"):  # an encrypted copy: compared as the plaintext it holds
        theirs = plain_entry(theirs)
    keys = FULL_KEYS if src.info.get("kind") == "full" else INCREMENTAL_KEYS
    differ = [k for k in (*keys, "sha256", "size") if theirs.get(k) != src.info.get(k)]
    if differ:
        return "replace", f"the destination's entry disagreed with the file ({', '.join(differ)})"
    ours_v, theirs_v = validation_status(src.info), validation_status(theirs)
    if _at(src.info) > _at(theirs):
        return "replace", f"validation {theirs_v} -> {ours_v}"
    if ours_v != theirs_v:
        return "keep", f"the destination's verdict ({theirs_v}) is as new or newer: kept"
    return "keep", None


def _ensure_parent(dst: BackupStore, name: str) -> None:
    """A local destination gets the subdirectory a name lives in (an object store needs none)."""
    if "/" not in name:
        return
    from engram.fsutil import ensure_private_dir
    from engram.storage import LocalBackupStore

    if isinstance(dst, LocalBackupStore):
        ensure_private_dir(dst.path(name).parent)


def _discard(dst: BackupStore, temp: TempObject) -> None:
    try:
        dst.discard(temp)
    except Exception as e:  # the copy's own failure is what the caller must see
        log.warning("could not remove what the failed copy made at %s (%s)", dst.describe(), e)


def copy_backup(
    src: Ref | Source,
    dst: BackupStore,
    name: str | None = None,
    *,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Copied:
    """Copy the backup ``src`` to ``dst`` as ``name`` (default: the same name), with its
    sidecar, history files and catalog entry (module docstring). NotCopied, CopyCorrupt,
    NameTaken, or the stores' own errors; on any failure nothing of this copy stays at ``dst``
    but what was complete before it."""
    s = src if isinstance(src, Source) else check_source(src)
    name = name or s.ref.name
    where = dst.describe(name)
    present = dst.exists(name)
    if present and not _same_backup(s, dst, name):
        raise NameTaken(
            f"{where} already holds another backup (not the bytes of {s.ref.describe()}); "
            "nothing was replaced: push it under another name or to another repository"
        )
    side = sidecar_name(name)
    side_there = dst.exists(side)
    encrypted_there = present and plaintext_of(dst, name) is not None
    if side_there and not encrypted_there and dst.read(side) != s.sidecar_bytes:
        try:
            same = decode_sidecar(dst.read(side), side) == s.sha256
        except EngramError:
            same = False
        if not same:
            raise NameTaken(
                f"{dst.describe(side)} already exists and names other bytes than "
                f"{s.ref.describe()}; nothing was replaced: check that repository"
            )
    plan, why = _entry_plan(s, dst, name)
    if dry_run:
        if not present:
            action = WOULD_COPY
        elif not side_there or plan == "create":
            action = WOULD_COMPLETE
        elif plan == "replace":
            action = WOULD_UPDATE
        else:
            action = PRESENT
        return Copied(name, s.ref.describe(), action, s.size, s.sha256, note=why)

    created: list[str] = []
    copied = 0
    temp: TempObject | None = None
    try:
        if not present:
            _ensure_parent(dst, name)
            temp = dst.create_temp(name)
            copied = _copy_bytes(s, temp, where, progress)
            dst.publish(temp)
            created.append(name)
        if not side_there:
            dst.create(side, s.sidecar_bytes, temp)
            created.append(side)
        if s.info.get("lineage") is not None:
            before = set(dst.list("histories/"))
            publish_lineage(dst, str(s.info["database_id"]), s.info["lineage"])
            created += sorted(set(dst.list("histories/")) - before)
        if plan == "create":
            dst.create(info_name(name), s.entry_bytes, temp)
            created.append(info_name(name))
        elif plan == "replace":
            dst.replace(info_name(name), s.entry_bytes)
        if temp is not None:
            dst.commit(temp)
    except BaseException:
        if temp is not None:
            _discard(dst, temp)
        raise
    if not present:
        action = COPIED
    elif created:
        action = COMPLETED
    elif plan == "replace":
        action = ENTRY_UPDATED
    else:
        action = PRESENT
    return Copied(name, s.ref.describe(), action, s.size, s.sha256, copied, tuple(created), why)


def _open_source(s: Source) -> tuple[BinaryIO, bool]:
    """A stream of the source's bytes, and whether it checks them against the sidecar's hash
    itself: an object store's reader is told that hash and checks it at the end of the read
    (``ObjectCorrupt``), so the bytes are hashed once, not twice."""
    store = s.ref.store
    if isinstance(store, ObjectBackupStore):
        reader = ObjectReader(store.objects, s.ref.name, sha256=s.sha256, ahead=store.read_ahead)
        return io.BufferedReader(reader, CHUNK), True  # type: ignore[return-value]
    return store.open(s.ref.name), False


def _copy_bytes(
    s: Source, temp: TempObject, where: str, progress: Callable[[int, int], None] | None
) -> int:
    """Copy the source's bytes into ``temp`` and close it; CopyCorrupt unless they hash to the
    sidecar's sha256. An upload hashes what it sends (``ObjectWriter.sha256``), and a source in
    an object store checks what it reads: the copy hashes the bytes itself only when neither
    does."""
    f, source_checks = _open_source(s)
    upload = temp.writer if isinstance(temp, ObjectTemp) else None
    h = None if source_checks or upload is not None else hashlib.sha256()
    n = 0
    with f:
        while block := f.read(CHUNK):
            if h is not None:
                h.update(block)
            temp.write(block)
            n += len(block)
            if progress is not None:
                progress(n, s.size)
    temp.sync_close()
    if upload is not None:
        got = upload.sha256
    else:
        got = h.hexdigest() if h is not None else s.sha256
    if n != s.size or got != s.sha256:
        raise CopyCorrupt(
            f"{s.ref.describe()} read {n} bytes hashing to {got[:16]}…, but its sidecar "
            f"records {s.sha256[:16]}… ({s.size} bytes): it is damaged or changed while "
            f"copied; nothing was published at {where}"
        )
    return n


# -- sync -------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    source: str
    destination: str
    dry_run: bool
    copies: list[Copied] = field(default_factory=list)
    not_copied: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    seconds: float = 0.0

    def of(self, *actions: str) -> list[Copied]:
        return [c for c in self.copies if c.action in actions]

    @property
    def bytes_copied(self) -> int:
        return sum(c.bytes_copied for c in self.copies)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "dry_run": self.dry_run,
            "backups": [c.to_json() for c in self.copies],
            "copied": len(self.of(COPIED, COMPLETED, WOULD_COPY, WOULD_COMPLETE)),
            "entries_updated": len(self.of(ENTRY_UPDATED, WOULD_UPDATE)),
            "present": len(self.of(PRESENT)),
            "bytes_copied": self.bytes_copied,
            "not_copied": [{"name": n, "why": w} for n, w in self.not_copied],
            "seconds": round(self.seconds, 3),
        }


def chain_order(backups: list[Backup]) -> list[Backup]:
    """``backups`` oldest end first, fulls before incrementals ending at the same LSN, and every
    incremental after its parent when the parent is among them."""
    ordered = sorted(backups, key=lambda b: (b.to_lsn or 0, b.kind != "full", b.name))
    by_name = {b.name: b for b in ordered}
    out: list[Backup] = []
    done: set[str] = set()

    def emit(b: Backup, trail: set[str]) -> None:
        if b.name in done or b.name in trail:
            return
        parent = by_name.get(b.parent or "")
        if parent is not None:
            emit(parent, trail | {b.name})
        done.add(b.name)
        out.append(b)

    for b in ordered:
        emit(b, set())
    return out


def _named(
    progress: Callable[[str, int, int], None] | None, name: str
) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(name, done, total)


def push(
    sources: list[Ref],
    dst: BackupStore,
    *,
    dry_run: bool = False,
    on_copy: Callable[[Copied], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Copied]:
    """Copy each backup of ``sources`` to ``dst`` under its base name (``push`` and ``pull``).
    Every source is checked before anything is copied; the first failure stops (what was
    copied before it stays, complete)."""
    checked = [check_source(r) for r in sources]
    names = [s.ref.name.rsplit("/", 1)[-1] for s in checked]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"two backups named {dup} were given; copy them to different places")
    check_destination(dst)
    if not dry_run:
        dst.prepare()
    out: list[Copied] = []
    for s, name in zip(checked, names, strict=True):
        c = copy_backup(s, dst, name, dry_run=dry_run, progress=_named(progress, name))
        out.append(c)
        if on_copy is not None:
            on_copy(c)
    return out


def sync(
    src: BackupStore,
    dst: BackupStore,
    *,
    dry_run: bool = False,
    on_copy: Callable[[Copied], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> SyncReport:
    """Copy every usable backup of ``src`` that ``dst`` lacks (or lacks part of), and carry
    newer verdicts over (module docstring). Never deletes anything at ``dst``. ``on_copy`` is
    told of each backup as it is done; the first failure stops the sync (what was copied
    before it stays, complete)."""
    t0 = time.monotonic()
    listing = list_backups(src)
    listing.check_is_repository()
    check_destination(dst)
    if not dry_run:
        dst.prepare()
    report = SyncReport(src.describe(), dst.describe(), dry_run)
    fit: list[Backup] = []
    for b in listing.backups:
        if b.usable:
            fit.append(b)
        else:
            report.not_copied.append((b.name, b.why_not()))
    for b in chain_order(fit):
        try:
            s = check_source(Ref(src, b.name))
        except NotCopied as e:  # no sidecar, or changed since it was listed
            report.not_copied.append((b.name, e.message))
            continue
        c = copy_backup(s, dst, dry_run=dry_run, progress=_named(progress, b.name))
        report.copies.append(c)
        if on_copy is not None:
            on_copy(c)
    report.seconds = time.monotonic() - t0
    return report
