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
  most of the cache. Slower, but writes barely notice it.

The worker protocol: the request (``Request``: the temp path to create and the plan), msgpack on
stdin; JSON lines on stdout: ``{"progress": n}`` (bytes since the last line, every 4 MiB, when
asked for), then one of ``{"done": {"size", "sha256"}}`` or ``{"error": {...}}``. Exit code
0 = done, 3 = failed (the error line says why: an OSError keeps its errno, an engram error its
class and message), 4 = its parent went away (it removed its temp file itself). Anything else —
a signal, a crash — is the worker dying, and ``run_worker`` says so. The worker runs in a process
group of its own (in the parent's session), so a Ctrl-C at a terminal reaches only the parent,
which kills and reaps it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from engram.backup.archive import CHUNK, ArchiveWriter, FileSink, Member, Progress
from engram.errors import BackupError, BadArchive, EngramError
from engram.format.manifest import MANIFEST_NAME, encode_manifest
from engram.procs import module_argv, module_env

EXIT_FAILED = 3
EXIT_ORPHANED = 4
MODULE = "engram.backup.worker"
# A low-priority backup reads in small chunks: with its buffer and the compressor's state in the
# core's own cache it evicts less of the engine's working set from the shared one (measured on
# 2 cores: write p99 during back-to-back backups ~1.4x with 256 KiB vs ~1.55x with 4 MiB).
LOW_CHUNK = 256 << 10
REPORT_EVERY = 4 << 20  # bytes between progress lines (each one wakes the parent)


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
    path: str  # the temp file to create (O_EXCL) and write
    plan: Plan
    progress: bool = True  # send progress lines (each one wakes the parent)


class Done(msgspec.Struct):
    size: int
    sha256: str


def write_plan(plan: Plan, sink: FileSink, progress: Progress | None = None) -> dict[str, Member]:
    """Write the archive of ``plan`` to ``sink``, then fsync and close it. Returns the members
    (name -> size, sha256), manifest included."""
    aw = ArchiveWriter(sink, plan.compression, progress, threads=plan.threads, chunk=plan.chunk)
    for m in plan.members:
        if m.path is not None:
            aw.add_file(m.name, Path(m.path), m.size)
        else:
            aw.add_bytes(m.name, m.data or b"")
    files = {n: {"size": x.size, "sha256": x.sha256} for n, x in aw.members.items()}
    aw.add_bytes(MANIFEST_NAME, encode_manifest(plan.manifest | {"files": files}))
    aw.finish()
    sink.sync_close()
    return aw.members


# -- the parent's side -----------------------------------------------------------------------


def run_worker(
    request: Request,
    output: Path,
    progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Done:
    """Run ``request`` in a low-priority worker process and wait for it.

    ``progress(n)`` gets the bytes the worker reports; ``on_start(pid)`` is called once the
    worker exists, before it has its plan (a caller may watch it or set limits on it). Errors:
    the worker's OSError is raised again with its errno, BadArchive and BackupError with their
    message; a worker that dies or talks nonsense is a BackupError naming ``output``. On any
    error or interrupt here, the worker is killed and reaped before this returns. The caller
    owns (and removes) the temp file."""
    payload = msgspec.msgpack.encode(request)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            module_argv(MODULE),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=module_env(),
            # A process group of its own, so that a Ctrl-C at a terminal reaches only the
            # parent (which kills and reaps it) -- but the parent's session: with autogroup
            # scheduling (Linux's default on desktops and many servers) a new session would be a
            # new CPU group with its own fair share, and SCHED_IDLE would only rank the worker
            # within that group, not below the engine's threads.
            process_group=0,
        )
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
        who = f"the backup worker (pid {proc.pid})"
        if garbled:
            raise BackupError(f"{who} answered nonsense; nothing was written at {output}")
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
        raise BackupError(f"{who} {how}; nothing was written at {output}")


_ERRORS: dict[str, type[EngramError]] = {"BadArchive": BadArchive, "BackupError": BackupError}


def _error_from(e: dict[str, Any], who: str, output: Path) -> BaseException:
    if e.get("kind") == "os" and isinstance(e.get("errno"), int):
        return OSError(e["errno"], str(e.get("strerror") or os.strerror(e["errno"])))
    message = " ".join(str(e.get("message") or "no reason given").split())
    cls = _ERRORS.get(str(e.get("class")))
    if e.get("kind") == "engram" and cls is not None:
        return cls(message)
    return BackupError(f"{who} failed ({message}); nothing was written at {output}")


# -- the worker's side -----------------------------------------------------------------------


class _Orphaned(Exception):
    pass


def _error_of(e: BaseException) -> dict[str, Any]:
    if isinstance(e, OSError) and e.errno is not None:
        return {"kind": "os", "errno": e.errno, "strerror": e.strerror, "message": str(e)}
    if isinstance(e, EngramError):
        return {"kind": "engram", "class": type(e).__name__, "message": e.message}
    return {"kind": "other", "message": f"{type(e).__name__}: {e}"}


def lower_priority() -> str:
    """Make this process run only when a CPU is otherwise idle: SCHED_IDLE, or nice 19 where
    that is not available or not permitted. Returns which one it got."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        pass
    try:
        os.nice(19 - os.nice(0))
        return "nice 19"
    except OSError:
        return "unchanged"


def main() -> int:
    parent = os.getppid()
    lower_priority()
    out = sys.stdout.buffer

    def say(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg).encode() + b"\n")
        out.flush()

    report = True
    pending = 0

    def tick(n: int) -> None:
        nonlocal pending
        if os.getppid() != parent:
            raise _Orphaned
        pending += n
        if report and pending >= REPORT_EVERY:
            say({"progress": pending})
            pending = 0

    path: Path | None = None
    sink: FileSink | None = None
    try:
        req = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=Request)
        report = req.progress
        path = Path(req.path)
        sink = FileSink(path)
        write_plan(req.plan, sink, tick)
        if report and pending:
            say({"progress": pending})
        say({"done": {"size": sink.size, "sha256": sink.sha.hexdigest()}})
        return 0
    except BaseException as e:
        if sink is not None and path is not None:
            sink.close()
            path.unlink(missing_ok=True)
        if isinstance(e, _Orphaned):
            return EXIT_ORPHANED
        try:
            say({"error": _error_of(e)})
        except OSError:  # the parent is gone
            return EXIT_ORPHANED
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
