"""Request latency of a server while the deferred digest check of its restored data dir runs,
against the same server once the check is done (docs/DESIGN.md O7, ``engram.verifying``).

    .venv/bin/python bench/bench_verify.py [--quick] [--mb M] [--rounds N] [--against SRC]

Builds a store, backs it up, validates the backup (level 3) and restores it, which leaves the
digest check for the next server. Each round copies the restored data dir, starts ``engram
serve`` on it and, while /health/ready says "verifying", alternates GET /v1/memories/{id} and
POST /v1/memories windows (4 clients each); once it says "ready", the same windows again. Only
windows that ended before the check did count as "during".

``--against SRC``: also run, alternating with this checkout, the engram package under SRC (a
``src`` directory of another version, e.g. ``git archive <commit> src | tar -x -C /tmp/old``),
so that a change's before and after are measured in the same run on the same load.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx

import common
from common import Engine, EngineConfig, Latency, Report
from engram.backup.full import full_backup
from engram.backup.restore import restore
from engram.backup.validate import validate_backup
from loadgen import request, run_load

CLIENTS = 4


def parse_args(argv: list[str] | None) -> Any:
    p = common.base_args(__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=100.0, help="warm tier size of the store")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=float, default=0.5, help="seconds of each GET/POST window")
    p.add_argument("--against", type=Path, help="another engram src dir to run alternately")
    args = p.parse_args(argv)
    if args.quick:
        args.mb, args.rounds, args.window = min(args.mb, 8.0), 1, 0.25
    return args


def prepare(rep: Report, work: Path, mb: float) -> tuple[Path, int]:
    """A restored data dir whose digest check is pending, and how many memories it holds."""
    store = common.build_store(work / "src", int(mb * 1e6))
    rep.info(store.describe())
    archive = work / "full.tar.zst"
    with Engine.open(store.root, EngineConfig(checkpoint_interval=3600)) as eng:
        full_backup(eng, archive)
    rep.check(validate_backup(archive, level=3).ok, "the backup passed validation level 3")
    res = restore(archive, work / "restored")
    rep.check(res.verification == "deferred", f"the restore deferred its check ({res.verify_why})")
    return work / "restored", store.memories


def one_round(
    work: Path, pristine: Path, n: int, src: Path | None, window: float
) -> dict[str, Any]:
    """GET and POST latencies (ns samples) while verifying and after, for one server run on a
    fresh copy of ``pristine``; ``src``: the engram package to run (None: this checkout)."""
    data = work / "run"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(pristine, data)
    env = {"PYTHONPATH": str(src)} if src is not None else None
    srv = common.server_process_class()(data, env=env).start(wait="live", timeout=120)
    port = int(srv.url.rsplit(":", 1)[1])
    get = [request("GET", f"/v1/memories/m{i:08d}") for i in range(0, n, max(1, n // 997))]
    samples: dict[str, list[int]] = {
        k: [] for k in ("get_during", "post_during", "get_after", "post_after")
    }
    counted = {"during": 0, "after": 0}

    def state() -> str:
        return str(httpx.get(f"{srv.url}/health/ready", timeout=30).json().get("status"))

    def windows(phase: str) -> None:
        g = run_load(port, lambda i: get[i % len(get)], concurrency=CLIENTS, duration=window)
        b = b'{"content":"written while %s"}' % phase.encode()
        p = run_load(
            port,
            lambda i: request("POST", "/v1/memories", b),
            concurrency=CLIENTS,
            duration=window,
            expect=201,
        )
        if g.errors or p.errors:
            raise RuntimeError(f"requests failed: {g.first_error or p.first_error}")
        if phase == "after" or state() == "verifying":
            samples[f"get_{phase}"] += g.samples_ns
            samples[f"post_{phase}"] += p.samples_ns
            counted[phase] += 1

    try:
        t0 = time.monotonic()
        while state() == "starting":
            time.sleep(0.01)
        while state() == "verifying":
            windows("during")
        check_s = time.monotonic() - t0
        if state() != "ready":
            raise RuntimeError(f"the check did not pass: {srv.log()[-2000:]}")
        while counted["after"] < max(2, counted["during"]):
            windows("after")
    finally:
        srv.stop()
    return {"samples": samples, "check_s": check_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rep = Report("bench_verify")
    print(f"bench_verify on {common.machine()}{' (quick)' if args.quick else ''}")
    print(f"  load before: {common.load()}")
    with common.workdir(args, "engram-bench-verify-") as work:
        rep.section(f"a restored store (~{args.mb:g} MB warm tier) whose digest check is pending")
        pristine, n = prepare(rep, work, args.mb)
        impls: list[tuple[str, Path | None]] = [("this", None)]
        if args.against is not None:
            impls.insert(0, (f"against {args.against}", args.against.resolve()))
        got: dict[str, dict[str, list[int]]] = {name: {} for name, _ in impls}
        checks: dict[str, list[float]] = {name: [] for name, _ in impls}
        rep.section(f"GET and POST while the server checks vs after ({CLIENTS} clients)")
        for r in range(args.rounds):
            order = impls if r % 2 == 0 else impls[::-1]
            for name, src in order:
                out = one_round(work, pristine, n, src, args.window)
                checks[name].append(out["check_s"])
                for k, v in out["samples"].items():
                    got[name].setdefault(k, []).extend(v)
        for name, _ in impls:
            s = got[name]
            rep.info(f"{name}: the check took {common.median(checks[name]):.1f} s (median)")
            for k in ("get_during", "get_after", "post_during", "post_after"):
                lat = Latency.of(s.get(k, []))
                rep.figure(f"{name}.{k}_p99_ms", lat.p99, f"  {k:12} n={lat.n:6}  {lat.text()}")
        this = got["this"]
        for method, k in (("GET /v1/memories/{id}", "get"), ("POST /v1/memories", "post")):
            name = f"{method} p99 while the server verifies a restore vs after"
            during, after = Latency.of(this[f"{k}_during"]), Latency.of(this[f"{k}_after"])
            if during.n == 0:
                rep.skip(name, "the check ended before the first window; use a larger --mb")
                rep.goal(name, "<=", 1.5, None, "x")
            else:
                rep.goal(name, "<=", 1.5, during.p99 / after.p99, "x")
        print(f"  load after: {common.load()}")
    rc = rep.summary()
    rep.write_json(args.json_out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
