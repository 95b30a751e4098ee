"""A short read benchmark on a read-only open (validation level 4, ``engram benchmark``).

The mix is 70% lookups, 20% neighbor walks, 10% recalls over ids and words sampled from the data.
It reports latency percentiles in milliseconds and the rate, and never writes.

It runs for the time it is given, or until it has made ``max_ops`` operations when that comes
first (validation's: ``VALIDATION_OPS``, enough for a p99). Time never runs over: an operation
still running when it is up (a recall of a word in most memories can take seconds on a large
store) is interrupted, and counted with the time it had run.
"""

from __future__ import annotations

import random
import re
import sqlite3
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engram import query
from engram.errors import EngramError
from engram.graph import Engine

_WORD = re.compile(r"[A-Za-z]{3,}")
# Operations a validation's benchmark makes: its p99 is then the 20th slowest.
VALIDATION_OPS = 2000


@dataclass
class BenchResult:
    duration_s: float
    ops: int
    ops_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    memories: int
    by_kind: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    idx = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[idx]


def _sample(engine: Engine, rng: random.Random, k: int = 1000) -> tuple[list[str], list[str]]:
    """Up to ``k`` ids and ``3k`` words of memories picked at random."""
    ids: list[str] = []
    words: list[str] = []
    for mid, content in engine.warm.sample_contents(rng, k * 2):
        ids.append(mid)
        words.extend(_WORD.findall(content)[:3])
    return ids[:k] or ["missing-id"], words[: k * 3] or ["memory"]


def run_benchmark(
    data_dir: Path, duration_s: float = 10.0, seed: int = 1, max_ops: int | None = None
) -> BenchResult:
    """The mix for ``duration_s`` seconds, or ``max_ops`` operations if that is sooner."""
    if duration_s <= 0:
        raise EngramError("--duration must be positive")
    if max_ops is not None and max_ops < 1:
        raise EngramError("the benchmark needs at least one operation")
    engine = Engine.open(data_dir, readonly=True)
    stop: threading.Timer | None = None
    try:
        rng = random.Random(seed)
        ids, words = _sample(engine, rng)
        lat: list[float] = []
        kinds = {"lookup": 0, "neighbors": 0, "recall": 0}
        limit = max_ops if max_ops is not None else -1
        start = time.perf_counter()
        deadline = start + duration_s
        clock = time.perf_counter
        # At the deadline, whatever statement runs on the engine's connection is interrupted.
        stop = threading.Timer(duration_s, engine.warm.conn.interrupt)
        stop.daemon = True
        stop.start()
        while len(lat) != limit:
            t = clock()
            if t >= deadline:
                break
            r = rng.random()
            try:
                if r < 0.7:
                    engine.get_memory(rng.choice(ids))
                    kind = "lookup"
                elif r < 0.9:
                    kind = "neighbors"
                    try:
                        query.neighbors(engine, rng.choice(ids), "both", 1)
                    except EngramError:
                        pass
                else:
                    kind = "recall"
                    try:
                        query.recall(engine, rng.choice(words), 10)
                    except EngramError:
                        pass
            except (EngramError, sqlite3.Error):
                if clock() < deadline:
                    raise
            # An operation cut by the deadline counts with the time it ran: a lower bound of
            # its latency, so that a slow one still shows in the percentiles.
            kinds[kind] += 1
            lat.append((min(clock(), deadline) - t) * 1000.0)
        elapsed = clock() - start
        stop.cancel()  # before the statements below, which it must not interrupt
        stop.join()
        lat.sort()
        return BenchResult(
            duration_s=round(elapsed, 3),
            ops=len(lat),
            ops_per_s=round(len(lat) / elapsed, 1) if elapsed else 0.0,
            p50_ms=round(statistics.median(lat), 4) if lat else 0.0,
            p95_ms=round(_percentile(lat, 0.95), 4),
            p99_ms=round(_percentile(lat, 0.99), 4),
            memories=engine.stats()["memories"],
            by_kind=kinds,
        )
    finally:
        if stop is not None:
            stop.cancel()
            stop.join()
        engine.close()


def validation_benchmark(data_dir: Path, max_s: float = 2.0) -> BenchResult:
    """Validation's level 4: ``VALIDATION_OPS`` operations, in at most ``max_s`` seconds."""
    return run_benchmark(data_dir, max_s, max_ops=VALIDATION_OPS)


def render_lines(r: BenchResult) -> str:
    """One `name: value` line per figure (`p50: <ms>` etc.), each value a bare number, for
    scripts to parse."""
    return (
        f"p50: {r.p50_ms}\np95: {r.p95_ms}\np99: {r.p99_ms}\nops/s: {r.ops_per_s}\n"
        f"ops: {r.ops}\nmemories: {r.memories}\n"
    )
