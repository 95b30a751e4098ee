"""A repository of backups: a directory (any ``storage.BackupStore``) listed and chosen from
through its catalog (docs/FORMAT.md "Catalog entry"), as restic's ``snapshots`` and
pgBackRest's ``info`` do.

- ``list_backups`` says of every backup in the store what it covers and whether a choice may use
  it. It reads the catalog entries and, to check each against its file, only the file's header
  (a few KB), its sidecar and its size: no archive is decompressed, so it stays fast with
  thousands of backups.
- ``choose_fulls`` orders the full backups a restore may use, newest first, and says which newer
  ones it passed over and why: an entry that disagrees with its file or is missing, a validation
  that failed or never finished (the same rule as ``restore-pitr --repo``'s choice).
- ``restore_from_repo`` restores the newest of them, or the one named, and falls back to the
  next older one when the restore itself refuses an archive (damage the catalog's cheap checks
  cannot see), saying so. A refusal because of the target (not empty, in use) never falls back.

Backups are named by their key in the store (``full-20251024.tar.zst``, ``sub/x.log``): the id
``engram backups`` prints and ``engram restore --backup`` takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engram.backup.catalog import (
    FAILED,
    NOT_VALIDATED,
    PASSED,
    PENDING,
    Entry,
    file_facts,
    read_catalog,
)
from engram.errors import BadArchive, CorruptData, EngramError, RestoreError, UsageError
from engram.format import record as fmt
from engram.format.manifest import compression_for
from engram.model import ns_to_iso
from engram.storage import BackupStore, Ref, as_store, info_name, sidecar_name
from engram.storage.base import INFO_SUFFIX, SIDECAR_SUFFIX

if TYPE_CHECKING:
    from engram.backup.restore import RestoreResult

# The validation column of a backup whose entry is not trusted (or absent): nothing is known.
UNKNOWN = "unknown"
# What keeps a backup out of every choice, besides its validation: its entry disagrees with its
# file (or its header cannot be read), it has no entry, or its entry has no file.
DAMAGED, NO_ENTRY, FILE_MISSING = "damaged", "no entry", "file missing"


def is_backup_name(name: str) -> bool:
    """Whether ``name`` is a backup's own file (a full archive or an incremental), not one of
    its sidecar or catalog entry."""
    return compression_for(name) is not None or name.endswith(".log")


@dataclass(frozen=True)
class Backup:
    """One backup of a repository, as its catalog entry (or, when the entry is not trusted, its
    file's header) describes it."""

    name: str  # its key in the store: the id
    kind: str  # "full", "incremental", or "unknown" when neither entry nor header says
    database_id: str | None
    history: str | None  # the history it belongs to, when its entry records one
    from_lsn: int | None
    to_lsn: int | None
    from_time_ns: int | None
    to_time_ns: int | None
    size: int | None
    parent: str | None  # incrementals: the backup the range continues
    validation: str  # passed, failed, pending, not validated; UNKNOWN without a trusted entry
    reason: str | None  # a failed validation's reason
    problem: str | None  # why the entry is not trusted, or why there is none
    trouble: str | None  # DAMAGED, NO_ENTRY or FILE_MISSING when ``problem`` is set
    sidecar: bool  # NAME.sha256 is there
    legacy: bool = False  # an entry from before archive headers: checked by its sidecar only
    entry: Entry | None = field(default=None, compare=False, repr=False)
    encrypted: bool = False  # its entry says it is an age file (restoring it needs an identity)

    @property
    def usable(self) -> bool:
        """A choice may use it: its entry is trusted and it passed validation or was not
        validated (never one that failed, or whose validation is pending)."""
        return self.problem is None and self.validation in (PASSED, NOT_VALIDATED)

    @property
    def flags(self) -> list[str]:
        """What an operator must look at, worst first."""
        out = [self.trouble] if self.trouble is not None else []
        if self.validation == FAILED:
            out.append("failed")
        elif self.validation == PENDING:
            out.append("pending")
        elif self.validation == NOT_VALIDATED:
            out.append("unvalidated")
        if not self.sidecar:
            out.append("no sidecar")
        if self.legacy:
            out.append("legacy")
        return out

    def why_not(self) -> str:
        """Why a choice passes over it (``usable`` is False)."""
        if self.problem is not None:
            return self.problem
        if self.validation == FAILED:
            return f"it failed validation ({self.reason or 'no reason recorded'})"
        if self.validation == PENDING:
            return (
                "its validation is pending (it never finished, or its verdict could not be "
                f"recorded) — run `engram validate-backup {self.name}`"
            )
        return "it is usable"

    def newest_key(self) -> tuple[int, int, str]:
        """Order of recency: the time of the last write it holds, then its LSN, then the name."""
        return (self.to_time_ns or 0, self.to_lsn or 0, self.name)

    def to_json(self, now_ns: int) -> dict[str, Any]:
        return {
            "id": self.name,
            "kind": self.kind,
            "database_id": self.database_id,
            "history": self.history,
            "from_lsn": self.from_lsn,
            "to_lsn": self.to_lsn,
            "from_time_ns": self.from_time_ns,
            "to_time_ns": self.to_time_ns,
            "from_time": ns_to_iso(self.from_time_ns) if self.from_time_ns else None,
            "to_time": ns_to_iso(self.to_time_ns) if self.to_time_ns else None,
            "size": self.size,
            "parent": self.parent,
            "validation": self.validation,
            "reason": self.reason,
            "age_s": age_s(self, now_ns),
            "usable": self.usable,
            "flags": self.flags,
            "problem": self.problem,
            "sidecar": self.sidecar,
            "legacy": self.legacy,
            "encrypted": self.encrypted,
        }


def age_s(b: Backup, now_ns: int) -> float | None:
    """How old the newest write a backup holds is (what restoring it would lose, at most)."""
    if not b.to_time_ns:
        return None
    return round(max(0, now_ns - b.to_time_ns) / 1e9, 3)


@dataclass
class Listing:
    repository: str
    backups: list[Backup]  # oldest first
    now_ns: int = field(default_factory=time.time_ns)
    # Objects that are no part of an engram repository (neither a backup, its sidecar or
    # entry, nor a history file), in name order.
    foreign: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "backups": [b.to_json(self.now_ns) for b in self.backups],
            "count": len(self.backups),
            "flagged": sum(1 for b in self.backups if b.flags),
            "foreign": len(self.foreign),
        }

    def check_is_repository(self) -> None:
        """UsageError when the store holds no backup but holds other things: it is not an
        engram repository (a mistyped prefix or directory), which an empty listing would hide.
        An empty store is a repository with no backups yet."""
        if self.backups or not self.foreign:
            return
        shown = ", ".join(self.foreign[:3]) + (", …" if len(self.foreign) > 3 else "")
        n = len(self.foreign)
        raise UsageError(
            f"{self.repository} is not an engram repository: no catalog entries (*.info.json) "
            f"and {n} object{'s' if n != 1 else ''} that engram did not write ({shown}); "
            "give the directory or s3:// prefix that holds the backups"
        )


def check_destination(store: BackupStore) -> None:
    """UsageError when ``store`` holds objects but none that a repository holds (a mistyped
    prefix or directory): copies never go into something that is not a repository. An empty
    store, or one holding any backup, sidecar, entry or history file, is a repository; only
    names are listed, nothing is read."""
    names = store.list()
    if not names or any(_is_ours(n) for n in names):
        return
    Listing(store.describe(), [], foreign=names).check_is_repository()


def _is_ours(name: str) -> bool:
    """Whether ``name`` can be part of a repository: a backup, its sidecar or catalog entry,
    or a history file."""
    base = name.removesuffix(SIDECAR_SUFFIX).removesuffix(INFO_SUFFIX)
    return is_backup_name(base) or name.startswith("histories/")


def _from_entry(
    e: Entry, present: set[str], problem: str | None = None, size: int | None = None
) -> Backup:
    """A backup as its trusted entry says (``problem`` None), or as its header says when its
    entry is not trusted (``problem``, with the file's ``size``)."""
    info = e.info or {}
    name = _name(e)
    if problem is None and isinstance(info.get("size"), int):
        size = info["size"]
    history = getattr(e, "history", None) or info.get("history")
    return Backup(
        name=name,
        kind=e.kind,
        database_id=e.database_id,
        history=str(history) if history else None,
        from_lsn=e.from_lsn,
        to_lsn=e.to_lsn,
        from_time_ns=e.from_time_ns or None,
        to_time_ns=e.to_time_ns or None,
        size=size,
        parent=info.get("parent") if isinstance(info.get("parent"), str) else None,
        validation=UNKNOWN if problem is not None else e.status,
        reason=((info.get("validation") or {}).get("reason") if e.status == FAILED else None),
        problem=problem,
        trouble=None if problem is None else DAMAGED,
        sidecar=sidecar_name(name) in present,
        legacy=not e.verified,
        entry=e,
        encrypted=isinstance(info.get("encryption"), dict),
    )


def _name(e: Entry) -> str:
    return e.ref.name if e.ref is not None else e.name


def _bare(name: str, kind: str, problem: str, trouble: str, present: set[str]) -> Backup:
    """A backup nothing trustworthy describes: only its name, and what is wrong."""
    return Backup(
        name=name,
        kind=kind,
        database_id=None,
        history=None,
        from_lsn=None,
        to_lsn=None,
        from_time_ns=None,
        to_time_ns=None,
        size=None,
        parent=None,
        validation=UNKNOWN,
        reason=None,
        problem=problem,
        trouble=trouble,
        sidecar=sidecar_name(name) in present,
    )


def _kind_by_name(name: str) -> str:
    return "full" if compression_for(name) else "incremental"


def list_backups(where: Path | str | BackupStore) -> Listing:
    """Every backup in ``where`` (a store, or a directory and one level of subdirectories), each
    checked against its file's header, sidecar and size (``catalog.read_catalog``); files
    without an entry and entries without a file are listed too, flagged."""
    store = as_store(where)
    names = store.list()
    present = set(names)
    cat = read_catalog(store)
    out = [_from_entry(e, present) for e in cat.entries]
    from_files = {_name(e): e for e in cat.from_files}
    for p in cat.problems:
        reason = (
            f"its catalog entry is not trusted ({p.reason}) — run `engram validate-backup "
            f"{p.where or p.path}` to check the backup and rebuild its entry"
        )
        known = from_files.get(p.name)
        if known is not None:
            out.append(_from_entry(known, present, reason, store.size(p.name)))
        else:
            out.append(_bare(p.name, _kind_by_name(p.name), reason, DAMAGED, present))
    listed = {b.name for b in out}
    for n in names:
        if n in listed:
            continue
        if is_backup_name(n) and info_name(n) not in present:
            if _foreign_log(store, n, present):
                continue
            out.append(_no_entry(store, n, present))
        elif n.endswith(INFO_SUFFIX) and n[: -len(INFO_SUFFIX)] not in present:
            gone = n[: -len(INFO_SUFFIX)]
            if is_backup_name(gone):
                why = "its catalog entry is there but its file is missing"
                out.append(_bare(gone, _kind_by_name(gone), why, FILE_MISSING, present))
    out.sort(key=lambda b: (b.to_time_ns or 0, b.to_lsn or 0, b.kind != "full", b.name))
    listed = {b.name for b in out}
    foreign = [n for n in names if not _is_ours(n) or (is_backup_name(n) and n not in listed)]
    return Listing(store.describe(), out, foreign=foreign)


def _foreign_log(store: BackupStore, name: str, present: set[str]) -> bool:
    """A ``.log`` with neither catalog entry nor sidecar that is no engram log (a server's or
    an application's log kept beside the backups): not a backup, so not listed. One with a
    sidecar is a backup whatever its first bytes say (damage is reported, not hidden)."""
    if not name.endswith(".log") or sidecar_name(name) in present:
        return False
    try:
        with store.open(name) as f:
            return bool(f.read(len(fmt.MAGIC)) != fmt.MAGIC)
    except OSError:
        return False


def _no_entry(store: BackupStore, name: str, present: set[str]) -> Backup:
    """A backup file without a catalog entry: described by its own header when it has one."""
    problem = (
        f"it has no catalog entry ({info_name(name)}), so no choice uses it; give its path "
        "to restore --from, apply-log or validate-backup"
    )
    try:
        facts = file_facts(Ref(store, name))
    except (OSError, EngramError) as e:
        msg = e.message if isinstance(e, EngramError) else (e.strerror or str(e))
        why = f"{problem}; its header cannot be read ({msg})"
        return _bare(name, _kind_by_name(name), why, NO_ENTRY, present)
    if facts is None:
        return _bare(name, "full", problem, NO_ENTRY, present)
    size = store.size(name)
    return Backup(
        name=name,
        kind=str(facts["kind"]),
        database_id=str(facts["database_id"]),
        history=str(facts["history"]) if facts.get("history") else None,
        from_lsn=int(facts.get("from_lsn", 1)),
        to_lsn=int(facts["snapshot_lsn"]),
        from_time_ns=int(facts.get("from_time_ns", 0)) or None,
        to_time_ns=int(facts.get("snapshot_time_ns", 0)) or None,
        size=size,
        parent=facts.get("parent"),
        validation=UNKNOWN,
        reason=None,
        problem=problem,
        trouble=NO_ENTRY,
        sidecar=sidecar_name(name) in present,
    )


# -- choosing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    """A full backup a choice passed over, and why."""

    name: str
    reason: str

    def text(self) -> str:
        return f"{self.name} ({self.reason})"


@dataclass
class Choice:
    candidates: list[Backup]  # usable full backups, newest first
    skipped: list[Skipped]  # newer full backups passed over


def choose_fulls(listing: Listing) -> Choice:
    """The full backups ``engram restore --repo --latest`` may restore, newest first, and every
    full backup newer than the newest of them that it passes over, with why. A backup whose
    position is unknown (its header cannot be read) is always named as skipped."""
    fulls = [b for b in listing.backups if b.kind == "full"]
    fulls.sort(key=Backup.newest_key, reverse=True)
    candidates = [b for b in fulls if b.usable]
    newest = candidates[0].newest_key() if candidates else None
    skipped = [
        Skipped(b.name, b.why_not())
        for b in fulls
        if not b.usable and (newest is None or b.to_lsn is None or b.newest_key() > newest)
    ]
    return Choice(candidates, skipped)


def find(listing: Listing, name: str) -> Backup:
    """The backup ``name`` of the listing (its id); UsageError naming the repository if none."""
    for b in listing.backups:
        if b.name == name:
            return b
    raise UsageError(
        f"no backup named {name!r} in {listing.repository}; `engram backups --repo "
        f"{listing.repository}` lists them"
    )


# -- restoring ---------------------------------------------------------------------------------


@dataclass
class RepoRestore:
    result: RestoreResult
    repository: str
    backup: str  # the id of the backup restored
    skipped: list[Skipped]  # newer full backups passed over (latest), and why
    notes: list[str]  # what the catalog says of a backup restored by name that is not good

    def to_json(self) -> dict[str, Any]:
        return self.result.to_json() | {
            "repository": self.repository,
            "backup": self.backup,
            "skipped": [asdict(s) for s in self.skipped],
            "notes": self.notes,
        }


def _named(listing: Listing, name: str) -> tuple[Backup, list[str]]:
    b = find(listing, name)
    if b.kind == "incremental":
        raise UsageError(
            f"{name} is an incremental backup; restore a full backup and apply it with "
            "`engram apply-log`, or use `engram restore-pitr --repo`"
        )
    if b.validation == FAILED:
        raise RestoreError(
            f"{name} failed validation ({b.reason or 'no reason recorded'}); choose another "
            f"backup (`engram backups --repo {listing.repository}`), or restore it anyway "
            "with --from"
        )
    notes = []
    if b.problem is not None:
        notes.append(f"{name}: {b.problem}; the restore checks the archive itself in full")
    elif b.validation == PENDING:
        notes.append(f"{name}: {b.why_not()}; the restore checks the archive itself in full")
    return b, notes


def restore_from_repo(
    repo: Path | str | BackupStore,
    to: Path,
    name: str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    verify: str = "auto",
    source: Callable[[Ref], AbstractContextManager[Path | Ref]] | None = None,
) -> RepoRestore:
    """Restore the full backup ``name`` of ``repo``, or (``name`` None) the newest usable one,
    into ``to`` (``restore.restore``: every check, nothing destroyed). Without a name, a backup
    whose restore refuses the archive (BadArchive, CorruptData: ``to`` is untouched then) is
    skipped for the next older one; the result names every backup passed over and why.
    RestoreError when none is left. ``source`` turns the chosen backup into what the restore
    reads (an encrypted one: its decrypted copy, checked before it is handed on)."""
    # Imported here: listing a repository needs none of the restore machinery.
    from engram.backup.restore import check_target, restore

    store = as_store(repo)
    to = Path(to).absolute()
    check_target(to, force)
    listing = list_backups(store)

    def restore_one(backup: str) -> RestoreResult:
        ref = Ref(store, backup)
        if source is None:
            return restore(ref, to, force, progress, verify)
        with source(ref) as src:
            res = restore(src, to, force, progress, verify)
        res.archive = ref.describe()  # the backup, not the copy that was read
        return res

    if name is not None:
        chosen, notes = _named(listing, name)
        res = restore_one(chosen.name)
        return RepoRestore(res, listing.repository, chosen.name, [], notes)
    choice = choose_fulls(listing)
    skipped = list(choice.skipped)
    for b in choice.candidates:
        try:
            res = restore_one(b.name)
        except (BadArchive, CorruptData) as e:
            skipped.append(Skipped(b.name, f"the restore refused it: {e.message}"))
            continue
        return RepoRestore(res, listing.repository, b.name, skipped, [])
    if not skipped:
        listing.check_is_repository()
        raise UsageError(
            f"no full backup in {listing.repository} — give the directory that holds the backups"
            f" (`engram backups --repo {listing.repository}` lists what is there)"
        )
    why = f"; skipped: {'; '.join(s.text() for s in skipped)}"
    raise RestoreError(
        f"no intact full backup in {listing.repository} to restore{why} — see `engram backups "
        f"--repo {listing.repository}`"
    )
