"""Low-priority full backups (``priority="low"``): the archive is written by a worker process
(``python -m engram.backup.worker``) from a plan the engine's process gathered under the cut.

The archive it writes holds the same members with the same bytes as the in-process path and
restores to the same state. A worker that is SIGKILLed, hits an I/O error or finds a file
shorter than planned, or a Ctrl-C in the parent, fails the backup with the cause in one line,
leaves nothing at PATH, PATH.sha256 or PATH.info.json and no temp file, never touches earlier
backups, and releases the cut. No timing is asserted anywhere.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import resource
import signal
import tarfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from engram.backup.full import describe_os_error, full_backup
from engram.backup.restore import restore
from engram.backup.validate import validate_backup
from engram.backup.worker import (
    DEFAULT_CPU_SHARE,
    LogActivity,
    Pacer,
    Plan,
    PlanMember,
    Request,
    _error_from,
    _error_of,
    check_cpu_share,
    run_worker,
)
from engram.errors import BackupError, BadArchive, UsageError
from engram.graph import Engine, EngineConfig

# A plan's manifest as a cut makes it: every field the archive header carries.
MANIFEST = {
    "kind": "full",
    "database_id": "00000000-0000-4000-8000-000000000000",
    "snapshot_lsn": 0,
    "snapshot_time": "",
    "snapshot_time_ns": 0,
    "warm_lsn": 0,
    "digest": "0" * 64,
    "counts": {"memories": 0, "edges": 0},
}


def _fill(e: Engine, rnd: random.Random, n: int, size: int, prefix: str = "m") -> None:
    for i in range(n):
        e.apply([{"op": "create_memory", "id": f"{prefix}{i}", "content": rnd.randbytes(size).hex(),
                  "metadata": {"i": i}}])


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine whose cut has all the parts: a warm file, a WAL with frames the main file
    lacks, log records past the warm tier's LSN (W < S), edges, a deletion."""
    e = Engine.open(tmp_path / "data", EngineConfig(checkpoint_interval=3600))
    try:
        rnd = random.Random(7)
        _fill(e, rnd, 40, 1500)
        e.apply([{"op": "create_edge", "src": "m0", "dst": f"m{i}"} for i in range(1, 8)])
        e.checkpoint()
        e.apply([{"op": "update_memory", "id": "m1", "content": "changed after the checkpoint"}])
        e.apply([{"op": "delete_memory", "id": "m2"}])
        e.apply([{"op": "activate", "id": "m3"}])
        yield e
    finally:
        e.close()


def _members(archive: Path) -> dict[str, bytes]:
    """The archive's members and their bytes, less what differs from one cut to the next: the
    manifest's creation time, the log segment's ``created_at_ns`` (the cut's time; its header
    CRC and the manifest's hash of it follow)."""
    raw = archive.read_bytes()
    if archive.name.endswith(".zst"):
        tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    else:
        tar = zlib.decompress(raw, 31)
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t.getmembers():
            assert m.isreg() and m.mode == 0o600 and m.uname == "engram"
            f = t.extractfile(m)
            assert f is not None
            data = f.read()
            if m.name == "manifest.json":
                j = json.loads(data)
                j.pop("created_at")
                for name, f in j["files"].items():
                    if name.startswith("oplog/"):
                        f.pop("sha256")
                data = json.dumps(j, sort_keys=True).encode()
            elif m.name.startswith("oplog/"):
                hlen = int.from_bytes(data[12:16], "little")
                header = json.loads(data[16 : 16 + hlen])
                assert header.pop("created_at_ns") > 0
                data = json.dumps(header).encode() + data[16 + hlen + 4 :]
            out[m.name] = data
    return out


# -- the same archive, the same state --------------------------------------------------------------


@pytest.mark.parametrize("ext", [".tar.zst", ".tar.gz"])
def test_low_priority_archive_equals_the_in_process_one(
    engine: Engine, tmp_path: Path, ext: str
) -> None:
    bk = tmp_path / "bk"
    bk.mkdir()
    ticks: list[tuple[int, int]] = []
    # A cut held across both keeps the warm files as they are (the last cut released lets
    # SQLite copy the WAL into the main file), so that the two archives can be compared.
    hold = engine.cut()
    try:
        low = full_backup(engine, bk / f"low{ext}", priority="low",
                          progress=lambda d, t: ticks.append((d, t)))
        normal = full_backup(engine, bk / f"normal{ext}")
    finally:
        engine.release_cut(hold)
    assert (low.priority, normal.priority) == ("low", "normal")
    assert ticks and ticks[-1][0] >= ticks[-1][1] > 0  # the worker's progress came through
    assert (low.snapshot_lsn, low.digest) == (normal.snapshot_lsn, normal.digest)
    for r in (low, normal):
        p = Path(r.path)
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        assert Path(r.sidecar).read_text() == f"{sha}  {p.name}\n"  # sha256sum's format
        assert r.size == p.stat().st_size
        info = json.loads(p.with_name(p.name + ".info.json").read_text())
        assert info["priority"] == r.priority and info["sha256"] == r.sha256
    a, b = _members(Path(low.path)), _members(Path(normal.path))
    assert list(a) == list(b)  # same members, same order
    assert a == b  # same bytes (the manifest but for created_at)
    assert "warm/engram.db-wal" in a and any(n.startswith("oplog/") for n in a)
    # Both restore to the same state, and the low one validates.
    got_low = restore(Path(low.path), tmp_path / "r-low")
    got_normal = restore(Path(normal.path), tmp_path / "r-normal")
    assert (got_low.snapshot_lsn, got_low.digest) == (got_normal.snapshot_lsn, got_normal.digest)
    assert (got_low.snapshot_lsn, got_low.digest) == (engine.last_lsn, engine.digest.hex)
    states = []
    for d in (tmp_path / "r-low", tmp_path / "r-normal"):
        with Engine.open(d, EngineConfig(checkpoint_interval=3600), create=False) as e:
            states.append(([m for m in e.iter_memories()], [x.key() for x in e.iter_edges()]))
    assert states[0] == states[1]
    v = validate_backup(Path(low.path), level=3, record=False)
    assert v.ok, v.verdict
    assert engine.cuts.held == 0


def test_priority_is_checked(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="low or normal"):
        full_backup(engine, tmp_path / "x.tar.zst", priority="fast")
    assert not (tmp_path / "x.tar.zst").exists()


# -- the worker fails ----------------------------------------------------------------------------


@pytest.fixture
def big(tmp_path: Path) -> Iterator[tuple[Engine, Path, dict[str, str]]]:
    """An engine with ~24 MB of incompressible warm tier, and a backup dir holding an earlier
    good backup: (engine, backup dir, name -> sha256 of every file there)."""
    e = Engine.open(tmp_path / "data", EngineConfig(checkpoint_interval=3600))
    try:
        rnd = random.Random(11)
        _fill(e, rnd, 24, 500_000, prefix="big")
        e.checkpoint()
        bk = tmp_path / "bk"
        bk.mkdir()
        full_backup(e, bk / "good.tar.zst", priority="low")
        yield e, bk, {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bk.iterdir()}
    finally:
        e.close()


def _check_nothing_left(e: Engine, bk: Path, before: dict[str, str], err: BackupError,
                        out: Path) -> None:
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bk.iterdir()} == before
    assert str(out) in err.message and "\n" not in err.message
    assert e.cuts.held == 0, "the failed backup did not release its cut"
    before_lsn = e.last_lsn
    assert e.apply([{"op": "activate", "id": "big0"}]).lsn == before_lsn + 1


def test_worker_killed_mid_backup(big: tuple[Engine, Path, dict[str, str]]) -> None:
    e, bk, before = big
    out = bk / "new.tar.zst"
    pids: list[int] = []
    seen: dict[str, Any] = {}

    def kill_midway(done: int, total: int) -> None:
        if "killed" in seen:
            return
        pid = pids[0]
        seen["temp"] = [n for n in os.listdir(bk) if n.startswith(".new.tar.zst.tmp-")]
        seen["idle"] = (
            os.sched_getscheduler(pid) == os.SCHED_IDLE
            or os.getpriority(os.PRIO_PROCESS, pid) == 19
        )
        # The parent's session: a session of its own would be an autogroup of its own, whose
        # fair share SCHED_IDLE cannot lower.
        seen["session"] = os.getsid(pid) == os.getsid(0) and os.getpgid(pid) == pid
        seen["killed"] = (done, total)
        os.kill(pid, signal.SIGKILL)

    with pytest.raises(BackupError) as ei:
        full_backup(e, out, progress=kill_midway, priority="low", on_worker=pids.append)
    done, total = seen["killed"]
    assert done < total, "the worker was killed after it had written everything"
    assert seen["temp"], "the worker had not started writing its temp file"
    assert seen["idle"], "the worker was not running at idle priority"
    assert seen["session"], "the worker must be in its own process group, in our session"
    assert "killed by SIGKILL" in ei.value.message and f"pid {pids[0]}" in ei.value.message
    _check_nothing_left(e, bk, before, ei.value, out)
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(pids[0], 0)
    # A later backup to the same path works, and restores.
    res = full_backup(e, out, priority="low")
    r = restore(out, bk.parent / "restored")
    assert (r.snapshot_lsn, r.digest) == (res.snapshot_lsn, res.digest) == (e.last_lsn,
                                                                           e.digest.hex)


def test_ctrl_c_while_the_worker_writes(big: tuple[Engine, Path, dict[str, str]]) -> None:
    e, bk, before = big
    out = bk / "new.tar.zst"
    pids: list[int] = []

    def ctrl_c(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(BackupError) as ei:
        full_backup(e, out, progress=ctrl_c, priority="low", on_worker=pids.append)
    assert ei.value.message == f"interrupted; nothing was written at {out}"
    _check_nothing_left(e, bk, before, ei.value, out)
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pids[0], 0)


def test_worker_io_error_names_its_cause(big: tuple[Engine, Path, dict[str, str]]) -> None:
    """A real write error in the worker: its file size limit (RLIMIT_FSIZE) is 1 MB, so a write
    past it fails with EFBIG; the parent reports it as it reports its own I/O errors."""
    e, bk, before = big
    out = bk / "new.tar.zst"

    def limit(pid: int) -> None:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    with pytest.raises(BackupError) as ei:
        full_backup(e, out, priority="low", on_worker=limit)
    assert ei.value.message == describe_os_error(OSError(errno.EFBIG, os.strerror(errno.EFBIG)),
                                                 out)
    assert os.strerror(errno.EFBIG) in ei.value.message
    _check_nothing_left(e, bk, before, ei.value, out)


def test_worker_reports_a_file_that_shrank_and_a_missing_file(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    manifest = dict(MANIFEST)
    out = tmp_path / "out.tar.zst"
    shrank = Plan("zstd", [PlanMember("warm/engram.db", path=str(src), size=200_000)], manifest, 1)
    missing = Plan("gzip", [PlanMember("cold/x.seg", path=str(tmp_path / "gone"), size=1)],
                   manifest)
    fd = os.open(tmp_path / ".out.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(BadArchive) as ei:
            run_worker(Request(shrank), out, fd=fd)
        assert ei.value.message == f"{src} shrank while it was being archived"
        with pytest.raises(FileNotFoundError) as oe:
            run_worker(Request(missing), out, fd=fd)
        assert oe.value.errno == errno.ENOENT
    finally:
        os.close(fd)
    # The worker never creates, names or removes a file: the parent's temp file stays its own.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp", "src.bin"]


def test_worker_relays_through_a_pipe_into_a_sink(tmp_path: Path) -> None:
    """A sink that is not a file (the server's backup stream) gets the archive through a pipe:
    the same bytes the worker hashed; a sink that fails stops the worker."""
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    plan = Plan("zstd", [PlanMember("warm/engram.db", path=str(src), size=3 << 20)],
                dict(MANIFEST), 1, chunk=64 << 10)

    class Memory:
        def __init__(self, fail_after: int | None = None) -> None:
            self.buf = bytearray()
            self.sha = hashlib.sha256()
            self.size = 0
            self.fail_after = fail_after

        def write(self, data: bytes | memoryview) -> int:
            if self.fail_after is not None and self.size >= self.fail_after:
                raise OSError(errno.EPIPE, "the client went away")
            self.buf += data
            self.sha.update(data)
            self.size += len(data)
            return len(data)

        def flush(self) -> None: ...

        def sync_close(self) -> None: ...

        def close(self) -> None: ...

    sink = Memory()
    done = run_worker(Request(plan), None, relay=sink)
    assert (done.size, done.sha256) == (sink.size, sink.sha.hexdigest())
    with tarfile.open(fileobj=io.BytesIO(
            zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bytes(sink.buf))).read())) as t:
        f = t.extractfile("warm/engram.db")
        assert f is not None and f.read() == src.read_bytes()
    pids: list[int] = []
    with pytest.raises(OSError) as ei:
        run_worker(Request(plan), None, on_start=pids.append, relay=Memory(fail_after=1))
    assert ei.value.errno == errno.EPIPE
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pids[0], 0)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(BackupError, match="cancelled"):
        run_worker(Request(plan), None, relay=Memory(), cancel=cancel)


@pytest.mark.parametrize(
    ("exc", "expect"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "disk full while writing"),
        (OSError(errno.EIO, os.strerror(errno.EIO)), "I/O error while writing"),
    ],
)
def test_worker_errors_keep_their_errno(exc: OSError, expect: str, tmp_path: Path) -> None:
    """What the worker sends for an OSError comes back as one with the same errno, so the
    parent's message is the one an in-process backup gives."""
    out = tmp_path / "b.tar.zst"
    back = _error_from(json.loads(json.dumps(_error_of(exc))), "the worker", out)
    assert isinstance(back, OSError) and back.errno == exc.errno
    assert describe_os_error(back, out).startswith(expect)
    other = _error_from(json.loads(json.dumps(_error_of(MemoryError("boom\nmore")))), "w", out)
    assert isinstance(other, BackupError) and "\n" not in other.message
    assert "MemoryError: boom more" in other.message and str(out) in other.message


# -- the cpu share: pausing while the engine writes ------------------------------------------


class _Clocks:
    """A CPU clock and a wall clock the test moves by hand; sleeping moves the wall clock (by
    ``over`` more than asked, like a real sleep that overruns)."""

    def __init__(self, over: float = 0.0) -> None:
        self.cpu_t, self.wall_t, self.over = 0.0, 0.0, over
        self.sleeps: list[float] = []

    def cpu(self) -> float:
        return self.cpu_t

    def wall(self) -> float:
        return self.wall_t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.wall_t += s + self.over


def _pacer(c: _Clocks, share: float, busy: Any = None) -> Pacer:
    return Pacer(share, busy, cpu=c.cpu, wall=c.wall, sleep=c.sleep, min_sleep=0.002)


def test_pacer_keeps_to_its_share() -> None:
    c = _Clocks()
    pace = _pacer(c, 0.25)
    for _ in range(5000):  # slices of 0.2 ms of CPU, each owing 0.6 ms of sleep
        c.cpu_t += 0.0002
        c.wall_t += 0.0002
        pace()
    # 1 s of CPU owes 3 s of sleep at a quarter of a core, slept in pauses of >= 2 ms (every
    # fourth slice), not after every slice.
    assert sum(c.sleeps) == pytest.approx(3.0, rel=1e-6)
    assert min(c.sleeps) >= 0.002 and len(c.sleeps) == 1250
    assert c.cpu_t / c.wall_t == pytest.approx(0.25, rel=0.01)
    assert pace.slept == pytest.approx(3.0, rel=1e-6)


def test_pacer_credits_a_sleep_that_overruns() -> None:
    c = _Clocks(over=0.001)
    pace = _pacer(c, 0.5)
    for _ in range(100):
        c.cpu_t += 0.004
        c.wall_t += 0.004
        pace()
    # Each pause is asked for what is owed less what the last one overran.
    assert c.sleeps[0] == pytest.approx(0.004)
    assert all(s == pytest.approx(0.003) for s in c.sleeps[1:])
    assert pace.slept == pytest.approx(0.4, rel=0.01)


def test_pacer_is_free_while_the_engine_is_idle_and_with_share_one() -> None:
    c = _Clocks()
    busy = [False]
    pace = _pacer(c, 0.1, lambda: busy[0])
    for i in range(300):
        busy[0] = 100 <= i < 200  # only the middle third is while the engine writes
        c.cpu_t += 0.001
        c.wall_t += 0.001
        pace()
    # Only the 100 busy slices owe sleep (9x their CPU), none of the idle ones.
    assert sum(c.sleeps) == pytest.approx(0.9, rel=1e-6)
    c2 = _Clocks()
    uncapped = _pacer(c2, 1.0, lambda: True)
    for _ in range(100):
        c2.cpu_t += 0.001
        uncapped()
    assert c2.sleeps == []


@pytest.mark.parametrize("bad", [0, 0.01, -1, 1.5, float("nan"), float("inf"), "half", None])
def test_cpu_share_is_checked(bad: Any, engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cpu share must be a number from 0.05 to 1"):
        check_cpu_share(bad)
    if bad is not None:
        with pytest.raises(UsageError, match="cpu share"):
            full_backup(engine, tmp_path / "x.tar.zst", priority="low", cpu_share=bad)
    with pytest.raises(UsageError, match="applies to priority low only"):
        full_backup(engine, tmp_path / "x.tar.zst", priority="normal", cpu_share=0.5)
    assert list(tmp_path.glob("x.tar.zst*")) == []
    assert engine.cuts.held == 0
    assert check_cpu_share(0.05) == 0.05 and check_cpu_share(1) == 1.0


def test_log_activity_sees_appends_and_new_segments(tmp_path: Path) -> None:
    log = tmp_path / "oplog"
    log.mkdir()
    seg = log / f"{1:016x}.log"
    seg.write_bytes(b"x" * 100)
    t = [0.0]
    act = LogActivity(log, wall=lambda: t[0], every=0.005, hold=0.25)
    t[0] = 0.01
    assert not act()  # nothing appended since it started
    with seg.open("ab") as f:
        f.write(b"y")
    assert not act()  # looked less than `every` ago: not looked again
    t[0] = 0.02
    assert act()  # the segment grew
    t[0] = 0.2
    assert act()  # still within `hold` of the growth
    t[0] = 0.3
    assert not act()  # quiet for longer than `hold`
    (log / f"{200:016x}.log").write_bytes(b"")  # the log rotated: a new, empty segment
    t[0] = 0.31
    assert act()
    t[0] = 0.6
    assert not act()
    with (log / f"{200:016x}.log").open("ab") as f:  # it watches the new segment now
        f.write(b"z")
    t[0] = 0.61
    assert act()
    gone = LogActivity(tmp_path / "missing", wall=lambda: t[0])
    assert not gone()  # a log it cannot see never counts as busy


def _pacing_run(tmp_path: Path, share: float, grow: bool) -> float:
    """A real worker archiving 32 MB while (if ``grow``) a thread appends to a log segment
    every millisecond: the seconds it paused."""
    src = tmp_path / "src.bin"
    if not src.exists():
        src.write_bytes(os.urandom(32 << 20))
    log = tmp_path / "oplog"
    log.mkdir(exist_ok=True)
    seg = log / f"{1:016x}.log"
    seg.touch()
    out = tmp_path / f"out-{share}-{grow}.tar.zst"
    tmp = tmp_path / f".{out.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    plan = Plan("zstd", [PlanMember("warm/engram.db", path=str(src), size=32 << 20)],
                dict(MANIFEST), 1)
    stop = threading.Event()

    def appender() -> None:
        with seg.open("ab") as f:
            while not stop.wait(0.001):
                f.write(b"r")
                f.flush()

    th = threading.Thread(target=appender)
    if grow:
        th.start()
    try:
        done = run_worker(Request(plan, cpu_share=share, log_dir=str(log)), out, fd=fd)
    finally:
        os.close(fd)
        stop.set()
        if grow:
            th.join()
    assert done.size == tmp.stat().st_size
    tmp.unlink()
    return done.paused_s


def test_worker_pauses_only_while_the_log_grows(tmp_path: Path) -> None:
    assert _pacing_run(tmp_path, 0.1, grow=True) > 0
    assert _pacing_run(tmp_path, 0.1, grow=False) == 0
    assert _pacing_run(tmp_path, 1.0, grow=True) == 0


def test_low_priority_backup_reports_its_share(engine: Engine, tmp_path: Path) -> None:
    r = full_backup(engine, tmp_path / "d.tar.zst", priority="low")
    assert (r.priority, r.cpu_share) == ("low", DEFAULT_CPU_SHARE)
    assert r.paused_s is not None and r.paused_s >= 0
    r2 = full_backup(engine, tmp_path / "s.tar.zst", priority="low", cpu_share=0.6)
    assert r2.cpu_share == 0.6
    n = full_backup(engine, tmp_path / "n.tar.zst")
    assert (n.priority, n.cpu_share, n.paused_s) == ("normal", None, None)
    info = json.loads((tmp_path / "s.tar.zst.info.json").read_text())
    assert info["cpu_share"] == 0.6


def test_backup_pauses_while_the_engine_writes_and_restores_to_its_cut(
    big: tuple[Engine, Path, dict[str, str]], tmp_path: Path
) -> None:
    """full_backup hands the worker the engine's log to watch: writes during the backup make it
    pause, and the archive is still exactly the cut."""
    e, bk, _ = big
    stop = threading.Event()
    wrote = [0]

    def writer() -> None:
        while not stop.is_set():
            e.apply([{"op": "create_memory", "id": f"w{wrote[0]}", "content": "during"}])
            wrote[0] += 1

    th = threading.Thread(target=writer)
    th.start()
    try:
        r = full_backup(e, bk / "paced.tar.zst", priority="low", cpu_share=0.1)
    finally:
        stop.set()
        th.join()
    assert wrote[0] > 0 and r.paused_s is not None and r.paused_s > 0
    got = restore(Path(r.path), tmp_path / "restored")
    assert (got.snapshot_lsn, got.digest) == (r.snapshot_lsn, r.digest)
