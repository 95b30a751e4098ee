"""Issue 2 performance figures: the engine, its HTTP server, and recovery.

    .venv/bin/python bench/bench_core.py [--quick] [--duration S] [--replay-gb G] ...

What each number is:
- HTTP figures: a real ``engram serve`` process (durability ``sync``: every write
  acknowledged only after its fsync) driven over loopback by bench/loadgen.py, a lean asyncio
  keep-alive client in this process (it shares the 2 cores with the server).
- The write baseline: bench/baseline_server.py, plain SQLite (WAL, synchronous=FULL, one
  transaction per write) behind the same HTTP stack, driven by the same 32 clients.
- In-process figures: the same comparison without HTTP, 32 threads calling
  ``Engine.apply([op])`` vs 32 threads doing one SQLite transaction per write.
- Recovery: a store built through the engine, then N more records logged with no warm-tier
  commit and the process SIGKILLed; the figure is the replay of those N records on reopen.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import common
from common import NO_CHECKPOINTS, Capture, Latency, Report, mb, median
from engram.graph import Engine, EngineConfig
from loadgen import LoadResult, request, run_load

CLIENTS = 32


def parse_args(argv: list[str] | None) -> Any:
    p = common.base_args(__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, help="seconds per HTTP measurement (default 5)")
    p.add_argument("--reps", type=int, help="repetitions per measurement; medians (default 3)")
    p.add_argument("--batch-ops", type=int, default=1000, help="ops per POST /v1/batch")
    p.add_argument("--batch-clients", type=int, default=2, help="concurrent batch clients")
    p.add_argument(
        "--replay-gb", type=float, help="warm-tier size of the recovery store (default 0.25)"
    )
    p.add_argument(
        "--replay-records", type=int, help="records replayed on reopen (default 300,000)"
    )
    p.add_argument(
        "--only",
        choices=["http", "inproc", "recovery"],
        action="append",
        help="run only these parts (repeatable)",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.duration = args.duration or (0.5 if q else 5.0)
    args.reps = args.reps or (1 if q else 3)
    args.replay_gb = args.replay_gb if args.replay_gb is not None else (0.003 if q else 0.25)
    args.replay_records = args.replay_records or (5_000 if q else 300_000)
    return args


# -- request makers -------------------------------------------------------------------------


def _content_pool(n: int = 1024) -> list[bytes]:
    rnd = random.Random(3)
    return [common.content(rnd).encode() for _ in range(n)]


POOL = _content_pool()


def batch_maker(ops: int, prefix: str) -> Any:
    op = b'{"op":"create_memory","id":"%s%%08d","content":"%%s","strength":0.5}' % prefix.encode()

    def make(i: int) -> bytes:
        base = i * ops
        parts = [op % (base + k, POOL[(base + k) & 1023]) for k in range(ops)]
        return request("POST", "/v1/batch", b'{"ops":[' + b",".join(parts) + b"]}")

    return make


def post_memory_maker() -> Any:
    def make(i: int) -> bytes:
        return request("POST", "/v1/memories", b'{"content":"%s %d"}' % (POOL[i & 1023], i))

    return make


def get_memory_maker(prefix: str, n: int) -> Any:
    heads = [
        b"GET /v1/memories/%s%08d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (prefix.encode(), k)
        for k in range(min(n, 50_000))
    ]
    m = len(heads)

    def make(i: int) -> bytes:
        return heads[(i * 7919) % m]

    return make


def repeated(
    rep: Report, label: str, reps: int, run: Any, key: str
) -> tuple[float, Latency, list[LoadResult]]:
    """Run ``run(r)`` ``reps`` times; median req/s and median latency percentiles."""
    results: list[LoadResult] = []
    for r in range(reps):
        results.append(run(r))
        rep.info(f"{label} run {r + 1}/{reps}: {results[-1].text()}")
    rate, lat = summarize(rep, label, results, key)
    return rate, lat, results


# -- HTTP -----------------------------------------------------------------------------------


class BaselineServer:
    """bench/baseline_server.py in a subprocess on a free loopback port."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = common.free_port()
        self.log_path = work / "baseline-http.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BaselineServer:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(common.BENCH_DIR / "baseline_server.py"),
                    "--db",
                    str(self.work / "baseline-http.db"),
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        health = request("GET", "/health")
        while True:
            try:
                run_load(self.port, lambda i: health, concurrency=1, total=1)
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the baseline server did not start; see {self.log_path}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def bench_http(rep: Report, args: Any, work: Path) -> None:
    ServerProcess = common.server_process_class()
    D, reps = args.duration, args.reps
    rep.section(f"HTTP: engram server (durability sync), {D:g} s per run x {reps}")
    fs = common.fsync_probe(work)
    rep.figure("fsync_ms_before", fs.__dict__, f"disk now: fsync of a 300-byte append {fs.text()}")
    srv = ServerProcess(work / "http-data", durability="sync")
    srv.start(timeout=60)
    base = BaselineServer(work)
    try:
        port = int(srv.url.rsplit(":", 1)[1])
        rep.info(f"engram server pid {srv.pid} at {srv.url}")

        live = request("GET", "/health/live")
        floor = run_load(port, lambda i: live, concurrency=CLIENTS, duration=D)
        rep.figure(
            "http_floor_rps",
            floor.rps,
            f"HTTP floor, GET /health/live, {CLIENTS} clients (no engine work): {floor.text()}",
        )

        # Durable batches.
        make_batch = batch_maker(args.batch_ops, "b")
        next_batch = [0]

        def run_batch(_: int) -> LoadResult:
            res = run_load(
                port,
                make_batch,
                concurrency=args.batch_clients,
                duration=D,
                start_index=next_batch[0],
            )
            next_batch[0] += res.requests
            return res

        if not args.quick:
            run_batch(0)  # warm-up: the first batches grow the files
        rate, _, results = repeated(
            rep,
            f"POST /v1/batch ({args.batch_ops} create_memory ops, {args.batch_clients} clients)",
            reps,
            run_batch,
            "http_batch",
        )
        ops_rate = rate * args.batch_ops
        rep.figure("http_batch_ops_per_s", ops_rate, f"= {ops_rate:,.0f} ops/s, durable")
        rep.check(all(r.errors == 0 for r in results), "POST /v1/batch answered non-200")
        created = next_batch[0] * args.batch_ops

        # Single writes, 32 clients: engram and the baseline in alternation, so that both see
        # the same disk (its fsync latency drifts on this machine).
        rep.section(
            f"POST /v1/memories, {CLIENTS} clients: engram vs baseline (SQLite WAL, "
            "synchronous=FULL, one transaction per write, same HTTP stack), alternating"
        )
        base.start()
        make_post = post_memory_maker()
        offset = [0]

        cpu: dict[int, list[float]] = {port: [], base.port: []}
        pids = {port: srv.pid, base.port: base.proc.pid if base.proc else 0}

        def run_post(p: int) -> LoadResult:
            c0 = common.proc_cpu_s(pids[p])
            res = run_load(
                p, make_post, concurrency=CLIENTS, duration=D, expect=201, start_index=offset[0]
            )
            cpu[p].append((common.proc_cpu_s(pids[p]) - c0) / max(res.requests, 1) * 1e6)
            offset[0] += res.requests
            return res

        for p in (port, base.port):  # warm-up
            run_load(
                p,
                make_post,
                concurrency=CLIENTS,
                duration=min(D, 1.0),
                expect=201,
                start_index=50_000_000 + p,
            )
        eng_runs: list[LoadResult] = []
        base_runs: list[LoadResult] = []
        fs_runs: list[float] = []
        for r in range(reps):
            eng_runs.append(run_post(port))
            rep.info(f"engram   run {r + 1}/{reps}: {eng_runs[-1].text()}")
            base_runs.append(run_post(base.port))
            rep.info(f"baseline run {r + 1}/{reps}: {base_runs[-1].text()}")
            fs_runs.append(common.fsync_probe(work, 50).p50)
        post_rate, post_lat = summarize(rep, "engram POST /v1/memories", eng_runs, "http_post")
        base_rate, _ = summarize(rep, "baseline POST /v1/memories", base_runs, "http_baseline")
        ratios = [e.rps / b.rps for e, b in zip(eng_runs, base_runs, strict=True) if b.rps]
        rep.figure(
            "server_cpu_us_per_write",
            {"engram": cpu[port], "baseline": cpu[base.port]},
            f"server CPU per write (all threads): engram {median(cpu[port]):.0f} us, baseline "
            f"{median(cpu[base.port]):.0f} us (2 cores, shared with the client)",
        )
        rep.figure(
            "fsync_ms_between",
            fs_runs,
            "fsync p50 between runs: " + ", ".join(f"{x:.2f} ms" for x in fs_runs),
        )
        rep.check(all(r.errors == 0 for r in eng_runs), "POST /v1/memories answered non-201")
        rep.check(all(r.errors == 0 for r in base_runs), "baseline POST answered non-201")

        # Point reads.
        rep.section(f"GET /v1/memories/{{id}}, {CLIENTS} clients, over {created:,} memories")
        make_get = get_memory_maker("b", created)
        run_load(port, make_get, concurrency=CLIENTS, duration=min(D, 1.0))
        get_rate, _, results = repeated(
            rep,
            "GET /v1/memories/{id}",
            reps,
            lambda _: run_load(port, make_get, concurrency=CLIENTS, duration=D),
            "http_get",
        )
        rep.check(all(r.errors == 0 for r in results), "GET /v1/memories/{id} answered non-200")
    finally:
        srv.stop()
        base.stop()

    rep.section("issue 2 goals (HTTP, engram server process, durability sync)")
    rep.goal("durable POST /v1/batch throughput", ">=", 30_000, ops_rate, " ops/s")
    rep.goal(f"POST /v1/memories, {CLIENTS} clients", ">=", 3_000, post_rate, " req/s")
    rep.goal(f"POST /v1/memories p99, {CLIENTS} clients", "<=", 25, post_lat.p99, " ms")
    ratio = median(ratios) if ratios else None
    rep.figure(
        "http_post_vs_baseline",
        {"median": ratio, "runs": ratios},
        f"engram / baseline per run: {', '.join(f'{x:.2f}x' for x in ratios)} "
        f"(median req/s {post_rate:,.0f} vs {base_rate:,.0f})",
    )
    rep.goal(
        "POST /v1/memories vs SQLite one-txn-per-write (HTTP, same clients)", ">=", 3, ratio, "x"
    )
    rep.goal("GET /v1/memories/{id}", ">=", 5_000, get_rate, " req/s")


def summarize(
    rep: Report, label: str, results: list[LoadResult], key: str
) -> tuple[float, Latency]:
    rates = [x.rps for x in results]
    lat = Latency(
        sum(x.latency.n for x in results),
        median([x.latency.p50 for x in results]),
        median([x.latency.p90 for x in results]),
        median([x.latency.p99 for x in results]),
        max(x.latency.max for x in results),
    )
    rep.figure(
        key,
        {
            "rps": median(rates),
            "runs": rates,
            "latency_ms": lat.__dict__,
            "errors": sum(x.errors for x in results),
        },
        f"{label}: median {median(rates):,.0f} req/s (runs: "
        f"{', '.join(f'{x:,.0f}' for x in rates)}); median {lat.text()}",
    )
    return median(rates), lat


# -- in-process -----------------------------------------------------------------------------


def _threads(n: int, duration: float, one: Any) -> tuple[float, Latency]:
    """``n`` threads calling ``one(thread, i)`` for ``duration`` seconds."""
    lats: list[list[int]] = [[] for _ in range(n)]
    stop = time.perf_counter() + duration
    start = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def run(t: int) -> None:
        start.wait()
        out, i, clock = lats[t], 0, time.perf_counter_ns
        try:
            while time.perf_counter() < stop:
                t0 = clock()
                one(t, i)
                out.append(clock() - t0)
                i += 1
        except BaseException as e:  # reported below; a bench thread must not die silently
            errors.append(e)

    ths = [threading.Thread(target=run, args=(t,)) for t in range(n)]
    for th in ths:
        th.start()
    t0 = time.perf_counter()
    start.wait()
    for th in ths:
        th.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    samples = [x for lst in lats for x in lst]
    return len(samples) / elapsed, Latency.of(samples)


def bench_inproc(rep: Report, args: Any, work: Path) -> None:
    D = min(args.duration, 3.0)
    rep.section(
        f"in-process: {CLIENTS} threads, one write per call, {D:g} s per run x {args.reps}, "
        "engine and SQLite baseline alternating"
    )
    eng = Engine.open(work / "inproc-data", EngineConfig(durability="sync"))
    conn = sqlite3.connect(
        work / "inproc-baseline.db", isolation_level=None, check_same_thread=False
    )
    try:
        t0 = time.perf_counter()
        n = 20 if not args.quick else 3
        for k in range(n):
            eng.apply(common.memory_ops(f"x{k}-", 0, args.batch_ops, random.Random(k)))
        rate = n * args.batch_ops / (time.perf_counter() - t0)
        rep.figure(
            "inproc_batch_ops_per_s",
            rate,
            f"engine.apply of {args.batch_ops}-op batches, 1 thread: {rate:,.0f} ops/s",
        )

        def eng_one(t: int, i: int) -> None:
            eng.apply([{"op": "create_memory", "content": POOL[(t * 131 + i) & 1023].decode()}])

        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(
            "CREATE TABLE memories (id TEXT PRIMARY KEY, content TEXT NOT NULL, strength REAL "
            "NOT NULL, metadata TEXT NOT NULL, created_at INTEGER NOT NULL)"
        )
        mu = threading.Lock()  # SQLite has one writer; a lock is cheaper than its busy handler

        def sql_one(t: int, i: int) -> None:
            with mu:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO memories VALUES (?, ?, 0.5, '{}', ?)",
                    (
                        f"{t}-{i}-{time.perf_counter_ns()}",
                        POOL[(t * 131 + i) & 1023].decode(),
                        time.time_ns(),
                    ),
                )
                conn.execute("COMMIT")

        runs, bruns = [], []
        f0 = eng.writer.fsyncs if eng.writer else 0
        for r in range(args.reps):
            runs.append(_threads(CLIENTS, D, eng_one))
            bruns.append(_threads(CLIENTS, D, sql_one))
            rep.info(
                f"run {r + 1}/{args.reps}: engine {runs[-1][0]:,.0f} writes/s "
                f"(p99 {runs[-1][1].p99:.1f} ms), SQLite {bruns[-1][0]:,.0f} writes/s "
                f"(p99 {bruns[-1][1].p99:.1f} ms)"
            )
        fsyncs = (eng.writer.fsyncs if eng.writer else 0) - f0
    finally:
        eng.close()
        conn.close()
    e_rate = median([r for r, _ in runs])
    b_rate = median([r for r, _ in bruns])
    writes = sum(r * D for r, _ in runs)
    rep.figure(
        "inproc_engine_writes",
        {"rps": e_rate, "runs": [r for r, _ in runs]},
        f"engine.apply([create_memory]) x {CLIENTS} threads: median {e_rate:,.0f} "
        f"writes/s, about {writes / max(fsyncs, 1):.1f} writes per fsync",
    )
    rep.figure(
        "inproc_sqlite_writes",
        {"rps": b_rate, "runs": [r for r, _ in bruns]},
        f"SQLite one txn per write (WAL, synchronous=FULL) x {CLIENTS} threads: median "
        f"{b_rate:,.0f} writes/s",
    )
    ratios = [e / b for (e, _), (b, _) in zip(runs, bruns, strict=True) if b]
    rep.figure(
        "inproc_ratio_runs",
        ratios,
        "engine / SQLite per run: " + ", ".join(f"{x:.2f}x" for x in ratios),
    )
    rep.goal(
        "engine writes vs SQLite one-txn-per-write (in-process, 32 threads)",
        ">=",
        3,
        median(ratios) if ratios else None,
        "x",
    )


# -- recovery -------------------------------------------------------------------------------


_REPLAYED = re.compile(r"recovery replayed (\d+) records in ([\d.]+)s")


def bench_recovery(rep: Report, args: Any, work: Path) -> None:
    gb, n = args.replay_gb, args.replay_records
    rep.section(f"recovery replay: {n:,} records on a store of ~{gb:g} GB (warm tier)")
    root = work / "replay-data"
    t0 = time.perf_counter()
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import common; "
            "common.build_and_crash(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), 1000)",
            str(common.BENCH_DIR),
            str(root),
            str(int(gb * 1e9)),
            str(n),
        ],
        capture_output=True,
        text=True,
    )
    if child.returncode != -9 or not child.stdout.strip():
        raise RuntimeError(f"the store builder failed ({child.returncode}): {child.stderr[-2000:]}")
    info = json.loads(child.stdout.strip().splitlines()[-1])
    rep.info(
        f"built {info['base']:,} memories (warm tier {mb(info['warm_bytes'])}) + {n:,} "
        f"unreplayed records, then SIGKILL, in {time.perf_counter() - t0:.1f} s"
    )
    cfg = EngineConfig(**NO_CHECKPOINTS)  # type: ignore[arg-type]
    with Capture() as cap:
        t0 = time.perf_counter()
        eng = Engine.open(root, cfg)
        open_s = time.perf_counter() - t0
    try:
        got_memories, got_lsn = eng.n_memories, eng.last_lsn
    finally:
        eng.close()
    replayed, replay_s = 0, open_s
    for r in cap.records:
        m = _REPLAYED.search(r.getMessage())
        if m:
            replayed, replay_s = int(m.group(1)), float(m.group(2))
    rate = replayed / replay_s if replay_s > 0 else 0.0
    rep.figure(
        "recovery",
        {
            "replayed": replayed,
            "replay_s": replay_s,
            "open_s": open_s,
            "rate": rate,
            "store_warm_bytes": info["warm_bytes"],
            "expected": n,
        },
        f"replayed {replayed:,} records in {replay_s:.2f} s (log + apply + commits) = "
        f"{rate:,.0f} records/s; whole Engine.open {open_s:.2f} s "
        f"({n / open_s:,.0f} records/s)",
    )
    rep.check(
        replayed == n and got_memories == info["memories"] and got_lsn == info["last_lsn"],
        f"recovery must replay all {n:,} logged records: it replayed {replayed:,}, the store has "
        f"{got_memories:,} memories (expected {info['memories']:,}) and ends at LSN {got_lsn:,} "
        f"(log ends at {info['last_lsn']:,}) — records were lost on recovery",
    )
    rep.goal(
        f"recovery replay rate (store {mb(info['warm_bytes'])}; issue: 1 GB)",
        ">=",
        50_000,
        rate,
        " records/s",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rep = Report("bench_core")
    print(f"bench_core on {common.machine()}{' (quick)' if args.quick else ''}")
    only = set(args.only or ["http", "inproc", "recovery"])
    with common.workdir(args, "engram-bench-core-") as work:
        if "http" in only:
            bench_http(rep, args, work)
        if "inproc" in only:
            bench_inproc(rep, args, work)
        if "recovery" in only:
            bench_recovery(rep, args, work)
    rc = rep.summary()
    rep.write_json(args.json_out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
