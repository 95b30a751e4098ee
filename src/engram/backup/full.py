"""Full backups: one archive of a consistent cut (docs/DESIGN.md "The backup cut").

Under the cut, this process gathers a plan (``worker.Plan``: the bytes only the engine's process
can read consistently, the files to stream, the manifest); the archive is then written from the
plan by ``worker.write_plan`` into a sink (``archive.Sink``), here (priority "normal") or in a
low-priority worker process (priority "low", what the server uses).

``take_full`` writes the archive into any sink: a store's temp object (``full_backup``, which
publishes it through ``output.BackupOutput``: never replacing, nothing left on failure) or the
server's backup stream to the client that writes the file (``engram backup`` through a server).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engram import __version__
from engram.backup.archive import FileSink, Sink
from engram.backup.output import BackupOutput, describe_os_error
from engram.backup.request import PRIORITIES, BackupRequest, output_compression
from engram.backup.worker import (
    DEFAULT_CPU_SHARE,
    LOW_CHUNK,
    Plan,
    PlanMember,
    Request,
    run_worker,
    write_plan,
)
from engram.errors import BackupError
from engram.format import history as hist
from engram.format import record as fmt
from engram.format.manifest import MANIFEST_VERSION
from engram.graph import Cut, Engine
from engram.model import ns_to_iso
from engram.storage import Ref, as_ref

__all__ = [
    "PRIORITIES",
    "BackupResult",
    "check_full_request",
    "describe_os_error",
    "full_backup",
    "full_compression",
    "take_full",
]


@dataclass
class BackupResult:
    kind: str
    path: str  # "" for a backup streamed to a client (the client knows where it wrote it)
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
    # What only the catalog entry records (times in ns, restore points, parent).
    catalog: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["catalog"]
        return out

    def info(self) -> dict[str, Any]:
        """The catalog entry (``NAME.info.json``) of this backup."""
        return self.to_json() | self.catalog

    def stream_result(self) -> dict[str, Any]:
        """The RESULT of a streamed backup: this without local paths, with the catalog fields."""
        out = self.to_json() | {"catalog": self.catalog}
        del out["path"], out["sidecar"]
        return out


def full_compression(name: str) -> str:
    """The compression a full backup named ``name`` gets (the request's rule for its output
    name), or a ValidationError."""
    compression = output_compression("full", name)
    assert compression is not None
    return compression


def check_full_request(priority: str, cpu_share: float | None) -> float:
    """The share of one core the worker of a full backup at ``priority`` gets (``cpu_share``,
    else ``DEFAULT_CPU_SHARE``), after the request's rules (``request.BackupRequest``)."""
    req = BackupRequest("full", priority=priority, cpu_share=cpu_share).validate()
    return DEFAULT_CPU_SHARE if req.cpu_share is None else req.cpu_share


def full_backup(
    engine: Engine,
    output: Path | Ref,
    progress: Callable[[int, int], None] | None = None,
    priority: str = "normal",
    on_worker: Callable[[int], None] | None = None,
    cpu_share: float | None = None,
) -> BackupResult:
    """Take a full backup of ``engine`` to the new object ``output`` (.tar.zst or .tar.gz): a
    path (a file in its directory) or an object of any ``storage.BackupStore``.

    ``priority="normal"`` writes the archive in this process with zstd on every core (fastest;
    for a data dir nobody writes to). ``"low"`` writes it in a worker process that runs only on
    CPU the engine leaves idle, compressing on one thread and using at most ``cpu_share`` of one
    core (default ``DEFAULT_CPU_SHARE``; slower, what the server uses, so that writers keep their
    latency). ``on_worker(pid)`` applies to "low" only (``worker.run_worker``). Published
    without replacing anything: an existing name is a UsageError ("already exists"), at the
    start or when another backup took the name meanwhile.
    """
    ref = as_ref(output)
    compression = full_compression(ref.name)
    share = check_full_request(priority, cpu_share)
    with BackupOutput(ref) as out:
        sink = out.open()
        where = Path(out.path)
        result = take_full(
            engine, compression, sink, progress, priority, share, on_worker, output=where
        )
        result.path, result.sidecar = out.path, out.sidecar
        out.publish(result.sha256, result.info())
    return result


def take_full(
    engine: Engine,
    compression: str,
    sink: Sink,
    progress: Callable[[int, int], None] | None = None,
    priority: str = "normal",
    cpu_share: float = DEFAULT_CPU_SHARE,
    on_worker: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    output: Path | None = None,
) -> BackupResult:
    """Cut, write the archive into ``sink`` and sync_close it; the result has no path.

    At priority "low" the worker writes a ``FileSink``'s descriptor itself (and fsyncs it);
    any other sink is fed through a pipe and a relay thread, and must receive exactly the bytes
    the worker hashed. ``cancel`` (set by a stream whose client went away) stops the worker;
    an in-process write learns it from its sink. ``output`` names the file in error messages.
    The cut is released on every path out.
    """
    t0 = time.monotonic()
    cut = engine.cut()
    try:
        plan = _plan(engine, cut, compression, priority)
        # What progress counts: the bytes of every member (the manifest, last, comes on top).
        total = sum(len(m.data or b"") if m.path is None else m.size for m in plan.members)
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], total)

        paused: float | None = None
        if priority == "low":
            req = Request(
                plan,
                progress=progress is not None,
                cpu_share=cpu_share,
                log_dir=str(engine.layout.oplog),
            )
            if isinstance(sink, FileSink) and sink.fd >= 0:
                res = run_worker(req, output, tick, on_worker, fd=sink.fd, cancel=cancel)
                wrote = os.fstat(sink.fd).st_size
                sink.close()  # the worker fsynced it
            else:
                res = run_worker(req, output, tick, on_worker, relay=sink, cancel=cancel)
                wrote = sink.size
                if sink.sha.hexdigest() != res.sha256:
                    wrote = -1
                sink.sync_close()
            if wrote != res.size:
                where = f"; nothing was written at {output}" if output else ""
                raise BackupError(
                    f"the backup worker reported {res.size} bytes but {wrote} arrived{where}"
                )
            size, sha, paused = res.size, res.sha256, round(res.paused_s, 3)
        else:
            write_plan(plan, sink, tick)
            size, sha = sink.size, sink.sha.hexdigest()
        return BackupResult(
            kind="full",
            path="",
            sidecar="",
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
            cpu_share=cpu_share if priority == "low" else None,
            paused_s=paused,
            catalog={
                "snapshot_time_ns": cut.snapshot_ts,
                "from_time_ns": 0,
                "marks": engine.marks(cut.snapshot_lsn),  # restore points up to the snapshot
                "history": plan.manifest["history"],
                "lineage": plan.manifest["lineage"],
            },
        )
    finally:
        engine.release_cut(cut)


def _log_segment_bytes(engine: Engine, cut: Cut) -> bytes | None:
    """The records (W, S] as one segment file whose header carries the digest at W."""
    if cut.snapshot_lsn == cut.warm_lsn:
        return None
    lineage = hist.upto(engine.lineage, cut.snapshot_lsn)
    parts = [
        fmt.encode_file_header(
            fmt.KIND_SEGMENT,
            {
                "database_id": cut.database_id,
                "format_version": fmt.FORMAT_VERSION,
                "first_lsn": cut.warm_lsn + 1,
                "created_at_ns": cut.taken_ns,
                "base_digest": cut.warm_digest,
                "history": lineage[-1].id,
                "lineage": hist.lineage_to_json(lineage),
            },
        )
    ]
    for _, _, _, raw in engine.log_range(cut.warm_lsn + 1, cut.snapshot_lsn):
        parts.append(raw)
    return b"".join(parts)


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
    # The history that owns the snapshot's last record, and its ancestors.
    lineage = hist.upto(engine.lineage, cut.snapshot_lsn)
    manifest: dict[str, Any] = {
        "format_version": MANIFEST_VERSION,
        "kind": "full",
        "database_id": cut.database_id,
        "history": lineage[-1].id,
        "lineage": hist.lineage_to_json(lineage),
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
