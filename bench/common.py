"""Shared pieces of the benchmarks: reporting, statistics, stores, tools, processes.

Every benchmark prints figures and, for each goal of issues 2 and 3, one line

    goal: <what> <op> <target>, measured: <value> (met|NOT met)

Goals are never asserted: this is a shared, noisy 2-core machine and a benchmark is a report, not
a test. A *check* is different: it guards the meaning of a figure (a recovery that replayed fewer
records than were written makes its rate meaningless), and a failed check makes the run exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT / "src") not in sys.path:  # running from a checkout without `pip install -e`
    sys.path.append(str(ROOT / "src"))

from engram.graph import Engine, EngineConfig  # noqa: E402

# Checkpoints effectively off: the builder commits the warm tier itself, when it chooses.
NO_CHECKPOINTS = {"checkpoint_interval": 1e9, "checkpoint_ops": 1 << 62}

_WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma omega "
    "river stone cloud ember willow harbor lantern meadow falcon copper velvet summit "
    "garden signal orbit quartz thunder maple canyon ripple beacon cedar glacier"
).split()


# -- reporting ------------------------------------------------------------------------------


@dataclass
class Goal:
    name: str
    op: str  # ">=", "<=" or "<"
    target: float
    measured: float | None
    unit: str
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        if self.op == ">=":
            return self.measured >= self.target
        if self.op == "<=":
            return self.measured <= self.target
        return self.measured < self.target

    def line(self) -> str:
        if self.measured is None:
            return f"goal: {self.name} {self.op} {fmt_num(self.target)}{self.unit}, SKIPPED"
        verdict = "met" if self.met else "NOT met"
        return (
            f"goal: {self.name} {self.op} {fmt_num(self.target)}{self.unit}, "
            f"measured: {fmt_num(self.measured)}{self.unit} ({verdict})"
        )


@dataclass
class Report:
    bench: str
    goals: list[Goal] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    checks_failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def figure(self, key: str, value: Any, text: str) -> None:
        """Record ``value`` under ``key`` (JSON output) and print ``text`` indented."""
        self.figures[key] = value
        print(f"  {text}", flush=True)

    def info(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def goal(
        self,
        name: str,
        op: str,
        target: float,
        measured: float | None,
        unit: str = "",
        note: str = "",
    ) -> Goal:
        g = Goal(name, op, target, measured, unit, note)
        self.goals.append(g)
        print(f"  {g.line()}", flush=True)
        if note:
            print(f"    ({note})", flush=True)
        return g

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        print(f"  SKIPPED {what}: {why}", flush=True)

    def check(self, ok: bool, what: str) -> bool:
        """A sanity check on the meaning of a figure; a failure is reported and fails the run."""
        if not ok:
            self.checks_failed.append(what)
            print(f"  CHECK FAILED: {what}", flush=True)
        return ok

    def summary(self) -> int:
        print(f"\n== {self.bench}: summary ({time.monotonic() - self.t0:.0f} s)")
        for g in self.goals:
            print(f"  {g.line()}")
        for s in self.skipped:
            print(f"  skipped: {s}")
        for c in self.checks_failed:
            print(f"  CHECK FAILED: {c}")
        return 1 if self.checks_failed else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "goals": [asdict(g) | {"met": g.met} for g in self.goals],
            "figures": self.figures,
            "checks_failed": self.checks_failed,
            "skipped": self.skipped,
        }

    def write_json(self, path: Path | None) -> None:
        if path is not None:
            path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")


def fmt_num(x: float) -> str:
    if isinstance(x, int) or (abs(x) >= 100 and float(x).is_integer()):
        return f"{int(x):,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


# -- statistics -----------------------------------------------------------------------------


def percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    if not sorted_vals:
        return 0.0
    k = max(0, min(len(sorted_vals) - 1, round(q / 100 * len(sorted_vals) + 0.5) - 1))
    return float(sorted_vals[k])


@dataclass
class Latency:
    """Latency summary in milliseconds of a list of nanosecond samples."""

    n: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Latency:
        s = sorted(samples_ns)
        return cls(
            len(s),
            percentile(s, 50) / 1e6,
            percentile(s, 90) / 1e6,
            percentile(s, 99) / 1e6,
            (s[-1] / 1e6) if s else 0.0,
        )

    def text(self) -> str:
        return (
            f"p50 {self.p50:.2f} ms, p90 {self.p90:.2f} ms, p99 {self.p99:.2f} ms, "
            f"max {self.max:.1f} ms"
        )


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# -- arguments and work dirs ----------------------------------------------------------------


def base_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs, in seconds")
    p.add_argument(
        "--workdir", type=Path, help="where stores are built (default: a new temp dir, removed)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json-out", type=Path, help="also write the figures and goals as JSON")
    return p


@contextmanager
def workdir(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=args.workdir))
    else:
        d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        if args.keep:
            print(f"  (work dir kept: {d})")
        else:
            shutil.rmtree(d, ignore_errors=True)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}"


def dir_bytes(root: Path, *, exclude: tuple[str, ...] = ()) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in exclude:
            continue
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``: what makes a restored tree durable (the
    peers leave it to the kernel's writeback; engram's restore does this itself)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load() -> str:
    """The machine's load averages now (1, 5, 15 minutes): how shared it was during a run."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


def drop_file(path: Path) -> None:
    path.unlink(missing_ok=True)
    for suffix in (".sha256", ".info.json"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def fsync_probe(directory: Path, n: int = 200) -> Latency:
    """Latency of appending ~300 bytes and fsyncing, ``n`` times: the disk's commit cost now.

    The write baselines are bound by it (one fsync per write), so every ratio against them is
    printed with it: on this shared machine it moves several-fold from minute to minute.
    """
    path = directory / ".fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    samples = []
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            os.write(fd, b"x" * 300)
            os.fsync(fd)
            samples.append(time.perf_counter_ns() - t0)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return Latency.of(samples)


# -- external tools -------------------------------------------------------------------------


def missing_tools() -> str | None:
    """Why the tar/zstd baselines cannot run here, with the fix; None when they can."""
    if shutil.which("zstd") is None:
        return "zstd is not installed (install it: `sudo apt-get install -y zstd`)"
    tar = shutil.which("tar")
    if tar is None:
        return "tar is not installed (install GNU tar: `sudo apt-get install -y tar`)"
    out = subprocess.run([tar, "--version"], capture_output=True, text=True).stdout
    if "GNU tar" not in out:
        return "tar is not GNU tar (install it: `sudo apt-get install -y tar`)"
    return None


def missing_peer(tool: str, package: str) -> str | None:
    """Why peer ``tool`` (restic, borg) cannot run here, with the install command; None when it
    can."""
    if shutil.which(tool) is None:
        return (
            f"{tool} is not installed (install it: `make bench-deps`, or "
            f"`sudo apt-get install -y {package}`)"
        )
    return None


def run_cmd(cmd: list[str], cwd: Path | None = None) -> float:
    """Run ``cmd`` and return its wall time; a failure raises with its stderr."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return dt


# -- stores ---------------------------------------------------------------------------------


def content(rnd: random.Random, words: int = 30) -> str:
    """About 200 bytes of text from a small vocabulary (recall has something to match)."""
    return " ".join(rnd.choices(_WORDS, k=words))


def memory_ops(prefix: str, start: int, n: int, rnd: random.Random) -> list[dict[str, Any]]:
    return [
        {
            "op": "create_memory",
            "id": f"{prefix}{i:08d}",
            "content": content(rnd),
            "strength": 0.5,
            "metadata": {"n": i},
        }
        for i in range(start, start + n)
    ]


@dataclass
class Store:
    root: Path
    memories: int
    last_lsn: int
    warm_bytes: int
    build_s: float

    def describe(self) -> str:
        return (
            f"{self.memories:,} memories, warm tier {mb(self.warm_bytes)}, "
            f"built in {self.build_s:.1f} s"
        )


def warm_bytes(root: Path) -> int:
    """Bytes of the warm tier's database files (engram.db and its WAL)."""
    warm = root / "warm"
    return sum(p.stat().st_size for p in warm.glob("engram.db*") if p.is_file())


def db_bytes(engine: Engine) -> int:
    """The warm tier's logical size (pages x page size), whatever sits in the WAL."""
    with engine.lock:
        conn = engine.warm.conn
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int(pages) * int(size)


def fill(
    engine: Engine,
    target_warm_bytes: int,
    prefix: str = "m",
    batch: int = 1000,
    checkpoint_every: int = 200_000,
    start: int = 0,
) -> int:
    """Add memories in ``batch``-op transactions until the warm tier holds about
    ``target_warm_bytes``; returns how many were added. The warm tier is committed every
    ``checkpoint_every`` ops (the engine's own checkpoints should be off)."""
    rnd = random.Random(start or 1)
    added = since = 0
    per_mem = 340  # bytes of warm tier per memory, measured; refined as the file grows
    goal = max(batch, target_warm_bytes // per_mem)
    checkpoint_every = min(checkpoint_every, max(batch, goal // 4))
    while added < goal:
        n = min(batch, goal - added)
        engine.submit(memory_ops(prefix, start + added, n, rnd))
        added += n
        since += n
        if since >= checkpoint_every:
            engine.checkpoint()
            since = 0
            size = db_bytes(engine)
            if size:
                per_mem = max(100, size // (start + added))
                goal = max(added, target_warm_bytes // per_mem - start)
    engine.checkpoint()
    return added


def build_store(root: Path, target_warm_bytes: int, prefix: str = "m") -> Store:
    """A stopped, checkpointed data dir whose warm tier holds about ``target_warm_bytes``.

    Built through the engine (so log, digest and warm tier are what engram writes), with
    durability ``none``: the benchmarks measure other things than the build.
    """
    t0 = time.perf_counter()
    cfg = EngineConfig(durability="none", **NO_CHECKPOINTS)  # type: ignore[arg-type]
    with Engine.open(root, cfg) as eng:
        n = fill(eng, target_warm_bytes, prefix)
        last = eng.last_lsn
        size = db_bytes(eng)
    return Store(root, n, last, size, time.perf_counter() - t0)


def build_and_crash(root: str, target_warm_bytes: int, tail_records: int, batch: int) -> None:
    """Child process: build a store, then write ``tail_records`` more memories without any
    warm-tier commit and die by SIGKILL, so that the next open must replay them all.

    Prints one JSON line (memories, last LSN, checkpointed LSN) before dying.
    """
    cfg = EngineConfig(durability="none", **NO_CHECKPOINTS)  # type: ignore[arg-type]
    eng = Engine.open(Path(root), cfg)
    base = fill(eng, target_warm_bytes, "m")
    ckpt = eng.checkpoint()
    size = db_bytes(eng)
    rnd = random.Random(7)
    done = 0
    while done < tail_records:
        n = min(batch, tail_records - done)
        eng.submit(memory_ops("r", done, n, rnd))
        done += n
    assert eng.writer is not None
    eng.writer.sync()  # not needed to survive SIGKILL (the page cache has it), but cheap
    print(
        json.dumps(
            {
                "memories": base + done,
                "base": base,
                "last_lsn": eng.last_lsn,
                "ckpt_lsn": ckpt,
                "warm_bytes": size,
            }
        ),
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGKILL)


# -- server processes -----------------------------------------------------------------------


def server_process_class() -> Any:
    """The integration tests' ServerProcess (tests/integration/serverproc.py)."""
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    try:
        from serverproc import ServerProcess  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    return ServerProcess


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Capture(logging.Handler):
    """Collects log records of the ``engram`` logger (recovery reports its replay time)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Capture:
        lg = logging.getLogger("engram")
        self._level = lg.level
        lg.setLevel(logging.INFO)
        lg.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        lg = logging.getLogger("engram")
        lg.removeHandler(self)
        lg.setLevel(self._level)
