"""Restoring a full backup (docs/DESIGN.md "What a backup proves", promise 3: restore never
destroys data).

1. Refuse a target held by a running server (even with --force), and a non-empty target
   without --force.
2. Extract into a fresh private staging dir beside the target, hashing the compressed stream
   (the sidecar) and every member (the manifest) in the same pass; refuse any member that is not
   a regular file the manifest names.
3. Open the staging dir: recovery replays the log records (W, S] the archive carries, so it lands
   exactly on the snapshot LSN with the manifest's digest. The digest recomputed from every row
   must equal it too (O7), and the full-text index must match the rows: checked here, the two
   side by side ("before-ready"), or — for a backup whose validation passed on these very bytes
   — left to whoever opens the data dir next as a server, recorded durably in the data dir
   first (``engram.verifying``, "deferred").
4. Only then move a non-empty target aside to ``DIR.before-restore-<timestamp>`` and rename the
   staging dir into place. On any failure the staging dir is removed and the target is untouched.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engram.backup.archive import (
    CHUNK,
    extract_stream,
    extract_verified,
    parse_archive_header,
    read_archive_header,
    sha256_file,
)
from engram.backup.catalog import PASSED, check_entry, file_facts, read_info, validation_status
from engram.backup.rowscan import recompute_digest
from engram.datadir import Layout, read_identity, read_owner
from engram.errors import BadArchive, CorruptData, EngramError, Refused, RestoreError, UsageError
from engram.format.manifest import (
    MANIFEST_NAME,
    decode_manifest,
    decode_sidecar,
    header_disagreements,
)
from engram.fsutil import Owned, create_owned_dir, fsync_dir, remove_stale
from engram.graph import Engine, EngineConfig
from engram.procs import Resources
from engram.storage import LocalBackupStore, Ref, sidecar_name
from engram.storage.objectbackup import ObjectBackupStore
from engram.storage.objects import ObjectCorrupt
from engram.tiers.warm import WarmTier, connect, index_problem
from engram.verifying import Marker, write_marker

log = logging.getLogger("engram")


@dataclass
class RestoreResult:
    archive: str
    path: str
    database_id: str
    snapshot_lsn: int
    snapshot_time: str
    digest: str
    counts: dict[str, int]
    moved_aside: str | None
    duration_s: float
    sidecar_checked: bool
    # "before-ready": the digest recomputed from every row and the index checked before the
    # data dir was placed; "deferred": left to the next server that opens it (``verify_why``).
    verification: str = "before-ready"
    verify_why: str = ""
    # What the reader should know: the sidecar was absent (``sidecar_absent``), the restore
    # repaired something on the way (a full-text index rebuilt from the rows).
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_target(to: Path, force: bool) -> None:
    owner = read_owner(to) if to.is_dir() else None
    if owner is not None:
        pid, url = owner.get("pid"), owner.get("url")
        raise RestoreError(
            f"{to} is in use by a running engram (pid {pid}{', ' + url if url else ''}); "
            "stop it first — a live data dir is never restored over"
        )
    if to.exists() and not to.is_dir():
        raise UsageError(f"{to} exists and is not a directory; choose another target")
    if to.is_dir() and any(to.iterdir()) and not force:
        raise Refused(
            f"{to} is not empty; use --force to move it aside to {to.name}.before-restore-<time> "
            "(nothing is deleted), or choose another target"
        )


def remove_stale_staging(to: Path) -> list[Path]:
    """Remove the staging dirs beside ``to`` that a killed restore or restore-pitr left (their
    owner's lock is gone; a live run's are never touched), with a warning naming each."""
    ours = re.compile(rf"^\.{re.escape(to.name)}\.(restore|restore-pitr|logs)-\d+-\d+$")
    removed = remove_stale(to.parent, lambda n: ours.match(n) is not None)
    for p in removed:
        log.warning(f"removed {p}, the staging dir of a restore that was killed")
    return removed


def staging_dir(to: Path, what: str = "restore") -> Path:
    """A fresh private dir beside ``to``, held by this process (``fsutil.create_owned_dir``)
    until it is placed or discarded, so that if this process is killed the next restore to
    ``to`` knows it is a leftover and removes it. Parents that had to be created are
    remembered, so that ``discard`` leaves the file system as it found it."""
    made = []
    for parent in reversed(to.parents):
        if not parent.exists():
            parent.mkdir(mode=0o700)
            made.append(parent)
    p = to.parent / f".{to.name}.{what}-{os.getpid()}-{time.monotonic_ns()}"
    _owners[p] = create_owned_dir(p)
    _made_parents[p] = made
    return p


_made_parents: dict[Path, list[Path]] = {}
_owners: dict[Path, Owned] = {}


def discard(staging: Path) -> None:
    """Remove a staging dir after a failure, and the parents made for it if still empty."""
    shutil.rmtree(staging, ignore_errors=True)
    owner = _owners.pop(staging, None)
    if owner is not None:
        owner.release()
    for parent in reversed(_made_parents.pop(staging, [])):
        try:
            parent.rmdir()
        except OSError:
            break


def staged(staging: Path) -> None:
    """The staging dir became the target: forget its bookkeeping and let go of it."""
    _made_parents.pop(staging, None)
    owner = _owners.pop(staging, None)
    if owner is not None:
        owner.release()


@contextmanager
def staging_for(to: Path, what: str) -> Iterator[Path]:
    """A staging dir beside ``to`` for the block, which must end by placing it; on any failure
    it is discarded (an OSError becomes a RestoreError saying ``to`` was not changed). Stale
    staging dirs of killed runs for ``to`` are removed first (``remove_stale_staging``)."""
    remove_stale_staging(to)
    staging = staging_dir(to, what)
    try:
        yield staging
    except EngramError:
        discard(staging)
        raise
    except OSError as e:
        discard(staging)
        raise RestoreError(f"{what} failed ({e.strerror or e}); {to} was not changed") from None
    except BaseException:
        discard(staging)
        raise
    staged(staging)


Archive = Path | Ref  # a backup file, or a backup in any store (an object store: streamed)


def local_archive(archive: Archive) -> Path | Ref:
    """``archive`` as a path when it is a file of a local directory (read as a file: its zstd
    frames are walked with seeks before anything is extracted), else the object of its store
    (read as a stream from its first byte to its last, never copied to local disk)."""
    if isinstance(archive, Ref):
        if isinstance(archive.store, LocalBackupStore):
            return archive.store.path(archive.name)
        return archive
    return Path(archive).absolute()


def archive_name(archive: Archive) -> str:
    """The archive's base name (``full-20251024.tar.zst``)."""
    return archive.name.rsplit("/", 1)[-1]


def describe_archive(archive: Archive) -> str:
    """How messages and results name the archive: its path, or its URL."""
    return archive.describe() if isinstance(archive, Ref) else str(archive)


def sidecar_hash(archive: Archive) -> str | None:
    if isinstance(archive, Ref):
        side = sidecar_name(archive.name)
        try:
            data = archive.store.read(side)
        except FileNotFoundError:
            return None
        return decode_sidecar(data, archive_name(archive) + ".sha256")
    path = archive.with_name(archive.name + ".sha256")
    if not path.exists():
        return None
    return decode_sidecar(path.read_bytes(), path.name)


def sidecar_absent(archive: Path | str | Ref) -> str:
    """What restore and validate-backup both say of a full archive without its sidecar, which
    both accept (docs/FORMAT.md "Restore"): every member is still checked against the manifest,
    the compressed stream against its own checksum, the header against the manifest."""
    name = archive_name(archive) if isinstance(archive, Ref) else Path(archive).name
    return (
        f"sidecar absent: {name}.sha256 is missing, so the archive's own checksums and its "
        "manifest were checked instead"
    )


def extract_backup(
    archive: Archive,
    staging: Path,
    progress: Callable[[int, int], None] | None = None,
    durable: bool = True,
) -> tuple[dict[str, Any], bool]:
    """Extract and check ``archive`` into ``staging``; returns (manifest, sidecar_checked).
    ``durable=False``: no fsyncs (a restore test that is thrown away). An archive in an object
    store is streamed (``archive.extract_stream``): every check below is the same, and all of
    them have passed when this returns."""
    archive = local_archive(archive)
    if isinstance(archive, Ref):
        return _extract_object(archive, staging, progress, durable)
    if not archive.is_file():
        raise UsageError(f"{archive} does not exist or is not a file")
    expected = sidecar_hash(archive)
    total = archive.stat().st_size
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    def mismatch(actual: str, also: str = "") -> BadArchive:
        return BadArchive(
            f"checksum mismatch: {archive.name}.sha256 says {expected[:16] if expected else ''}…, "
            f"the archive hashes to {actual[:16]}…; the archive or its sidecar is damaged — use "
            f"another backup{also}"
        )

    try:
        members, manifest_bytes, actual = extract_verified(
            archive, staging, tick, durable=durable
        )
    except BadArchive as e:
        # With a sidecar, a damaged archive is first of all one that does not match it.
        if expected is not None and (actual := sha256_file(archive)) != expected:
            raise mismatch(actual, f" ({e.message})") from None
        raise
    if expected is not None and expected != actual:
        raise mismatch(actual)
    header = read_archive_header(archive)
    manifest = _check_members(archive.name, staging, members, manifest_bytes, header)
    return manifest, expected is not None


def _extract_object(
    ref: Ref,
    staging: Path,
    progress: Callable[[int, int], None] | None,
    durable: bool,
) -> tuple[dict[str, Any], bool]:
    """``extract_backup`` of an object: one pass over its bytes, from the store to the
    staging dir. The store checks the whole object against the hash recorded with it (or its
    sidecar) at its end; the sidecar is compared here too, over the same bytes. An object
    store's reader is told the sidecar's hash and keeps the hash it took, so the bytes are
    hashed once, by the reader, not again by the extraction."""
    name = archive_name(ref)
    expected = sidecar_hash(ref)
    store = ref.store
    reader = store.reader(ref.name, expected) if isinstance(store, ObjectBackupStore) else None
    total = reader.info.size if reader is not None else store.size(ref.name)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    def mismatch(actual: str) -> BadArchive:
        return BadArchive(
            f"checksum mismatch: {name}.sha256 says {expected[:16] if expected else ''}…, the "
            f"archive hashes to {actual[:16]}…; the archive or its sidecar is damaged — use "
            "another backup"
        )

    f = io.BufferedReader(reader, CHUNK) if reader is not None else store.open(ref.name)
    try:
        with f:
            got = extract_stream(f, name, staging, tick, durable, hashed=reader is None)
    except ObjectCorrupt as e:
        actual = reader.sha256 if reader is not None else None
        if expected is not None and actual is not None and actual != expected:
            raise mismatch(actual) from None  # read to its end: the sidecar's check failed
        raise BadArchive(f"checksum mismatch: {e.message}") from None
    actual = got.sha256 if reader is None else reader.sha256
    if expected is not None and expected != actual:
        raise mismatch(actual or "")
    header = parse_archive_header(got.head, name)
    manifest = _check_members(name, staging, got.members, got.manifest, header)
    return manifest, expected is not None


def _check_members(
    name: str,
    staging: Path,
    members: dict[str, Any],
    manifest_bytes: bytes | None,
    header: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest, once the extracted members, the archive header and the identity agree
    with it (BadArchive naming what does not)."""
    if manifest_bytes is None:
        raise BadArchive(f"{name} has no {MANIFEST_NAME}; it is not a full engram backup")
    manifest = decode_manifest(manifest_bytes)
    if header is not None and (differ := header_disagreements(header, manifest)):
        raise BadArchive(
            f"{name}: the archive header disagrees with its manifest on "
            f"{', '.join(differ)}; the archive is damaged — use another backup"
        )
    files = manifest["files"]
    for name, info in files.items():
        got = members.get(name)
        if got is None:
            raise BadArchive(f"{name} is listed in the manifest but missing from the archive")
        if got.size != info["size"] or got.sha256 != info["sha256"]:
            raise BadArchive(
                f"{name} does not match the manifest (size {got.size} vs {info['size']}, sha256 "
                f"{got.sha256[:16]}… vs {info['sha256'][:16]}…); the archive is damaged"
            )
    extra = set(members) - set(files) - {MANIFEST_NAME}
    if extra:
        raise BadArchive(f"archive member {sorted(extra)[0]!r} is not in the manifest; refused")
    ident = read_identity(staging)
    if ident.database_id != manifest["database_id"]:
        raise BadArchive(
            f"identity.json says database {ident.database_id} but the manifest says "
            f"{manifest['database_id']}; the archive is inconsistent"
        )
    (staging / MANIFEST_NAME).rename(staging / "backup-manifest.json")
    return manifest


def check_landed(eng: Engine, manifest: dict[str, Any]) -> None:
    """The restored data dir opened as ``eng`` ends at the manifest's snapshot LSN with the
    manifest's digest; CorruptData naming what differs otherwise."""
    if eng.last_lsn != manifest["snapshot_lsn"]:
        raise CorruptData(
            f"the restored data ends at LSN {eng.last_lsn}, the manifest says "
            f"{manifest['snapshot_lsn']}; the backup is inconsistent — use another backup"
        )
    if eng.digest.hex != manifest["digest"]:
        raise CorruptData(
            "the restored digest differs from the manifest's; the backup is inconsistent — "
            "use another backup"
        )


def open_and_check(
    staging: Path,
    manifest: dict[str, Any],
    recompute: bool = True,
    index_repairs: list[str] | None = None,
    resources: Resources | None = None,
    check_index: bool = True,
) -> Engine:
    """Open a staged restore (recovery lands on S), check the digest against the manifest and
    the full-text index against the rows: an engine is never handed back with an index that
    disagrees with them. A damaged index is an error (the backup is not good as it is), unless
    ``index_repairs`` is given: the index is then rebuilt from the rows, which the digest
    proves (here, or with ``recompute=False`` by the caller before the restore is used), and
    a line saying so is logged and appended to ``index_repairs``. The digest recompute uses
    the cores ``resources`` allows (default: a command at normal priority); with two or more,
    the index check runs beside it. ``check_index=False`` leaves the index check out (a
    deferred restore: ``engram.verifying`` runs it later)."""
    cfg = EngineConfig(checkpoint_interval=3600)
    try:
        eng = Engine.open(staging, cfg, create=False)
    except (CorruptData, sqlite3.DatabaseError):
        # Replaying (W, S] onto a damaged index can fail: if the index is the cause, rebuild it
        # (the rows at W are what the replay starts from) and open again.
        if not _index_repaired(staging, index_repairs):
            raise
        eng = Engine.open(staging, cfg, create=False)
    try:
        check_landed(eng, manifest)
        res = resources or Resources.normal()
        # The index check holds no GIL (SQLite works in C): with a second core to use it runs
        # on a connection of its own beside the row scan, on the committed state both read.
        beside = _IndexCheck(eng) if check_index and res.scan_workers > 1 else None
        try:
            if recompute and recompute_digest(eng, res).hex != manifest["digest"]:
                raise CorruptData(
                    "the digest recomputed from the restored graph differs from the manifest's; "
                    "the backup is damaged — use another backup"
                )
        except BaseException:
            if beside is not None:
                beside.thread.join()
            raise
        problem = beside.result() if beside is not None else None
        with eng.lock:
            if beside is None and check_index:
                problem = eng.warm.index_problem()
            if problem is not None:
                _repair(problem, index_repairs)
                eng.warm.rebuild_index()
                if (again := eng.warm.index_problem()) is not None:
                    raise CorruptData(
                        f"the restored full-text index does not match the rows even after a "
                        f"rebuild ({again}); the backup is damaged — use another backup"
                    )
    except BaseException:
        eng.close()
        raise
    return eng


class _IndexCheck:
    """FTS5's check of the engine's index against its rows, in a thread, on a connection of
    its own to the committed file (the engine's own state is committed first)."""

    def __init__(self, eng: Engine) -> None:
        eng.checkpoint()
        self.path = eng.warm.path
        self.problem: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="engram-index-check", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn = connect(self.path)
            try:
                self.problem = index_problem(conn, self.path, readonly=False)
            finally:
                conn.close()
        except BaseException as e:  # re-raised in the caller's thread
            self.error = e

    def result(self) -> str | None:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.problem


def _repair(problem: str, index_repairs: list[str] | None) -> None:
    """Refuse a damaged index when no repair was asked for, else say it is being rebuilt."""
    if index_repairs is None:
        raise CorruptData(
            f"the backup's full-text index does not match its rows ({problem}); the backup is "
            "damaged — use another one (`engram restore` of it rebuilds the index from the rows)"
        )
    note = (
        f"the backup's full-text index did not match its rows ({problem}); it was rebuilt "
        "from the rows"
    )
    log.warning("%s", note)
    index_repairs.append(note)


def _index_repaired(staging: Path, index_repairs: list[str] | None) -> bool:
    """Check the staged warm tier's index before recovery; rebuild it if it is damaged.
    False when the index is sound (the failure lies elsewhere)."""
    try:
        warm = WarmTier(Layout(staging).warm_db)
    except EngramError:
        return False
    try:
        problem = warm.index_problem()
        if problem is None:
            return False
        _repair(problem, index_repairs)
        warm.rebuild_index()
        return True
    finally:
        warm.close()


def place(staging: Path, to: Path, force: bool) -> str | None:
    """Move ``to`` aside when needed, then rename ``staging`` into place."""
    check_target(to, force)
    aside = None
    if to.is_dir():
        if any(to.iterdir()):
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside_path = to.with_name(f"{to.name}.before-restore-{stamp}")
            n = 1
            while aside_path.exists():
                n += 1
                aside_path = to.with_name(f"{to.name}.before-restore-{stamp}-{n}")
            os.rename(to, aside_path)
            aside = str(aside_path)
        else:
            to.rmdir()
    os.rename(staging, to)
    fsync_dir(to.parent)
    return aside


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


VERIFY_MODES = ("auto", "before-ready")
# The validation level whose restore test recomputed the digest and checked the index.
DEFER_LEVEL = 3


def deferrable(archive: Archive, sha256: str | None) -> tuple[Marker | None, str]:
    """Whether the digest check of a restore of ``archive`` (whose bytes hash to ``sha256``,
    None when no sidecar vouched for them) may finish after the data dir is ready: only when
    its catalog entry is intact (checksum, the file's own header, sidecar, size), says its
    validation passed at level 3 or more, and names these very bytes. Returns the marker's
    facts for it (lsn and digest filled in by the caller) or None, and why."""
    if sha256 is None:
        return None, "no sidecar ties the archive to a validation"
    info = read_info(archive)
    if info is None:
        return None, "the backup has no catalog entry, so no validation verdict"
    try:
        problems = check_entry(archive, info, file_facts(archive))
    except EngramError as e:
        problems = [e.message]
    if problems:
        return None, f"its catalog entry cannot be trusted ({problems[0]})"
    status = validation_status(info)
    v = info.get("validation") or {}
    level = v.get("level") if isinstance(v, dict) else None
    if status != PASSED:
        return None, f"its validation verdict is {status!r}"
    if not isinstance(level, int) or level < DEFER_LEVEL:
        return None, f"it was validated at level {level}, which does not recompute the digest"
    if info.get("sha256") != sha256:
        return None, "its catalog entry names other bytes than the archive's"
    at = str(v.get("at") or "")
    return (
        Marker(0, "", archive_name(archive), sha256, level, at, ""),
        f"the backup passed validation at level {level}{' at ' + at if at else ''}",
    )


def restore(
    archive: Archive,
    to: Path,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    verify: str = "auto",
) -> RestoreResult:
    """Restore ``archive`` into ``to``. ``verify``: "auto" defers the digest recompute and
    the index check to the next server when the backup passed validation (``deferrable``),
    else runs them before the data dir is placed; "before-ready" always runs them first."""
    if verify not in VERIFY_MODES:
        raise UsageError(f"--verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    archive, to = local_archive(archive), Path(to).absolute()
    t0 = time.monotonic()
    check_target(to, force)
    with staging_for(to, "restore") as staging:
        manifest, checked = extract_backup(archive, staging, progress)
        warnings = [] if checked else [sidecar_absent(archive)]
        repairs: list[str] = []
        marker, why = None, "--verify=before-ready"
        if verify == "auto":
            marker, why = deferrable(archive, sidecar_hash(archive) if checked else None)
        now = marker is None
        eng = open_and_check(
            staging, manifest, recompute=now, index_repairs=repairs, check_index=now
        )
        try:
            if marker is not None:
                # The engine's digest at S is the manifest's (open_and_check); the rows' and
                # the index's checks are recorded before the data dir can be placed.
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                write_marker(
                    staging,
                    Marker(
                        manifest["snapshot_lsn"],
                        manifest["digest"],
                        marker.backup,
                        marker.backup_sha256,
                        marker.validation_level,
                        marker.validated_at,
                        stamp,
                    ),
                )
            # Its first write of its own starts a new history (docs/DESIGN.md "Histories").
            eng.mark_recovered("restore", archive_name(archive))
        finally:
            eng.close()
        fsync_tree(staging)
        aside = place(staging, to, force)
    return RestoreResult(
        archive=describe_archive(archive),
        path=str(to),
        database_id=manifest["database_id"],
        snapshot_lsn=manifest["snapshot_lsn"],
        snapshot_time=manifest["snapshot_time"],
        digest=manifest["digest"],
        counts=manifest["counts"],
        moved_aside=aside,
        duration_s=round(time.monotonic() - t0, 3),
        sidecar_checked=checked,
        verification="deferred" if marker is not None else "before-ready",
        verify_why=why,
        warnings=warnings + repairs,
    )
