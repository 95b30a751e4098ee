"""Full backups: one archive of a consistent cut (DESIGN "Backups").

Under the cut, this process gathers a plan (``worker.Plan``: the bytes only the engine's process
can read consistently, the files to stream, the manifest); the archive is then written from the
plan by ``worker.write_plan``, here (priority "normal") or in a low-priority worker process
(priority "low", what the server uses), and published from here either way.

Write order: the archive goes to a hidden temp file beside PATH while it is hashed; it is
fsynced, then the sidecar is written the same way; only then are both renamed into place and the
directory fsynced. On any failure both temp files are removed and nothing appears at PATH or
PATH.sha256; earlier backups in the directory are never touched.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engram import __version__
from engram.backup.archive import FileSink
from engram.backup.catalog import info_path, write_info
from engram.backup.worker import (
    DEFAULT_CPU_SHARE,
    LOW_CHUNK,
    Plan,
    PlanMember,
    Request,
    check_cpu_share,
    run_worker,
    write_plan,
)
from engram.errors import BackupError, UsageError
from engram.format import record as fmt
from engram.format.manifest import MANIFEST_VERSION, compression_for, encode_sidecar
from engram.fsutil import fsync_dir
from engram.graph import Cut, Engine
from engram.model import ns_to_iso

SinkFactory = Callable[[Path], FileSink]


@dataclass
class BackupResult:
    kind: str
    path: str
    sidecar: str
    size: int
    sha256: str
    duration_s: float
    snapshot_lsn: int
    snapshot_time: str
    digest: str
    database_id: str
    from_lsn: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    stall_ms: float = 0.0
    priority: str | None = None  # full backups: "low" (worker process) or "normal"
    cpu_share: float | None = None  # priority "low": the worker's cap, a fraction of one core
    paused_s: float | None = None  # priority "low": time the worker slept to keep to it
    note: str | None = None
    validation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_output(output: Path, kinds: tuple[str, ...]) -> None:
    if output.exists() or output.with_name(output.name + ".sha256").exists():
        raise UsageError(
            f"{output} already exists; choose a new name (backups are never overwritten)"
        )
    if not output.parent.is_dir():
        raise UsageError(f"directory {output.parent} does not exist; create it first")


def temp_paths(output: Path) -> tuple[Path, Path]:
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    return (
        output.with_name(f".{output.name}.tmp-{tag}"),
        output.with_name(f".{output.name}.sha256.tmp-{tag}"),
    )


def publish(tmp: Path, tmp_side: Path, output: Path, sha: str, info: dict[str, Any]) -> Path:
    """Write the sidecar, rename archive and sidecar into place, fsync the directory, then
    write the catalog entry. Any failure or interrupt removes all of them again."""
    side = output.with_name(output.name + ".sha256")
    fd = os.open(tmp_side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, encode_sidecar(sha))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, output)
        os.rename(tmp_side, side)
        fsync_dir(output.parent)
        write_info(output, info)
    except BaseException:
        for p in (output, side, info_path(output)):
            p.unlink(missing_ok=True)
        raise
    return side


@contextmanager
def temp_files(output: Path) -> Iterator[tuple[Path, Path]]:
    """The temp paths of a backup being written: (archive temp, sidecar temp). Whatever fails
    or interrupts inside, both are removed and the error names the cause."""
    tmp, tmp_side = temp_paths(output)
    try:
        yield tmp, tmp_side
    except OSError as e:
        raise BackupError(describe_os_error(e, output)) from None
    except KeyboardInterrupt:
        raise BackupError(f"interrupted; nothing was written at {output}") from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp_side.unlink(missing_ok=True)


@contextmanager
def writing(output: Path, sink_factory: SinkFactory) -> Iterator[tuple[FileSink, Path, Path]]:
    """``temp_files`` with the archive's sink open in this process: (sink, archive temp,
    sidecar temp); the sink is closed before the temp files are removed."""
    with temp_files(output) as (tmp, tmp_side):
        sink = sink_factory(tmp)
        try:
            yield sink, tmp, tmp_side
        finally:
            sink.close()


def describe_os_error(e: OSError, output: Path) -> str:
    if e.errno == errno.ENOSPC:
        return f"disk full while writing {output}; free space and run the backup again"
    return f"I/O error while writing {output} ({e.strerror or e}); check the disk and retry"


def _log_segment_bytes(engine: Engine, cut: Cut) -> bytes | None:
    """The records (W, S] as one segment file whose header carries the digest at W."""
    if cut.snapshot_lsn == cut.warm_lsn:
        return None
    parts = [
        fmt.encode_file_header(
            fmt.KIND_SEGMENT,
            {
                "database_id": cut.database_id,
                "format_version": fmt.FORMAT_VERSION,
                "first_lsn": cut.warm_lsn + 1,
                "created_at_ns": cut.taken_ns,
                "base_digest": cut.warm_digest,
            },
        )
    ]
    for _, _, _, raw in engine.log_range(cut.warm_lsn + 1, cut.snapshot_lsn):
        parts.append(raw)
    return b"".join(parts)


PRIORITIES = ("low", "normal")


def full_backup(
    engine: Engine,
    output: Path,
    progress: Callable[[int, int], None] | None = None,
    sink_factory: SinkFactory = FileSink,
    priority: str = "normal",
    on_worker: Callable[[int], None] | None = None,
    cpu_share: float | None = None,
) -> BackupResult:
    """Take a full backup of ``engine`` to ``output`` (.tar.zst or .tar.gz).

    ``priority="normal"`` writes the archive in this process with zstd on every core (fastest;
    for a data dir nobody writes to). ``"low"`` writes it in a worker process that runs only on
    CPU the engine leaves idle, compressing on one thread and using at most ``cpu_share`` of one
    core (default ``DEFAULT_CPU_SHARE``; slower, what the server uses, so that writers keep their
    latency). The cut is held, and the plan gathered, here either way;
    ``sink_factory`` applies to "normal" only, ``on_worker(pid)`` to "low" only
    (``worker.run_worker``).
    """
    output = Path(output).absolute()
    compression = compression_for(output.name)
    if compression is None:
        raise UsageError(
            f"{output.name}: a full backup must end in .tar.zst (recommended) or .tar.gz"
        )
    if priority not in PRIORITIES:
        raise UsageError(f"backup priority must be low or normal, got {priority!r}")
    if priority == "low" and sink_factory is not FileSink:
        raise ValueError("sink_factory applies to priority='normal' only (in-process writing)")
    if priority == "normal" and cpu_share is not None:
        raise UsageError(
            "a cpu share applies to priority low only (priority normal uses every core)"
        )
    share = DEFAULT_CPU_SHARE if cpu_share is None else check_cpu_share(cpu_share)
    check_output(output, ("full",))
    t0 = time.monotonic()
    cut = engine.cut()
    try:
        with temp_files(output) as (tmp, tmp_side):
            total = cut.db_size + cut.wal_size
            done = [0]

            def tick(n: int) -> None:
                done[0] += n
                if progress:
                    progress(done[0], total)

            plan = _plan(engine, cut, compression, priority)
            if priority == "low":
                req = Request(
                    str(tmp),
                    plan,
                    progress=progress is not None,
                    cpu_share=share,
                    log_dir=str(engine.layout.oplog),
                )
                res = run_worker(req, output, tick, on_worker)
                size, sha, paused = res.size, res.sha256, round(res.paused_s, 3)
                if tmp.stat().st_size != size:
                    raise BackupError(
                        f"the backup worker reported {size} bytes but wrote "
                        f"{tmp.stat().st_size}; nothing was written at {output}"
                    )
            else:
                sink = sink_factory(tmp)
                try:
                    write_plan(plan, sink, tick)
                finally:
                    sink.close()
                size, sha, paused = sink.size, sink.sha.hexdigest(), None
            result = BackupResult(
                kind="full",
                path=str(output),
                sidecar=str(output) + ".sha256",
                size=size,
                sha256=sha,
                duration_s=round(time.monotonic() - t0, 3),
                snapshot_lsn=cut.snapshot_lsn,
                snapshot_time=plan.manifest["snapshot_time"],
                digest=cut.digest,
                database_id=cut.database_id,
                from_lsn=1,
                counts=plan.manifest["counts"],
                stall_ms=round(cut.stall_ns / 1e6, 3),
                priority=priority,
                cpu_share=share if priority == "low" else None,
                paused_s=paused,
            )
            info = result.to_json() | {"snapshot_time_ns": cut.snapshot_ts, "from_time_ns": 0}
            publish(tmp, tmp_side, output, result.sha256, info)
    finally:
        engine.release_cut(cut)
    return result


def _plan(engine: Engine, cut: Cut, compression: str, priority: str) -> Plan:
    """Everything the archive holds, read while the cut pins it (docs/FORMAT.md): the bytes
    that only this process can get right (the WAL prefix, checked against the cut's salts; the
    log records (W, S]; the hot set) and the files to stream, which stay as they are until the
    cut is released (the warm main file up to its size at the cut; immutable cold segments)."""
    members = [
        PlanMember("identity.json", data=engine.layout.identity.read_bytes()),
        PlanMember("warm/engram.db", path=str(engine.layout.warm_db), size=cut.db_size),
    ]
    wal_data = _read_wal(engine.layout.warm_db.with_name("engram.db-wal"), cut.wal_size)
    # A WAL restarted since the cut means every frame was in the main file already.
    with_wal = bool(wal_data) and engine.wal_still_valid(cut)
    if with_wal:
        members.append(PlanMember("warm/engram.db-wal", data=wal_data))
    seg = _log_segment_bytes(engine, cut)
    if seg is not None:
        members.append(PlanMember(f"oplog/{fmt.segment_name(cut.warm_lsn + 1)}", data=seg))
    members.append(PlanMember("fast/hot.json", data=json.dumps({"ids": cut.hot_ids}).encode()))
    cold = sorted(p for p in engine.layout.cold.glob("*.seg") if p.is_file())
    for p in cold:
        members.append(PlanMember(f"cold/{p.name}", path=str(p), size=p.stat().st_size))
    manifest: dict[str, Any] = {
        "format_version": MANIFEST_VERSION,
        "kind": "full",
        "database_id": cut.database_id,
        "engram_version": __version__,
        "created_at": ns_to_iso(time.time_ns()),
        "snapshot_lsn": cut.snapshot_lsn,
        "snapshot_time": ns_to_iso(cut.snapshot_ts) if cut.snapshot_ts else "",
        "snapshot_time_ns": cut.snapshot_ts,
        "warm_lsn": cut.warm_lsn,
        "warm_digest": cut.warm_digest,
        "digest": cut.digest,
        "counts": {"memories": cut.memories, "edges": cut.edges},
        "tiers": {
            "fast": {"hot_ids": len(cut.hot_ids), "file": "fast/hot.json"},
            "warm": {"file": "warm/engram.db", "wal": with_wal, "applied_lsn": cut.warm_lsn},
            "log": {"from_lsn": cut.warm_lsn + 1, "to_lsn": cut.snapshot_lsn},
            "cold": {"segments": [p.name for p in cold]},
        },
    }
    if priority == "low":  # one core, and a small footprint in the shared cache
        return Plan(compression, members, manifest, threads=1, chunk=LOW_CHUNK)
    return Plan(compression, members, manifest)


def _read_wal(wal: Path, size: int) -> bytes:
    if size <= 0:
        return b""
    with open(wal, "rb") as f:
        data = f.read(size)
    if len(data) != size:
        raise BackupError(f"{wal} shrank while it was being archived; run the backup again")
    return data
