"""Writing a full backup's archive from a plan: in the engine's process, or in a worker process
that only uses CPU the database leaves idle.

A ``Plan`` is everything the archive holds, gathered by the process that owns the engine while
it holds the cut: bytes (identity, the WAL prefix, the log records (W, S], the hot set) and files
to stream (the warm SQLite main file up to its size at the cut, cold segments), plus the manifest
without its "files". ``write_plan`` turns a plan into the archive — members in plan order, the
manifest with every member's size and sha256 last, then fsync — and is the one writing code
whichever process runs it:

- ``priority="normal"``: the engine's process calls it, zstd on every core (fastest; what a
  backup of a stopped data dir uses).
- ``priority="low"``: ``run_worker`` starts ``python -m engram.backup.worker``, which lowers
  itself to SCHED_IDLE (nice 19 where that is refused; Linux also puts a SCHED_IDLE process in
  the idle I/O class, which the BFQ I/O scheduler honours), compresses on one thread and reads in
  small chunks, so the engine's writers and their group-commit flusher keep the CPU, the GIL and
  most of the cache; and while the engine's op log grows it uses at most ``cpu_share`` of one
  core (``Pacer``, ``LogActivity``), pausing between chunks. Slower, but writes barely notice it.

The worker protocol: the request (``Request``: the descriptor to write the archive to, the
plan, the cpu share and the log to watch), msgpack on stdin; JSON lines on stdout:
``{"progress": n}`` (bytes since the last line, every 4 MiB, when asked for), then one of
``{"done": {"size", "sha256", "paused_s"}}`` or ``{"error": {...}}``. Exit code 0 = done, 3 =
failed (the error line says why: an OSError keeps its errno, an engram error its class and
message), 4 = its parent went away. Anything else — a signal, a crash — is the worker dying, and
``run_worker`` says so. The worker runs in a process group of its own (in the parent's session),
so a Ctrl-C at a terminal reaches only the parent, which kills and reaps it.

The descriptor is inherited (``pass_fds``): the temp file the parent created (the worker writes
and fsyncs it; the parent owns the file, publishes or removes it), or the write end of a pipe
whose bytes a thread of the parent relays into a sink (the server's backup stream): a sink that
does not keep up stops the relay, the pipe fills and the worker waits — backpressure all the way.
The worker never creates, names or removes a file.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from engram.backup.archive import CHUNK, ArchiveWriter, FileSink, Member, Progress, Sink
from engram.backup.pipeline import PipelinedArchiveWriter, ThreadedSink
from engram.backup.request import check_cpu_share
from engram.errors import BackupError, BadArchive, EngramError
from engram.format.manifest import MANIFEST_NAME, encode_manifest
from engram.oplog.reader import list_segments
from engram.procs import lower_priority, module_argv, module_env

EXIT_FAILED = 3
EXIT_ORPHANED = 4
MODULE = "engram.backup.worker"
# A low-priority backup reads in small chunks: with its buffer and the compressor's state in the
# core's own cache it evicts less of the engine's working set from the cache the cores share.
LOW_CHUNK = 256 << 10
REPORT_EVERY = 4 << 20  # bytes between progress lines (each one wakes the parent)
# The share of one core a low-priority worker may use, by default, while the engine writes.
# SCHED_IDLE keeps it off a core a writer wants, but not out of the cache, the memory bus and
# the disk the writers share; the cap bounds what it takes of those while anyone writes.
# While the log does not grow the worker runs uncapped (LogActivity); ``cpu_share=1`` lifts
# the cap altogether. What the default costs writers and the backup: bench/README.md.
DEFAULT_CPU_SHARE = 0.25


class PlanMember(msgspec.Struct, frozen=True):
    """One archive member: its bytes, or the first ``size`` bytes of the file at ``path``."""

    name: str
    data: bytes | None = None
    path: str | None = None
    size: int = 0


class Plan(msgspec.Struct):
    compression: str  # "zstd" or "gzip"
    members: list[PlanMember]
    manifest: dict[str, Any]  # without "files", which write_plan fills in
    threads: int | None = None  # zstd threads: None = one per core, 1 = the calling thread
    chunk: int = CHUNK  # bytes per read of a file member


class Request(msgspec.Struct):
    plan: Plan
    fd: int = -1  # the inherited descriptor to write to (run_worker sets it)
    progress: bool = True  # send progress lines (each one wakes the parent)
    cpu_share: float = 1.0  # of one core, at most, while the engine writes (Pacer); 1 = no cap
    log_dir: str | None = None  # the op log whose growth means the engine is writing


class LogActivity:
    """Whether the engine is writing: its op log grew, or got a new segment, within the last
    ``hold`` seconds. Looks (a stat or two) at most every ``every`` seconds. Every write is
    appended to the log before it is applied (docs/DESIGN.md O1), so this sees every writer,
    in this process or any other, without asking the engine anything."""

    def __init__(
        self,
        log_dir: Path,
        wall: Callable[[], float] = time.monotonic,
        every: float = 0.005,
        hold: float = 0.25,
    ) -> None:
        self.dir, self._wall, self._every, self._hold = log_dir, wall, every, hold
        self._seg: Path | None = None
        self._dir_mtime = -1
        self._key = self._look()
        self._checked = wall()
        self._active_at = float("-inf")

    def _look(self) -> tuple[int, int] | None:
        try:
            mtime = os.stat(self.dir).st_mtime_ns
            if mtime != self._dir_mtime or self._seg is None:  # a segment came or went
                segs = list_segments(self.dir)
                self._seg = segs[-1][1] if segs else None
                self._dir_mtime = mtime
            return mtime, os.stat(self._seg).st_size if self._seg is not None else 0
        except OSError:
            self._seg = None
            return None

    def __call__(self) -> bool:
        now = self._wall()
        if now - self._checked >= self._every:
            self._checked = now
            key = self._look()
            if key != self._key:
                self._key = key
                self._active_at = now
        return now - self._active_at < self._hold


class Pacer:
    """Keeps a process's CPU use at most ``share`` of one core while ``busy()`` says so (always,
    without it): called after each slice of work, it owes ``used * (1 - share) / share`` seconds
    of sleep for the CPU time ``used`` since the last call, and sleeps once it owes
    ``min_sleep`` (fewer, longer pauses; a sleep that overruns is credited). A duty cycle rather
    than a rate: it needs no idea of how fast the machine is, and leaves the cores, the cache
    and the disk to the engine most of the time.
    """

    def __init__(
        self,
        share: float,
        busy: Callable[[], bool] | None = None,
        cpu: Callable[[], float] = time.process_time,
        wall: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        min_sleep: float = 0.002,
    ) -> None:
        self.share = check_cpu_share(share)
        self._busy = busy
        self._cpu, self._wall, self._sleep, self._min = cpu, wall, sleep, min_sleep
        self._last = cpu()
        self.owed = 0.0
        self.slept = 0.0

    def __call__(self) -> None:
        if self.share >= 1.0:
            return
        now = self._cpu()
        if self._busy is not None and not self._busy():
            self._last, self.owed = now, 0.0  # the engine is idle: this slice is free
            return
        self.owed += (now - self._last) * (1.0 - self.share) / self.share
        self._last = now
        if self.owed >= self._min:
            t0 = self._wall()
            self._sleep(self.owed)
            took = self._wall() - t0
            self.slept += took
            self.owed -= took
            self._last = self._cpu()


class Done(msgspec.Struct):
    size: int
    sha256: str
    paused_s: float = 0.0  # time the worker slept to keep to its cpu share


def write_plan(plan: Plan, sink: Sink, progress: Progress | None = None) -> dict[str, Member]:
    """Write the archive of ``plan`` to ``sink``, then sync_close it (fsync of a file).
    Returns the members (name -> size, sha256), manifest included.

    A plan for every core (``threads`` None) is written as a pipeline (``backup.pipeline``):
    files are read and hashed by one thread, compressed by zstd's, and the output is hashed
    and written by another, so that no stage waits for the others. A plan for one core is
    written by the calling thread alone: a low-priority worker must not take a second core."""
    pipelined = plan.threads is None
    out: Sink = ThreadedSink(sink) if pipelined else sink
    try:
        writer = PipelinedArchiveWriter if pipelined else ArchiveWriter
        aw = writer(
            out,
            plan.compression,
            progress,
            threads=plan.threads,
            chunk=plan.chunk,
            header=plan.manifest,
        )
        for m in plan.members:
            if m.path is not None:
                aw.add_file(m.name, Path(m.path), m.size)
            else:
                aw.add_bytes(m.name, m.data or b"")
        files = {n: {"size": x.size, "sha256": x.sha256} for n, x in aw.members.items()}
        aw.add_bytes(MANIFEST_NAME, encode_manifest(plan.manifest | {"files": files}))
        aw.finish()
        out.sync_close()
    finally:
        if isinstance(out, ThreadedSink):
            out.stop()  # on a failure, the owner of ``sink`` closes it
    return aw.members


# -- the parent's side -----------------------------------------------------------------------


def run_worker(
    request: Request,
    output: Path | None,
    progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
    *,
    fd: int | None = None,
    relay: Sink | None = None,
    cancel: threading.Event | None = None,
) -> Done:
    """Run ``request`` in a low-priority worker process and wait for it.

    The worker writes the archive to ``fd`` (an open regular file of the caller's, which it
    fsyncs), or, with ``relay``, to a pipe whose bytes a thread here writes into ``relay``
    (which counts and hashes them; the caller compares with the worker's ``Done``). Exactly one
    of the two. ``progress(n)`` gets the bytes the worker reports; ``on_start(pid)`` is called
    once the worker exists, before it has its plan (a caller may watch it or set limits on it);
    ``cancel``, once set, kills the worker and fails the backup.

    Errors: the worker's OSError is raised again with its errno, BadArchive and BackupError
    with their message, the relay's error as it is; a worker that dies or talks nonsense is a
    BackupError naming ``output`` (the file nothing was written at; None for a stream). On any
    error or interrupt here, the worker is killed and reaped before this returns. The caller
    owns the file (and removes it on failure)."""
    if (fd is None) == (relay is None):
        raise ValueError("run_worker needs exactly one of fd and relay")
    read_end = -1
    if relay is not None:
        read_end, fd = os.pipe()
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # fewer wake-ups; a hint
        except (OSError, AttributeError):
            pass
    assert fd is not None
    payload = msgspec.msgpack.encode(msgspec.structs.replace(request, fd=fd))
    relay_error: list[BaseException] = []
    finished = threading.Event()
    threads: list[threading.Thread] = []
    try:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                module_argv(MODULE),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=module_env(),
                pass_fds=(fd,),
                # A process group of its own, so that a Ctrl-C at a terminal reaches only the
                # parent (which kills and reaps it) -- but the parent's session: with autogroup
                # scheduling (Linux's default on desktops and many servers) a new session would
                # be a new CPU group with its own fair share, and SCHED_IDLE would only rank the
                # worker within that group, not below the engine's threads.
                process_group=0,
            )
            if relay is not None:
                os.close(fd)  # the worker holds the write end now: its exit ends the pipe
                fd = None
                t = threading.Thread(
                    target=_relay,
                    args=(read_end, relay, proc, relay_error),
                    name="engram-backup-relay",
                    daemon=True,
                )
                t.start()
                threads.append(t)
            if cancel is not None:
                w = threading.Thread(
                    target=_kill_on,
                    args=(cancel, finished, proc),
                    name="engram-backup-cancel",
                    daemon=True,
                )
                w.start()
                threads.append(w)
            return _wait_for(
                proc, payload, err, output, progress, on_start, relay_error, cancel, threads
            )
    finally:
        finished.set()
        for t in threads:
            t.join()
        if read_end >= 0:
            os.close(read_end)
        if relay is not None and fd is not None:
            os.close(fd)  # Popen failed before the worker took it


def _relay(
    read_end: int, sink: Sink, proc: subprocess.Popen[bytes], error: list[BaseException]
) -> None:
    """Copy the pipe into ``sink`` until the worker closes it; on a sink error, kill the
    worker (which then cannot block on a full pipe) and keep the error for the caller."""
    try:
        while True:
            data = os.read(read_end, 1 << 20)
            if not data:
                return
            sink.write(data)
    except BaseException as e:
        error.append(e)
        proc.kill()


def _kill_on(
    cancel: threading.Event, finished: threading.Event, proc: subprocess.Popen[bytes]
) -> None:
    while not finished.is_set():
        if cancel.wait(0.05):
            proc.kill()
            return


def _wait_for(
    proc: subprocess.Popen[bytes],
    payload: bytes,
    err: Any,
    output: Path | None,
    progress: Progress | None,
    on_start: Callable[[int], None] | None,
    relay_error: list[BaseException],
    cancel: threading.Event | None,
    threads: list[threading.Thread],
) -> Done:
    assert proc.stdin is not None and proc.stdout is not None
    done: Done | None = None
    error: dict[str, Any] | None = None
    garbled = False
    try:
        if on_start is not None:
            on_start(proc.pid)
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died before reading its plan: its exit status says how
        for line in proc.stdout:
            try:
                msg = json.loads(line)
                if "progress" in msg:
                    if progress is not None:
                        progress(int(msg["progress"]))
                elif "done" in msg:
                    done = msgspec.convert(msg["done"], Done)
                elif "error" in msg:
                    error = dict(msg["error"])
                else:
                    garbled = True
            except (ValueError, TypeError, KeyError, msgspec.ValidationError):
                garbled = True
            if garbled:
                break
        if garbled:
            proc.kill()
        rc = proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if not proc.stdin.closed:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
    for t in threads:  # the relay has every byte (or its error) once the worker is gone
        if t.name == "engram-backup-relay":
            t.join()
    if relay_error:
        raise relay_error[0]
    nothing = "nothing of it was kept" if output is None else f"nothing was written at {output}"
    if cancel is not None and cancel.is_set():
        raise BackupError(f"the backup was cancelled; {nothing}")
    who = f"the backup worker (pid {proc.pid})"
    if garbled:
        raise BackupError(f"{who} answered nonsense; {nothing}")
    if rc == 0 and done is not None and error is None:
        return done
    if rc == EXIT_FAILED and error is not None:
        raise _error_from(error, who, output)
    if rc < 0:
        try:
            how = f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            how = f"was killed by signal {-rc}"
    else:
        how = f"exited with code {rc}"
        err.seek(0)
        last = err.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
        if last:
            how += f" ({last[-1].strip()[:300]})"
    raise BackupError(f"{who} {how}; {nothing}")


_ERRORS: dict[str, type[EngramError]] = {"BadArchive": BadArchive, "BackupError": BackupError}


def _error_from(e: dict[str, Any], who: str, output: Path | None) -> BaseException:
    if e.get("kind") == "os" and isinstance(e.get("errno"), int):
        return OSError(e["errno"], str(e.get("strerror") or os.strerror(e["errno"])))
    message = " ".join(str(e.get("message") or "no reason given").split())
    cls = _ERRORS.get(str(e.get("class")))
    if e.get("kind") == "engram" and cls is not None:
        return cls(message)
    nothing = "nothing of it was kept" if output is None else f"nothing was written at {output}"
    return BackupError(f"{who} failed ({message}); {nothing}")


# -- the worker's side -----------------------------------------------------------------------


class _Orphaned(Exception):
    pass


def _error_of(e: BaseException) -> dict[str, Any]:
    if isinstance(e, OSError) and e.errno is not None:
        return {"kind": "os", "errno": e.errno, "strerror": e.strerror, "message": str(e)}
    if isinstance(e, EngramError):
        return {"kind": "engram", "class": type(e).__name__, "message": e.message}
    return {"kind": "other", "message": f"{type(e).__name__}: {e}"}


def main() -> int:
    parent = os.getppid()
    lower_priority()
    out = sys.stdout.buffer

    def say(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg).encode() + b"\n")
        out.flush()

    report = True
    pending = 0
    pace = Pacer(1.0)

    def tick(n: int) -> None:
        nonlocal pending
        if os.getppid() != parent:
            raise _Orphaned
        pace()
        pending += n
        if report and pending >= REPORT_EVERY:
            say({"progress": pending})
            pending = 0

    sink: FileSink | None = None
    try:
        req = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=Request)
        report = req.progress
        busy = LogActivity(Path(req.log_dir)) if req.log_dir else None
        pace = Pacer(req.cpu_share, busy)
        sink = FileSink(fd=req.fd)
        write_plan(req.plan, sink, tick)
        if report and pending:
            say({"progress": pending})
        done = {"size": sink.size, "sha256": sink.sha.hexdigest(), "paused_s": pace.slept}
        say({"done": done})
        return 0
    except BaseException as e:
        if sink is not None:
            sink.close()  # the file is the parent's: it removes it
        if isinstance(e, _Orphaned):
            return EXIT_ORPHANED
        try:
            say({"error": _error_of(e)})
        except OSError:  # the parent is gone
            return EXIT_ORPHANED
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
