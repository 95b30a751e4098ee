"""Issue 11 figures: engram's backup and restore against tar + zstd, restic and borg.

    .venv/bin/python bench/bench_peers.py [--quick] [--mb M] [--rounds N]

One stopped data dir is built through the engine (``--mb`` of warm tier, default 300: about
the issue's 832k memories and its op log). Then, in ``--rounds`` rounds (default 3), each tool
backs up the same files of it and restores them into a new directory, every step a whole CLI
command timed by its wall time, in an order rotated every round:

- engram: ``engram backup --full --no-validate``, ``engram backup --full`` (the default
  validation), ``engram restore`` of the validated archive (and ``--verify=before-ready`` too
  when the CLI has that option);
- ``tar -I 'zstd -1 -T0' -cf`` and ``tar -I zstd -xf``;
- restic (a repository of format 2, compression ``auto``): ``restic backup``, ``restic
  restore latest``;
- borg (``--encryption none``): ``borg create --compression zstd,1``, ``borg extract``.

Each repository is new in each round (its creation is not timed), so every backup is a first,
full one. The peers are given exactly the files engram's archive carries (``identity.json``
and ``warm/``; after a checkpoint the op log is in no archive). Figures are medians, ratios
the median of the per-round ratios; the 100 GB restore time is extrapolated from engram's
measured restore rate. A peer that is not installed is skipped with the command that installs
it (``make bench-deps``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
from common import Report, mb, median

TAR_ZSTD = "zstd -1 -T0"
GB100 = 100e9


def parse_args(argv: list[str] | None) -> Any:
    p = common.base_args(__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, help="warm tier of the store, MB (default 300)")
    p.add_argument("--rounds", type=int, help="alternating rounds; medians (default 3)")
    args = p.parse_args(argv)
    args.mb = args.mb or (2.0 if args.quick else 300.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


# -- the tools ------------------------------------------------------------------------------


def engram_cmd(*args: str) -> list[str]:
    """The engram command as a user runs it: the venv's entry script, else ``-m engram.cli``."""
    exe = Path(sys.executable).with_name("engram")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "engram.cli", *args]


def first_line(cmd: list[str], env: dict[str, str] | None = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"


@dataclass
class Tool:
    """One tool's two timed steps. ``backup(n)`` and ``restore(n, to)`` return the command
    for round ``n`` and the directory it runs in (None: any; a restore's is created first);
    ``repo(n)`` is what its backup left (archive or repository)."""

    key: str
    label: str
    backup: Callable[[int], tuple[list[str], Path | None]]
    restore: Callable[[int, Path], tuple[list[str], Path | None]]
    repo: Callable[[int], list[Path]]
    init: Callable[[int], None] = lambda n: None
    # engram only: the backup with its default validation, a second figure.
    backup_validated: Callable[[int], list[str]] | None = None
    # What the backup leaves to the kernel's writeback (tar); the others fsync it themselves.
    unsynced_output: Callable[[int], Path] | None = None
    fsyncs_restore: bool = False
    version: str = ""
    env: dict[str, str] = field(default_factory=dict)
    # Each step's figure (seconds; bytes for repo_bytes), one per round.
    per_round: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: str, seconds: float) -> None:
        self.per_round.setdefault(step, []).append(seconds)

    def med(self, step: str) -> float | None:
        xs = self.per_round.get(step)
        return median(xs) if xs else None


def engram_env(work: Path) -> dict[str, str]:
    """The environment engram's commands run in: this checkout's code, with its bytecode
    compiled once into the work dir, as an installed engram has it (pip compiles it). An
    environment with PYTHONDONTWRITEBYTECODE (this machine's) would otherwise compile every
    module in every command and every helper process it starts."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    run([sys.executable, "-m", "compileall", "-q", str(common.ROOT / "src" / "engram")], env)
    return env


def make_tools(store: Path, work: Path, files: list[str], rep: Report) -> list[Tool]:
    """The tools that can run here, engram first; a missing peer is reported as skipped."""
    env = dict(os.environ)
    # restic always encrypts: its password (and cache) live in the work dir. borg runs
    # without encryption, like engram, and keeps its cache, config and keys there too.
    (work / "restic.pw").write_text("bench\n")
    env.update(
        RESTIC_PASSWORD_FILE=str(work / "restic.pw"),
        RESTIC_CACHE_DIR=str(work / "restic-cache"),
        BORG_BASE_DIR=str(work / "borg-home"),
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
    )
    for var in ("RESTIC_REPOSITORY", "RESTIC_PASSWORD", "RESTIC_PASSWORD_COMMAND", "BORG_REPO"):
        env.pop(var, None)
    out = work / "out"
    out.mkdir()

    def arch(n: int, kind: str) -> Path:
        return out / f"{kind}-{n}.tar.zst"

    def sidecars(p: Path) -> list[Path]:
        return [p, p.with_name(p.name + ".sha256"), p.with_name(p.name + ".info.json")]

    eng_env = engram_env(work)
    tools = [
        Tool(
            "engram",
            "engram",
            backup=lambda n: (
                engram_cmd(
                    "backup",
                    "--full",
                    f"--output={arch(n, 'engram')}",
                    "--no-validate",
                    f"--data-dir={store}",
                ),
                None,
            ),
            restore=lambda n, to: (
                engram_cmd("restore", "--from", str(arch(n, "validated")), "--to", str(to)),
                None,
            ),
            repo=lambda n: sidecars(arch(n, "validated")),
            backup_validated=lambda n: engram_cmd(
                "backup", "--full", f"--output={arch(n, 'validated')}", f"--data-dir={store}"
            ),
            fsyncs_restore=True,
            version=first_line(engram_cmd("--version"), eng_env),
            env=eng_env,
        )
    ]
    why = common.missing_tools()
    if why is None:
        tools.append(
            Tool(
                "tar",
                "tar + zstd -1",
                backup=lambda n: (
                    ["tar", "-I", TAR_ZSTD, "-cf", str(arch(n, "tar")), "-C", str(store), *files],
                    None,
                ),
                restore=lambda n, to: (["tar", "-I", "zstd", "-xf", str(arch(n, "tar"))], to),
                repo=lambda n: [arch(n, "tar")],
                unsynced_output=lambda n: arch(n, "tar"),
                version=first_line(["tar", "--version"])
                + ", "
                + first_line(["zstd", "--version"]).strip("* "),
                env=env,
            )
        )
    else:
        rep.skip("tar + zstd", why)
    why = common.missing_peer("restic", "restic")
    if why is None:

        def restic_repo(n: int) -> Path:
            return out / f"restic-{n}"

        def restic_init(n: int) -> None:
            run(["restic", "-r", str(restic_repo(n)), "init", "--repository-version", "2"], env)

        tools.append(
            Tool(
                "restic",
                "restic",
                backup=lambda n: (
                    [
                        "restic",
                        "-r",
                        str(restic_repo(n)),
                        "backup",
                        "-q",
                        "--compression",
                        "auto",
                        *files,
                    ],
                    store,
                ),
                restore=lambda n, to: (
                    [
                        "restic",
                        "-r",
                        str(restic_repo(n)),
                        "restore",
                        "latest",
                        "-q",
                        "--target",
                        str(to),
                    ],
                    None,
                ),
                repo=lambda n: [restic_repo(n)],
                init=restic_init,
                version=first_line(["restic", "version"]),
                env=env,
            )
        )
    else:
        rep.skip("restic", why)
    why = common.missing_peer("borg", "borgbackup")
    if why is None:

        def borg_repo(n: int) -> Path:
            return out / f"borg-{n}"

        def borg_init(n: int) -> None:
            run(["borg", "init", "--encryption", "none", str(borg_repo(n))], env)

        tools.append(
            Tool(
                "borg",
                "borg",
                backup=lambda n: (
                    ["borg", "create", "--compression", "zstd,1", f"{borg_repo(n)}::s", *files],
                    store,
                ),
                restore=lambda n, to: (["borg", "extract", f"{borg_repo(n)}::s"], to),
                repo=lambda n: [borg_repo(n)],
                init=borg_init,
                version=first_line(["borg", "--version"]),
                env=env,
            )
        )
    else:
        rep.skip("borg", why)
    return tools


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, str]:
    """Run ``cmd``; its wall time and stdout. A failure raises with its stderr."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return dt, r.stdout


def tree_digest(root: Path, files: list[str]) -> dict[str, str]:
    """sha256 of every regular file under ``files`` of ``root``, by relative path."""
    out: dict[str, str] = {}
    for top in files:
        base = root / top
        paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in paths:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[str(p.relative_to(root))] = h.hexdigest()
    return out


def path_bytes(paths: list[Path]) -> int:
    return sum(
        common.dir_bytes(p) if p.is_dir() else (p.stat().st_size if p.exists() else 0)
        for p in paths
    )


def read_all(root: Path) -> None:
    """Read every file of the store once (the op log too, which engram reads when it opens the
    data dir), so that every round, and the first tool, finds them in the page cache."""
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass


# -- the rounds -----------------------------------------------------------------------------


def rotated(steps: list[tuple[Tool, str]], n: int) -> list[tuple[Tool, str]]:
    k = n % len(steps)
    return steps[k:] + steps[:k]


def one_round(
    rep: Report,
    n: int,
    tools: list[Tool],
    work: Path,
    files: list[str],
    source: dict[str, str],
    before_ready: bool,
) -> None:
    for t in tools:
        t.init(n)
    eng = tools[0]
    # Backups: engram's two variants take their turns among the peers.
    steps: list[tuple[Tool, str]] = [(t, "backup") for t in tools]
    steps.insert(1, (eng, "backup_validated"))
    done = []
    for t, step in rotated(steps, n):
        os.sync()  # untimed: no step pays for the writeback of the one before
        if step == "backup_validated":
            assert t.backup_validated is not None
            dt, _ = run(t.backup_validated(n), t.env)
        else:
            cmd, cwd = t.backup(n)
            dt, _ = run(cmd, t.env, cwd)
        t.add(step, dt)
        done.append(f"{t.key}{' (validated)' if step == 'backup_validated' else ''} {dt:.2f} s")
        if step == "backup" and t.unsynced_output is not None:
            t0 = time.perf_counter()
            fd = os.open(t.unsynced_output(n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            t.add("backup_synced", dt + time.perf_counter() - t0)
    rep.info(f"round {n + 1}: backups: {', '.join(done)}")
    for t in tools:
        t.add("repo_bytes", path_bytes(t.repo(n)))
    # Restores, each into a new directory.
    steps = [(t, "restore") for t in tools]
    if before_ready:
        steps.insert(1, (eng, "restore_before_ready"))
    done = []
    for t, step in rotated(steps, n):
        to = work / f"restored-{t.key}-{step}-{n}"
        os.sync()
        cmd, cwd = t.restore(n, to)
        if step == "restore_before_ready":
            cmd = [*cmd, "--verify=before-ready"]
        if cwd is not None:
            cwd.mkdir()
        dt, out = run(cmd, t.env, cwd)
        t.add(step, dt)
        text = f"{t.key}{' --verify=before-ready' if step != 'restore' else ''} {dt:.2f} s"
        if not t.fsyncs_restore:
            t0 = time.perf_counter()
            common.fsync_tree(to)
            synced = dt + time.perf_counter() - t0
            t.add("restore_synced", synced)
            text += f" (+fsync {synced:.2f} s)"
        done.append(text)
        if n == 0 and t.key == "engram":
            rep.info(f"`engram restore` said ({step}):")
            for line in out.strip().splitlines():
                rep.info(f"  | {line}")
            rep.check(
                (to / "warm" / "engram.db").is_file() and (to / "identity.json").is_file(),
                f"engram restore must leave a data dir in {to}",
            )
        elif n == 0:
            rep.check(
                tree_digest(to, files) == source,
                f"{t.label} must restore every file of the store byte for byte into {to}",
            )
        shutil.rmtree(to)
    rep.info(f"round {n + 1}: restores: {', '.join(done)}")
    for t in tools:
        for p in t.repo(n):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for p in (work / "out").glob(f"*-{n}.tar.zst*"):
        p.unlink()


def restore_has_before_ready(env: dict[str, str]) -> bool:
    """Whether the engram being measured has ``restore --verify=before-ready``."""
    r = subprocess.run(engram_cmd("restore", "--help"), capture_output=True, text=True, env=env)
    return "--verify" in r.stdout


# -- report ---------------------------------------------------------------------------------


def ratio(base: Tool, base_step: str, other: Tool, other_step: str) -> float | None:
    """Median over the rounds of other's time / base's time (>= 1: base is as fast or
    faster)."""
    a, b = base.per_round.get(base_step), other.per_round.get(other_step)
    if not a or not b:
        return None
    return median([y / x for x, y in zip(a, b, strict=True) if x > 0])


def report(rep: Report, tools: list[Tool], payload: int, start_s: float) -> None:
    eng = tools[0]
    by = {t.key: t for t in tools}
    rep.section("medians (wall time of each CLI command)")

    def cell(t: Tool, step: str, fmt: Callable[[float], str] = lambda v: f"{v:.2f} s") -> str:
        v = t.med(step)
        return fmt(v) if v is not None else "–"

    rows = [
        ("full backup of the stopped dir", "backup"),
        ("  + fsync of its archive (tar leaves it to writeback)", "backup_synced"),
        ("engram backup with its default validation", "backup_validated"),
        ("restore to a new dir", "restore"),
        ("  + fsync of every restored file (engram fsyncs its own)", "restore_synced"),
        ("restore --verify=before-ready", "restore_before_ready"),
    ]
    head = ["step", *(t.label for t in tools)]
    table = [head, ["---"] * len(head)]
    for name, step in rows:
        if any(t.per_round.get(step) for t in tools):
            table.append([name, *(cell(t, step) for t in tools)])
    table.append(["repository size", *(cell(t, "repo_bytes", lambda v: mb(v)) for t in tools)])
    table.append(
        [
            "restore rate (input bytes / wall)",
            *(cell(t, "restore", lambda v: f"{payload / v / 1e6:,.0f} MB/s") for t in tools),
        ]
    )
    table.append(
        [
            "100 GB at that rate",
            *(cell(t, "restore", lambda v: f"{GB100 / (payload / v) / 60:.1f} min") for t in tools),
        ]
    )
    for row in table:
        rep.info("| " + " | ".join(row) + " |")
    rep.figures["medians"] = {
        t.key: {k: median(v) for k, v in t.per_round.items()} | {"version": t.version}
        for t in tools
    }
    rep.figures["rounds"] = {t.key: t.per_round for t in tools}

    rep.section("ratios (per round, median; >= 1x means engram took no longer)")
    for t in tools[1:]:
        parts = [f"backup {ratio(eng, 'backup', t, 'backup'):.2f}x"]
        if t.per_round.get("backup_synced"):
            parts.append(f"backup + fsync {ratio(eng, 'backup', t, 'backup_synced'):.2f}x")
        parts.append(f"restore {ratio(eng, 'restore', t, 'restore'):.2f}x")
        if t.per_round.get("restore_synced"):
            parts.append(f"restore + fsync {ratio(eng, 'restore', t, 'restore_synced'):.2f}x")
        rep.figure(f"ratio_{t.key}", parts, f"vs {t.label}: {', '.join(parts)}")

    restore_s = eng.med("restore")
    assert restore_s is not None
    rate = payload / restore_s
    minutes = GB100 / rate / 60
    net = max(restore_s - start_s, 1e-9)
    rep.figure(
        "extrapolated_100gb",
        {"rate_mb_s": rate / 1e6, "minutes": minutes, "cli_start_s": start_s},
        f"engram restore: {mb(payload)} in {restore_s:.2f} s = {rate / 1e6:,.0f} MB/s -> "
        f"100 GB in {minutes:.1f} min (without the CLI's start, {start_s:.2f} s, which does "
        f"not grow with the data: {GB100 / (payload / net) / 60:.1f} min)",
    )

    rep.section("goals (issue 11)")
    for key, label in (("restic", "restic restore"), ("borg", "borg extract")):
        t = by.get(key)
        rep.goal(
            f"restore to ready vs {label} (wall, CLI)",
            ">=",
            1.0,
            ratio(eng, "restore", t, "restore") if t else None,
            "x",
            note="" if t else f"{key} is not installed: make bench-deps",
        )
    borg = by.get("borg")
    rep.goal(
        "full backup without validation vs borg create (wall, CLI)",
        ">=",
        1.0,
        ratio(eng, "backup", borg, "backup") if borg else None,
        "x",
        note="" if borg else "borg is not installed: make bench-deps",
    )
    rep.goal(
        "engram backup with its default validation vs borg create (wall, CLI)",
        "<=",
        2.0,
        ratio(borg, "backup", eng, "backup_validated") if borg else None,
        "x",
        note="" if borg else "borg is not installed: make bench-deps",
    )
    rep.goal(
        "engram backup with its default validation vs --no-validate (wall, CLI)",
        "<=",
        2.0,
        ratio(eng, "backup", eng, "backup_validated"),
        "x",
    )
    rep.goal("extrapolated restore of 100 GB of warm tier", "<=", 10, minutes, " min")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rep = Report("bench_peers")
    print(f"bench_peers on {common.machine()}{' (quick)' if args.quick else ''}")
    rep.figure("load_start", os.getloadavg(), f"at the start: {common.load()}")
    with common.workdir(args, "engram-bench-peers-") as work:
        rep.section(f"building the store (~{args.mb:g} MB warm tier)")
        st = common.build_store(work / "store", int(args.mb * 1e6))
        store = st.root
        files = ["identity.json", "warm"] + (["cold"] if (store / "cold").exists() else [])
        payload = sum(
            common.dir_bytes(store / f) if (store / f).is_dir() else (store / f).stat().st_size
            for f in files
        )
        rep.figure(
            "store",
            {
                "memories": st.memories,
                "warm_bytes": common.warm_bytes(store),
                "oplog_bytes": common.dir_bytes(store / "oplog"),
                "input_bytes": payload,
                "build_s": st.build_s,
            },
            f"{st.describe()}; op log {mb(common.dir_bytes(store / 'oplog'))}; every tool backs "
            f"up {', '.join(files)} ({mb(payload)}; the op log is in no archive after a "
            "checkpoint)",
        )
        tools = make_tools(store, work, files, rep)
        before_ready = restore_has_before_ready(tools[0].env)
        rep.section("tools")
        for t in tools:
            rep.info(f"{t.label}: {t.version}")
        rep.info(
            "engram fsyncs its archive and every restored file; restic and borg fsync their "
            "repositories but not what they restore; tar fsyncs nothing: those get a second "
            "figure with an fsync of what they wrote"
        )
        rep.info(
            "warm cache: every file of the store is read once before the first round and no cache "
            "is dropped (that needs root and slows every other user of the machine), so every "
            "tool reads its input from the page cache; a sync before each step (untimed) "
            "leaves no step the writeback of the one before; engram's bytecode is compiled "
            "once, before the rounds, as pip does when it installs engram"
        )
        start = [run(engram_cmd("--version"), tools[0].env)[0] for _ in range(3)]
        start_s = median(start)
        rep.figure("cli_start_s", start, f"engram --version (the CLI's start): {start_s:.2f} s")
        source = tree_digest(store, files)
        read_all(store)
        rep.section(f"{args.rounds} round(s), the order rotated each round")
        try:
            for n in range(args.rounds):
                one_round(rep, n, tools, work, files, source, before_ready)
        except RuntimeError as e:  # a command failed: no figure of this run means anything
            rep.check(False, str(e))
        else:
            report(rep, tools, payload, start_s)
    rep.figure("load_end", os.getloadavg(), f"at the end: {common.load()}")
    rc = rep.summary()
    rep.write_json(args.json_out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
