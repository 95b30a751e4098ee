"""Run every benchmark (``make bench``) and print one summary of all the goals.

    .venv/bin/python bench/run_all.py [--quick] [--large] [--only core|backup|repo|open|peers|crypt]
                                      [--json-out F]

Each benchmark runs in its own process (a fresh interpreter, its own threads and caches) with
its output streamed as it goes; the summary at the end lists every goal line of the issues
with met / NOT met. Exit status: 0 unless a benchmark failed to run or a sanity check failed —
a goal that is not met is a finding, not a failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Goal

BENCH_DIR = Path(__file__).resolve().parent
BENCHES = {
    "core": "bench_core.py",
    "backup": "bench_backup.py",
    "repo": "bench_repo.py",
    "open": "bench_open.py",
    "peers": "bench_peers.py",
    "crypt": "bench_encryption.py",
    "s3": "bench_s3.py",
    "verify": "bench_verify.py",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--large", action="store_true", help="bench_backup: add the ~1.5 GB store")
    p.add_argument("--only", choices=sorted(BENCHES), action="append")
    p.add_argument("--json-out", type=Path, help="all figures and goals as one JSON file")
    p.add_argument("--workdir", type=Path, help="where the stores are built")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    results: dict[str, dict] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="engram-bench-") as tmp:
        for name in args.only or list(BENCHES):
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(BENCH_DIR / BENCHES[name]), "--json-out", str(out)]
            if args.quick:
                cmd.append("--quick")
            if args.large and name == "backup":
                cmd.append("--large")
            if args.workdir is not None:
                cmd += ["--workdir", str(args.workdir)]
            print(f"\n######## {' '.join(cmd[1:])}", flush=True)
            rc = subprocess.run(cmd).returncode
            if out.exists():
                results[name] = json.loads(out.read_text())
            if rc != 0:
                failed.append(f"{BENCHES[name]} exited with {rc}")
    print(f"\n######## all benchmarks: summary ({time.monotonic() - t0:.0f} s)")
    for name, res in results.items():
        print(f"[{name}]")
        for g in res["goals"]:
            print(f"  {goal_line(g)}")
        for s in res["skipped"]:
            print(f"  skipped: {s}")
        for c in res["checks_failed"]:
            print(f"  CHECK FAILED: {c}")
    met = sum(1 for r in results.values() for g in r["goals"] if g["met"])
    total = sum(1 for r in results.values() for g in r["goals"] if g["met"] is not None)
    print(f"goals met: {met} of {total}")
    for f in failed:
        print(f"FAILED: {f}")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


def goal_line(g: dict) -> str:
    # The same text as the benchmark printed, rebuilt from its JSON.
    return Goal(g["name"], g["op"], g["target"], g["measured"], g["unit"], g["note"]).line()


if __name__ == "__main__":
    sys.exit(main())
