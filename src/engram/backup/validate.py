"""``engram validate-backup``: a backup proved at four levels (docs/DESIGN.md "Validation
levels").

L1 manifest and structure · L2 sidecar and per-file checksums, record CRCs, chain continuity ·
L3 restore into a temp dir, ``verify --check-all``, digest equality · L4 a short read benchmark.
A backup that fails any check is reported as FAIL with the first reason; every step's outcome
is kept. The result is recorded in the backup's catalog entry, which is first checked against
the file (``catalog.check_entry``): a damaged or disagreeing entry is rebuilt from the file's own
header (said in the report), never written into. The entry says validation "pending" while the
checks run, so a validation that is killed, or whose verdict cannot be recorded (a full disk),
never leaves a backup looking good.

The work dir (a restore test: a full copy of the database) is made in $TMPDIR, held by this
process (``fsutil.create_owned_dir``) and always removed; those of killed validations are
removed by the next one, with a warning naming each.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engram.backup.archive import (
    ARCHIVE_HEAD_BYTES,
    parse_archive_header,
    read_archive_header,
    sha256_file,
)
from engram.backup.catalog import (
    FAILED,
    LOCAL,
    PASSED,
    PENDING,
    CatalogError,
    EntryWriter,
    check_entry,
    facts_from_log_header,
    facts_from_manifest,
    file_facts,
    info_path,
    read_info,
    rebuilt_entry,
    replace_info,
    validation_status,
)
from engram.backup.pitr import (
    Target,
    choose_path,
    collect_logs,
    local_logs,
    restore_pitr,
    scan_logs,
)
from engram.backup.readbench import validation_benchmark
from engram.backup.restore import (
    archive_name,
    check_landed,
    extract_backup,
    local_archive,
    sidecar_absent,
    sidecar_hash,
)
from engram.backup.verify import verify_data_dir
from engram.errors import BadArchive, CorruptData, EngramError, UsageError
from engram.format import record as fmt
from engram.format.history import header_lineage
from engram.format.manifest import compression_for, decode_sidecar
from engram.fsutil import Owned, create_owned_dir, remove_stale
from engram.graph import Engine, EngineConfig
from engram.model import ns_to_iso
from engram.oplog.reader import iter_log_files, list_segments, read_header
from engram.procs import Resources
from engram.storage import BackupStore, Ref, info_name

log = logging.getLogger("engram")
WORKDIR_PREFIX = "engram-validate-"
_WORKDIR = re.compile(rf"^{WORKDIR_PREFIX}\d+-\d+$")


@dataclass
class Step:
    level: int
    name: str
    ok: bool
    detail: str
    duration_s: float


@dataclass
class ValidationReport:
    path: str
    kind: str
    level: int
    ok: bool = True
    reason: str | None = None
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    benchmark: dict[str, Any] | None = None
    # The catalog entry: None = the backup has none (nothing recorded); True = the verdict is
    # in it; False = it could not be recorded (``record_error`` says why and what state the
    # entry was left in).
    recorded: bool | None = None
    record_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def verdict(self) -> str:
        return "PASS" if self.ok else f"FAIL: {self.reason}"


class _Failed(Exception):
    pass


class _Runner:
    def __init__(
        self,
        report: ValidationReport,
        progress: Callable[[str], None] | None,
        resources: Resources,
    ) -> None:
        self.report = report
        self.progress = progress
        self.resources = resources  # what the restore test and verify may use
        self.facts: dict[str, Any] | None = None  # what the file says it holds, once read

    def step(
        self,
        level: int,
        name: str,
        fn: Callable[[], str],
        elsewhere: Callable[[], float] | None = None,
    ) -> None:
        """Run one step; its time is the call's, less ``elsewhere()``: the time spent inside it
        on another step's work (the read benchmark, run during verify), or, negative, the time
        spent on this step's work inside another."""
        if self.progress:
            self.progress(name)
        t0 = time.monotonic()
        try:
            detail = fn()
            ok = True
        except EngramError as e:
            detail, ok = e.message, False
        except OSError as e:
            detail, ok = f"I/O error: {e.strerror or e}", False
        took = time.monotonic() - t0 - (elsewhere() if elsewhere else 0.0)
        self.report.steps.append(Step(level, name, ok, detail, round(took, 3)))
        if not ok:
            self.report.ok = False
            self.report.reason = f"{name}: {detail}"
            raise _Failed


def _check_sidecar(run: _Runner, path: Path) -> str:
    """The incremental's sidecar against the file. Without one the file is accepted on its
    records' own CRCs, as apply-log and restore-pitr accept it, with a warning saying so."""
    side = path.with_name(path.name + ".sha256")
    if not side.exists():
        run.report.warnings.append(
            f"sidecar absent: {side.name} is missing, so every record's CRC was checked instead"
        )
        return f"{side.name} absent"
    expected = decode_sidecar(side.read_bytes(), side.name)
    actual = sha256_file(path)
    if expected != actual:
        raise BadArchive(
            f"checksum mismatch ({side.name} says {expected[:16]}…, file is {actual[:16]}…)"
        )
    return f"sha256 {actual[:16]}… matches {side.name}"


def _has_header(path: Path | Ref) -> bool:
    if isinstance(path, Path):
        return read_archive_header(path) is not None
    with path.store.open(path.name) as f:
        return parse_archive_header(f.read(ARCHIVE_HEAD_BYTES), archive_name(path)) is not None


def _validate_full(
    run: _Runner, path: Path | Ref, level: int, work: Path, p50_warn_ms: float, bench_s: float
) -> None:
    name = archive_name(path)
    staging = work / "restore"
    staging.mkdir(mode=0o700)
    holder: dict[str, Any] = {}

    def structure() -> str:
        # A restore test, thrown away afterwards: no fsyncs (validation often runs on a
        # machine a server shares, whose writers fsync their log). The extraction also checks
        # the sidecar (when there is one), every member against the manifest and the archive
        # header against the manifest; step 2 says which of these it could check.
        expected = sidecar_hash(path)
        manifest, sidecar_checked = extract_backup(path, staging, durable=False)
        holder.update(
            manifest=manifest,
            sha256=expected if sidecar_checked else None,
            header=_has_header(path),
        )
        run.facts = facts_from_manifest(manifest)
        m = manifest
        return (
            f"manifest ok: database {m['database_id']}, snapshot LSN {m['snapshot_lsn']} at "
            f"{m['snapshot_time']}, {m['counts'].get('memories', 0)} memories, "
            f"{m['counts'].get('edges', 0)} edges, {len(m['files'])} files"
        )

    run.step(1, "structure", structure)

    def checksums() -> str:
        # Without a sidecar the archive passes on its own checksums, as restore passes it,
        # and both say so in the same words (restore.sidecar_absent).
        m = holder["manifest"]
        if holder["sha256"] is None:
            run.report.warnings.append(sidecar_absent(path))
            side = f"{name}.sha256 absent"
        else:
            side = f"sha256 {holder['sha256'][:16]}… equal to {name}.sha256"
        header = (
            "archive header equal to the manifest"
            if holder["header"]
            else "no archive header (written before headers)"
        )
        return (
            f"{side}; {len(m['files'])} members' size and sha256 equal to the manifest; "
            f"{header}; {_log_records(staging, m)}"
        )

    run.step(2, "checksums", checksums)
    if level < 3:
        return

    def restore_check() -> str:
        _open_restored(staging, holder["manifest"])
        return (
            f"restored to LSN {holder['manifest']['snapshot_lsn']}; digest equal to the manifest's"
        )

    run.step(3, "restore", restore_check)

    _verify_and_bench(run, staging, level, p50_warn_ms, bench_s)


def _open_restored(staging: Path, manifest: dict[str, Any]) -> None:
    """Open the extracted copy (recovery replays (W, S]) and require it to land on the
    manifest's snapshot LSN with the manifest's digest, then close it (the close commits S).

    What a restore checks besides — the full-text index against the rows and the digest
    recomputed from every row — is left to verify --check-all, which runs next on this same
    file and proves both once: the index check (no GIL held) beside the row scan that checks
    and hashes every row."""
    eng = Engine.open(staging, EngineConfig(checkpoint_interval=3600), create=False)
    try:
        check_landed(eng, manifest)
    finally:
        eng.close()


def _log_records(staging: Path, manifest: dict[str, Any]) -> str:
    """Check the log records (W, S] an extracted full backup carries, without applying them:
    every record's CRC, LSN continuity from the warm copy's LSN W, and an end at the snapshot
    LSN S the manifest names."""
    w, s = manifest["warm_lsn"], manifest["snapshot_lsn"]
    files = [p for _, p in list_segments(staging / "oplog")]
    last, n = w, 0
    for rec in iter_log_files(files, manifest["database_id"], w):
        last, n = rec.lsn, n + 1
    if last != s:
        raise BadArchive(
            f"the archive's log records end at LSN {last}, its manifest's snapshot LSN is {s}; "
            "the archive is inconsistent — use another backup"
        )
    if not n:
        return "no log records (the warm copy is at the snapshot LSN)"
    return f"{n} log record CRCs and LSN continuity {w + 1}..{s} ok"


def _verify_and_bench(
    run: _Runner, data_dir: Path, level: int, p50_warn_ms: float, bench_s: float
) -> None:
    """Level 3's `verify --check-all` of a restored data dir, then level 4's benchmark.

    The benchmark is run by verify in its own thread once the row scans and the log check are
    done, while SQLite's structure check and FTS5's index check — the longest check, holding no
    GIL — finish on another core (``verify_data_dir``'s ``beside``): it reads the same file,
    and neither waits for the other. Its verdict is recorded only once verify passed."""
    bench: dict[str, Any] = {}

    def beside() -> None:
        t0 = time.monotonic()
        try:
            bench["result"] = validation_benchmark(data_dir, bench_s)
        except (EngramError, OSError) as e:
            bench["error"] = e
        finally:
            bench["seconds"] = time.monotonic() - t0

    def verify() -> str:
        rep = verify_data_dir(
            data_dir,
            check_all=True,
            resources=run.resources,
            beside=beside if level >= 4 else None,
        )
        if rep.index_problem is not None:
            # The backup's index, not a data dir's to repair in place: said as restore says it.
            raise CorruptData(
                f"the backup's full-text index does not match its rows ({rep.index_problem}); "
                "the backup is damaged — use another one (`engram restore` of it rebuilds the "
                "index from the rows)"
            )
        if not rep.ok:
            first = rep.problems[0]
            raise EngramError(
                f"{len(rep.problems)} problem(s), first: {first.location}: {first.message}"
            )
        return (
            "verify --check-all: no problems; full-text index equal to the rows; digest "
            "recomputed from every row and equal"
        )

    run.step(3, "verify", verify, elsewhere=lambda: bench.get("seconds", 0.0))
    if level < 4:
        return

    def benchmark() -> str:
        # A verify that passed ran it: ``beside`` is skipped only for a missing data dir.
        if "error" in bench:
            raise bench["error"]
        r = bench["result"]
        run.report.benchmark = r.to_json()
        if r.p50_ms > p50_warn_ms:
            run.report.warnings.append(
                f"performance degraded: read p50 {r.p50_ms} ms is above {p50_warn_ms} ms"
            )
        return f"p50 {r.p50_ms} ms, p99 {r.p99_ms} ms, {r.ops_per_s} ops/s"

    run.step(4, "benchmark", benchmark, elsewhere=lambda: -bench.get("seconds", 0.0))


def _validate_incremental(
    run: _Runner,
    path: Path,
    level: int,
    work: Path,
    p50_warn_ms: float,
    bench_s: float,
    me: Path | Ref | None = None,
    repo: Path | BackupStore | None = None,
) -> None:
    """``path`` is the incremental as a local file; ``me`` and ``repo`` name it and its
    repository where it is kept (default: ``path`` and its directory)."""
    holder: dict[str, Any] = {}
    me = path if me is None else me
    repo = path.parent if repo is None else repo

    def structure() -> str:
        h = read_header(path)
        need = ("from_lsn", "to_lsn", "digest", "database_id", "record_count")
        missing = [k for k in need if k not in h]
        if missing:
            raise BadArchive(f"the header lacks {', '.join(missing)}; not an engram incremental")
        holder["h"] = h
        run.facts = facts_from_log_header(h)
        n, first, last = h["record_count"], h["from_lsn"], h["to_lsn"]
        if n == 0 or first > last:
            span = f"no records (nothing after LSN {last})"
        elif first == last:
            span = f"LSN {first}, 1 record"
        else:
            span = f"LSN {first}..{last}, {n} records"
        return f"incremental of database {h['database_id']}, {span}"

    run.step(1, "structure", structure)

    def checksums() -> str:
        side = _check_sidecar(run, path)
        h = holder["h"]
        srcs = collect_logs([path], h["database_id"])
        cov = scan_logs(srcs, h["database_id"], h["from_lsn"] - 1)
        if cov.records != h["record_count"] or (cov.records and cov.last_lsn != h["to_lsn"]):
            raise BadArchive(
                f"the header promises {h['record_count']} records up to LSN {h['to_lsn']}, the "
                f"file holds {cov.records} up to {cov.last_lsn}"
            )
        return f"{side}; {cov.records} record CRCs and LSN continuity ok"

    run.step(2, "checksums", checksums)
    if level < 3:
        return
    out = work / "pitr"

    def restore_chain() -> str:
        h = holder["h"]
        # On the incremental's own history's path (its parent there, not another history's
        # backups at the same LSNs), preferring a base from before it, so that its own records
        # are replayed.
        own = header_lineage(h)
        try:
            chosen = choose_path(repo, Target(lsn=h["from_lsn"] - 1), own[-1].id, own)
        except UsageError:
            chosen = choose_path(repo, Target(lsn=h["to_lsn"]), own[-1].id, own)
        base, incs = chosen.base, list(chosen.logs)
        if me not in incs:
            incs.append(me)
        says = f"base {archive_name(base)} + {', '.join(archive_name(p) for p in incs)}"
        res = restore_pitr(
            base,
            incs,
            Target(lsn=h["to_lsn"]),
            out,
            durable=False,
            resources=run.resources,
            lineage=chosen.lineage,
        )
        if res.digest != h["digest"]:
            raise EngramError(
                f"the chain restored to LSN {res.reached_lsn} has a different digest than the "
                "incremental's header"
            )
        return f"restored {says} to LSN {res.reached_lsn}; digest equal to the header's"

    run.step(3, "restore", restore_chain)

    _verify_and_bench(run, out, level, p50_warn_ms, bench_s)


def validate_backup(
    path: Path | Ref,
    level: int = 4,
    p50_warn_ms: float = 10.0,
    bench_s: float = 2.0,
    progress: Callable[[str], None] | None = None,
    record: bool = True,
    workdir: Path | None = None,
    entries: EntryWriter = LOCAL,
    resources: Resources | None = None,
) -> ValidationReport:
    """Validate ``path`` to ``level`` and, with ``record``, keep the verdict in its catalog
    entry (written through ``entries``). CatalogError if the entry cannot be marked "pending"
    before the checks start (nothing is validated then). ``resources``: what the checks may
    use, decided by whoever starts the validation (default: a command at normal priority; the
    caller applies its ``idle`` priority). ``path`` may be a backup in any store: an object
    store's archive is streamed through the restore test, never copied whole to local disk;
    an incremental (the records of a range) is fetched into the work dir."""
    path = local_archive(path)
    if level not in (1, 2, 3, 4):
        raise UsageError("--level must be 1, 2, 3 or 4")
    if isinstance(path, Path) and not path.is_file():
        raise UsageError(f"{path} does not exist or is not a file")
    if isinstance(path, Ref) and not path.store.exists(path.name):
        raise UsageError(f"{path.describe()} does not exist; check the name")
    kind = "full" if compression_for(archive_name(path)) else _kind_of(path)
    report = ValidationReport(_describe(path), kind, level)
    run = _Runner(report, progress, resources or Resources.normal())
    entry = _begin_entry(path, report, level, entries) if record else None
    parent = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
    remove_stale_workdirs(parent)
    work, owner = _workdir(parent)
    try:
        if kind == "full":
            _validate_full(run, path, level, work, p50_warn_ms, bench_s)
        elif isinstance(path, Path):
            _validate_incremental(run, path, level, work, p50_warn_ms, bench_s)
        else:
            with local_logs([path], work / "fetched") as [local]:
                args = (run, local, level, work, p50_warn_ms, bench_s)
                _validate_incremental(*args, me=path, repo=path.store)
    except _Failed:
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
        owner.release()
    if entry is not None:
        _record(path, report, run.facts, entry, entries)
    return report


def remove_stale_workdirs(parent: Path) -> list[Path]:
    """Remove the work dirs in ``parent`` of validations that were killed (their owner's lock
    is gone; a running validation's are never touched), with a warning naming each."""
    removed = remove_stale(parent, lambda n: _WORKDIR.match(n) is not None)
    for p in removed:
        log.warning(f"removed {p}, the work dir of a validation that was killed")
    return removed


def _workdir(parent: Path) -> tuple[Path, Owned]:
    for _ in range(3):
        p = parent / f"{WORKDIR_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
        try:
            return p, create_owned_dir(p)
        except FileNotFoundError:  # a concurrent cleaner took it before it was locked
            continue
    p = parent / f"{WORKDIR_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
    return p, create_owned_dir(p)


@dataclass
class _Entry:
    info: dict[str, Any]
    pending: bool  # "pending" is in the entry on disk: the verdict replaces it
    damaged: str | None = None  # what is wrong with it, when it could not be rebuilt yet


def _verdict(report: ValidationReport, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "ok": report.ok,
        "level": report.level,
        "reason": report.reason,
        "at": ns_to_iso(time.time_ns()),
        "warnings": report.warnings,
    }


def _describe(path: Path | Ref) -> str:
    return path.describe() if isinstance(path, Ref) else str(path)


def _info_name(path: Path | Ref) -> str:
    """The catalog entry's base name, as messages say it."""
    return info_name(archive_name(path))


def _write_failed(e: OSError, path: Path | Ref, what: str, state: str) -> str:
    cause = "disk full" if e.errno == errno.ENOSPC else f"I/O error ({e.strerror or e})"
    return (
        f"{cause} while {what} {_info_name(path)}; {state} — free space (or fix the disk) "
        f"and run `engram validate-backup {_describe(path)}`"
    )


def _begin_entry(
    path: Path | Ref, report: ValidationReport, level: int, entries: EntryWriter
) -> _Entry | None:
    """Check the catalog entry against the file, rebuild it from the file's header if they
    disagree, and mark it "pending". None when the backup has no entry."""
    ip = _info_name(path)
    if isinstance(path, Ref):
        there = path.store.exists(info_name(path.name))
    else:
        there = info_path(path).exists()
    if not there:
        return None
    info = read_info(path)
    try:
        facts = file_facts(path)
    except (OSError, EngramError):
        facts = None  # the structure step reports what is wrong with the file
    problems = ["it is not a JSON object"] if info is None else check_entry(path, info, facts)
    before = "unreadable" if info is None else validation_status(info)
    if problems or info is None:
        if facts is None:
            # Rebuilt later from the manifest, if the checks get that far; never written into.
            return _Entry(info or {}, pending=False, damaged="; ".join(problems))
        report.warnings.append(
            f"the catalog entry {ip} disagreed with the file ({'; '.join(problems)}); "
            "it was rebuilt from the file's header"
        )
        info = rebuilt_entry(path, facts)
    info["validation"] = {"status": PENDING, "level": level, "at": ns_to_iso(time.time_ns())}
    try:
        replace_info(path, info, entries)
    except OSError as e:
        state = (
            f"nothing was validated and the entry is unchanged (validation {before})"
            if not problems
            else "nothing was validated and the damaged entry is unchanged (not trusted)"
        )
        raise CatalogError(
            _write_failed(e, path, "marking validation as pending in", state)
        ) from None
    return _Entry(info, pending=True)


def _record(
    path: Path | Ref,
    report: ValidationReport,
    facts: dict[str, Any] | None,
    entry: _Entry,
    entries: EntryWriter,
) -> None:
    ip = _info_name(path)
    info = entry.info
    if entry.damaged is not None:
        if facts is None:
            report.recorded = False
            report.record_error = (
                f"the catalog entry {ip} is damaged ({entry.damaged}) and the file could "
                "not say what it holds, so the verdict was not recorded; the entry stays "
                "untrusted (never chosen for a restore)"
            )
            return
        report.warnings.append(
            f"the catalog entry {ip} disagreed with the file ({entry.damaged}); it was "
            "rebuilt from the file's manifest"
        )
        info = rebuilt_entry(path, facts)
    info["validation"] = _verdict(report, PASSED if report.ok else FAILED)
    try:
        replace_info(path, info, entries)
    except OSError as e:
        report.recorded = False
        state = (
            'the entry still says validation "pending", so the backup is not chosen for a '
            "restore"
            if entry.pending
            else "the damaged entry is unchanged (not trusted)"
        )
        report.record_error = _write_failed(e, path, "recording the verdict in", state)
        return
    report.recorded = True


def _kind_of(path: Path | Ref) -> str:
    with open(path, "rb") if isinstance(path, Path) else path.store.open(path.name) as f:
        head = f.read(16)
    if head[:8] == fmt.MAGIC:
        return "incremental"
    if head[:4] in (b"\x28\xb5\x2f\xfd",) or head[:2] == b"\x1f\x8b":
        return "full"
    return "incremental"  # the structure step names what is wrong with it
