"""Backup and recovery commands: backup, restore, apply-log, restore-pitr, validate-backup.

Each is one call into ``engram.backup`` and a rendering of its result. ``backup`` goes through
the server when one owns the data dir (it takes the cut), and validates the new backup here
afterwards, unless ``--no-validate``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engram.cli.common import DEFAULT_DATA_DIR as _DD
from engram.cli.common import (
    AdminTokenFile,
    CaCert,
    DataDir,
    Json,
    S3Options,
    TokenFile,
    backend,
    backup_location,
    console,
    emit_json,
    is_url,
    log_location,
    lsn_range,
    object_ref,
    parse_duration,
    plural,
    progress_bar,
    repository_location,
    s3_options,
    size_text,
)
from engram.cli.crypt import (
    EncryptTo,
    Identity,
    RecipientsFile,
    ciphertext_validation,
    decrypted,
    encrypted_result,
    encrypting,
    identities,
    recipients,
)
from engram.errors import UsageError

if TYPE_CHECKING:
    from engram.storage import BackupStore, Ref

Level = Annotated[
    int,
    typer.Option(
        "--level",
        min=1,
        max=4,
        help="1 manifest and structure, 2 checksums, 3 restore + verify + digest, 4 benchmark.",
    ),
]
P50Warn = Annotated[
    float, typer.Option("--p50-warn-ms", help="Warn when the benchmark's read p50 exceeds this.")
]
TargetTime = Annotated[
    str | None,
    typer.Option(
        "--target-time",
        help="'YYYY-MM-DD HH:MM:SS[.ffffff]' in local time, or ISO 8601 with Z or an offset.",
    ),
]
TargetLsn = Annotated[int | None, typer.Option("--target-lsn", help="Stop at this LSN.")]
TargetName = Annotated[
    str | None, typer.Option("--target-name", help="Stop after this restore point (engram mark).")
]

# The singular of each count a backup reports.
_ONE = {"memories": "memory", "edges": "edge", "records": "record"}


def _validate(
    path: Path | Ref, level: int, p50_warn_ms: float, as_json: bool, priority: str = "normal"
) -> dict[str, Any]:
    """validate-backup, at idle CPU priority when ``priority`` is "low" (this thread and the
    threads and helper processes it starts): a restore test, verify and a read benchmark on a
    machine a server shares would otherwise take both cores from its writers, and their
    latency with them."""
    from engram.procs import Resources, idle_priority

    # Decided once, where the validation starts: what its checks may use, and its priority.
    resources = Resources.for_priority(priority)
    with idle_priority(resources.idle):
        # Imported here: at low priority, even loading the validation modules waits for idle CPU.
        from engram.backup.validate import validate_backup

        if as_json:
            v = validate_backup(path, level, p50_warn_ms, resources=resources).to_json()
        else:
            with console().status("validating…") as st:
                v = validate_backup(
                    path,
                    level,
                    p50_warn_ms,
                    progress=lambda s: st.update(f"validating: {s}"),
                    resources=resources,
                ).to_json()
    v["priority"] = priority
    return v


def _render_validation(v: dict[str, Any]) -> None:
    con = console()
    for step in v["steps"]:
        mark = "ok  " if step["ok"] else "FAIL"
        con.print(f"  L{step['level']} {mark} {step['name']}: {step['detail']}", markup=False)
    for w in v["warnings"]:
        con.print(f"  WARNING: {w}", markup=False)
    if v.get("priority") == "low":
        con.print("  (validated at low priority: on idle CPU only)", markup=False)
    con.print("PASS" if v["ok"] else f"FAIL: {v['reason']}", markup=False)


def _check_recorded(v: dict[str, Any] | None) -> None:
    """After the verdict is shown: a verdict that could not be kept in the catalog entry is an
    error of its own (exit 1), saying what state the entry was left in."""
    if v is not None and v.get("record_error"):
        from engram.backup.catalog import CatalogError

        raise CatalogError(v["record_error"])


@s3_options(writes=True)
def backup(
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="Archive (.tar.zst or .tar.gz) or .log path, or s3://BUCKET/PREFIX/NAME "
            "(streamed to the store, never staged locally).",
        ),
    ],
    full: Annotated[bool, typer.Option("--full", help="A full backup archive.")] = False,
    incremental: Annotated[
        bool, typer.Option("--incremental", help="The log records of a range.")
    ] = False,
    since: Annotated[
        str | None, typer.Option("--since", help="Incremental: records of the last 5m, 1h, …")
    ] = None,
    since_lsn: Annotated[
        int | None, typer.Option("--since-lsn", help="Incremental: records from this LSN on.")
    ] = None,
    no_validate: Annotated[
        bool, typer.Option("--no-validate", help="Skip validate-backup after the backup.")
    ] = False,
    priority: Annotated[
        str | None,
        typer.Option(
            "--priority",
            help="Full: low = written by a worker on idle CPU, one core (the default through a "
            "running server: writers keep their latency); normal = every core (the default "
            "for a data dir no server holds).",
            show_default=False,
        ),
    ] = None,
    cpu_share: Annotated[
        float | None,
        typer.Option(
            "--cpu-share",
            help="Full, priority low: the most of one core the worker uses while the log grows "
            "(0.05-1; default 0.25, 1 = no cap). Implies --priority=low.",
            show_default=False,
        ),
    ] = None,
    level: Level = 4,
    p50_warn_ms: P50Warn = 10.0,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    admin_token_file: AdminTokenFile = None,
    cacert: CaCert = None,
    encrypt_to: EncryptTo = None,
    recipients_file: RecipientsFile = None,
    as_json: Json = False,
    *,
    s3: S3Options,
) -> None:
    """Take a full or incremental backup, then validate it (exit 1 if validation fails)."""
    if full == incremental:
        raise UsageError("give exactly one of --full or --incremental")
    from engram.backup.request import OPTION_NAMES, BackupRequest

    kind = "full" if full else "incremental"
    req = BackupRequest(
        kind,
        output if is_url(output) else str(Path(output).absolute()),
        since_s=parse_duration(since, "--since") if since is not None else None,
        since_lsn=since_lsn,
        priority=priority,
        cpu_share=cpu_share,
    ).validate(OPTION_NAMES)
    # An s3:// output is the object of its store, written and validated there.
    where = object_ref(output, s3) if is_url(output) else None
    rcpts = recipients(encrypt_to, recipients_file)
    if rcpts:  # encrypted as it is written: this job holds only the public keys
        where = encrypting(where if where is not None else Path(output), rcpts)
    remote = backend(data_dir, token_file, admin_token_file=admin_token_file, cacert=cacert)
    with remote as b, progress_bar(f"{kind} backup") as bar:
        res = b.backup(req, None if as_json else bar, output=where)
    path: Path | Ref = where if where is not None else Path(res["path"])
    # Validation is as gentle as the backup was: low when the backup was (the default through
    # a server), and for an incremental taken through a server, which shares this machine.
    low = res.get("priority") == "low" or (res.get("priority") is None and b.remote)
    if rcpts:  # what was stored: the ciphertext's sha256 and size, and the encryption
        res = encrypted_result(res, path)
    res["validation"] = (
        None
        if no_validate
        else ciphertext_validation(path, [])
        if rcpts
        else _validate(path, level, p50_warn_ms, as_json, "low" if low else "normal")
    )
    ok = res["validation"] is None or res["validation"]["ok"]
    if as_json:
        emit_json(res)
    else:
        con = console()
        con.print(f"{kind} backup written: {res['path']} ({size_text(res['size'])})", markup=False)
        if kind == "incremental":
            lsn = lsn_range(res["from_lsn"], res["snapshot_lsn"])
            if res["from_lsn"] > res["snapshot_lsn"]:
                lsn += f": nothing was written after LSN {res['snapshot_lsn']}"
            con.print(f"  {lsn}, up to {res['snapshot_time'] or '-'}", markup=False)
        else:
            counts = ", ".join(plural(v, _ONE.get(k, k)) for k, v in res["counts"].items())
            con.print(
                f"  snapshot LSN {res['snapshot_lsn']} at {res['snapshot_time'] or '-'}; {counts}",
                markup=False,
            )
        con.print(f"  digest {res['digest']}", markup=False)
        side = str(res["sidecar"]).rsplit("/", 1)[-1]
        con.print(f"  sha256 {res['sha256']} (in {side})", markup=False)
        took = f"  took {res['duration_s']} s"
        if res.get("priority") == "low":
            share = res.get("cpu_share")
            cap = ""
            if share and share < 1:
                cap = f", at most {share:.0%} of it while the log grew"
                cap += f"; paused {res.get('paused_s') or 0:.1f} s for the writers"
            took += f" at low priority (a worker on idle CPU, one core{cap})"
        elif res.get("priority") == "normal":
            took += " at normal priority (every core)"
        con.print(took, markup=False)
        if res.get("note"):
            con.print(f"  note: {res['note']}", markup=False)
        if res["validation"] is not None:
            _render_validation(res["validation"])
    _check_recorded(res["validation"])
    if not ok:
        raise typer.Exit(1)


@s3_options()
def restore(
    to: Annotated[Path, typer.Option("--to", help="The data dir to restore into.")],
    from_: Annotated[
        str | None,
        typer.Option(
            "--from", help="The full backup archive: a path or s3://BUCKET/PREFIX/NAME."
        ),
    ] = None,
    repo: Annotated[
        str | None,
        typer.Option(
            "--repo",
            help="A backup directory or s3://BUCKET/PREFIX/: restore --latest or --backup ID.",
        ),
    ] = None,
    latest: Annotated[
        bool,
        typer.Option(
            "--latest",
            help="With --repo: the newest intact full backup (an older one when it is damaged "
            "or failed validation; says which it skipped and why).",
        ),
    ] = False,
    backup_id: Annotated[
        str | None,
        typer.Option("--backup", help="With --repo: this backup (an ID `engram backups` lists)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Move a non-empty target aside (never deleted).")
    ] = False,
    verify: Annotated[
        str,
        typer.Option(
            "--verify",
            help="auto: a backup whose validation passed is ready once every hash is checked, "
            "its digest recomputed by the next `engram serve` while it serves; before-ready: "
            "recompute the digest and check the index before the data dir is placed (what an "
            "unvalidated backup always gets).",
        ),
    ] = "auto",
    identity: Identity = None,
    as_json: Json = False,
    *,
    s3: S3Options,
) -> None:
    """Restore a full backup into a new data dir, checking every hash and the digest first
    (or, for a validated backup, leaving the digest recompute to the next server). An
    archive in S3 streams from the store into the new data dir: no local copy of it."""
    if (from_ is None) == (repo is None):
        raise UsageError("give --from ARCHIVE, or --repo DIR with --latest or --backup ID")
    if verify not in ("auto", "before-ready"):
        raise UsageError(f"--verify must be auto or before-ready, not {verify!r}")
    if repo is not None and latest == (backup_id is not None):
        raise UsageError("with --repo, give exactly one of --latest or --backup ID")
    if repo is None and (latest or backup_id is not None):
        raise UsageError("--latest and --backup choose from a repository: give --repo DIR")
    ids = identities(identity)
    con = console()
    extra: dict[str, Any] = {}
    with progress_bar("restore") as bar:
        if repo is not None:
            from engram.backup.repository import restore_from_repo

            got = restore_from_repo(
                repository_location(repo, s3),
                to,
                backup_id,
                force,
                None if as_json else bar,
                verify=verify,
                source=lambda ref: decrypted(ref, ids, near=to),
            )
            res, extra = got.result, got.to_json()
        else:
            from engram.backup.restore import restore as do_restore

            assert from_ is not None
            with decrypted(backup_location(from_, s3), ids, near=to) as src:
                res = do_restore(src, to, force, None if as_json else bar, verify)
            if ids:  # named as given, not as the decrypted copy that was read
                res.archive = str(from_)
    if as_json:
        emit_json(res.to_json() | extra)
        return
    if extra:
        con.print(f"chose {extra['backup']} in {extra['repository']}", markup=False)
        for s in extra["skipped"]:
            con.print(f"  skipped {s['name']}: {s['reason']}", markup=False)
        for n in extra["notes"]:
            con.print(f"  note: {n}", markup=False)
    con.print(f"restored {res.archive} into {res.path}", markup=False)
    con.print(
        f"  snapshot LSN {res.snapshot_lsn} at {res.snapshot_time}; "
        f"{plural(res.counts.get('memories', 0), 'memory')}, "
        f"{plural(res.counts.get('edges', 0), 'edge')}",
        markup=False,
    )
    side = "sidecar checked" if res.sidecar_checked else "sidecar absent"
    if res.verification == "deferred":
        con.print(
            f"  every hash checked; {side}; digest {res.digest} at LSN {res.snapshot_lsn}",
            markup=False,
        )
        con.print(
            f"  verification: deferred ({res.verify_why}): the next `engram serve` recomputes "
            'the digest from every row while it serves (status says "verifying"); '
            "`--verify=before-ready` does it now",
            markup=False,
        )
    else:
        con.print(f"  digest {res.digest} recomputed and equal; {side}", markup=False)
        con.print(f"  verification: before-ready ({res.verify_why})", markup=False)
    for w in res.warnings:
        con.print(f"  WARNING: {w}", markup=False)
    if res.moved_aside:
        con.print(f"  the previous contents were moved to {res.moved_aside}", markup=False)
    con.print(f"  took {res.duration_s} s", markup=False)


@s3_options()
def apply_log(
    log: Annotated[
        list[str],
        typer.Option(
            "--log",
            help="An incremental, a directory of them, or an oplog/ dir; or s3://…/NAME.log, "
            "or s3://BUCKET/PREFIX/ for every log there.",
        ),
    ],
    target_time: TargetTime = None,
    target_lsn: TargetLsn = None,
    data_dir: DataDir = _DD,
    identity: Identity = None,
    as_json: Json = False,
    *,
    s3: S3Options,
) -> None:
    """Replay logs into a stopped data dir (records already applied are skipped)."""
    from engram.backup.pitr import Target
    from engram.backup.pitr import apply_log as do_apply

    target = Target.from_options(target_time, target_lsn, None, required=False)
    logs = [log_location(x, s3) for x in log]
    ids = identities(identity)
    if ids:  # `decrypted` reads one backup: name each log of a directory or repository
        logs = [one for x in logs for one in _each_log(x)]
    with contextlib.ExitStack() as plain, progress_bar("apply-log", unit="records") as bar:
        logs = [plain.enter_context(decrypted(x, ids, near=data_dir)) for x in logs]
        res = do_apply(data_dir, logs, target, None if as_json else bar)
    if as_json:
        emit_json(res.to_json())
        return
    if res.target_note:  # a local time a clock change made ambiguous or skipped
        console().print(f"note: {res.target_note}", markup=False)
    if res.records:
        text = (
            f"applied {lsn_range(res.from_lsn, res.to_lsn)} up to {res.to_time or '-'} to "
            f"{data_dir}, {res.rate:.0f} records/s; target: {res.target}"
        )
    else:
        text = (
            f"applied 0 records to {data_dir}: nothing to apply (it is at LSN {res.to_lsn}); "
            f"target: {res.target}"
        )
    console().print(text, markup=False)


def _each_log(where: Path | Ref | BackupStore) -> list[Path | Ref | BackupStore]:
    """The logs at the top of a directory or repository, each on its own (so that each
    encrypted one is decrypted); a single log, or a place holding none, as it is."""
    from engram.storage import Ref, as_store

    if isinstance(where, Ref) or (isinstance(where, Path) and not where.is_dir()):
        return [where]
    store = as_store(where)
    names = sorted(n for n in store.list() if "/" not in n and n.endswith(".log"))
    return [Ref(store, n) for n in names] or [where]


@s3_options()
def restore_pitr(
    base_backup: Annotated[
        str | None,
        typer.Option(
            "--base-backup", help="The full backup to start from (a path or an s3:// URL)."
        ),
    ] = None,
    operation_log: Annotated[
        list[str] | None,
        typer.Option(
            "--operation-log",
            help="Log file or directory (or s3:// URL, or prefix ending in /); repeatable.",
        ),
    ] = None,
    repo: Annotated[
        str | None,
        typer.Option(
            "--repo",
            help="A backup directory or s3://BUCKET/PREFIX/: pick the base and incrementals.",
        ),
    ] = None,
    target_time: TargetTime = None,
    target_lsn: TargetLsn = None,
    target_name: TargetName = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Data dir to create.", show_default="--data-dir"),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Move a non-empty output aside (never deleted).")
    ] = False,
    history: Annotated[
        str | None,
        typer.Option(
            "--history",
            help="With --repo: follow this history (see `engram history`); default the newest.",
        ),
    ] = None,
    latest: Annotated[
        bool,
        typer.Option(
            "--latest",
            help="With --repo: recover to the last record of the history (the newest one, or "
            "--history), instead of a target.",
        ),
    ] = False,
    data_dir: DataDir = _DD,
    identity: Identity = None,
    as_json: Json = False,
    *,
    s3: S3Options,
) -> None:
    """Recover to a moment: a full backup, then the logs replayed up to the target (never
    half of a write: a batch is replayed whole or not at all)."""
    from engram.backup.pitr import Target, choose_path
    from engram.backup.pitr import restore_pitr as do_pitr
    from engram.model import ns_to_iso

    if latest and repo is None:
        raise UsageError("--latest recovers from a repository: give --repo DIR")
    target = Target.from_options(target_time, target_lsn, target_name, required=not latest)
    if latest and target.given:
        raise UsageError("give --latest or a target (--target-time, -lsn, -name), not both")
    con = console()
    if target.time_ns is not None and not as_json:
        con.print(f"target time {target_time!r} is {ns_to_iso(target.time_ns)} UTC", markup=False)
        if target.note:  # a local time a clock change made ambiguous or skipped
            con.print(f"note: {target.note}", markup=False)
    if repo is not None:
        if base_backup is not None or operation_log:
            raise UsageError("give --repo, or --base-backup with --operation-log, not both")
        chosen = choose_path(repository_location(repo, s3), target, history)
        logs: list[Path | Ref | BackupStore] = list(chosen.logs)
        base, lineage = chosen.base, chosen.lineage
        if not as_json:
            con.print(f"chose {chosen.says}", markup=False)
    else:
        if base_backup is None:
            raise UsageError("give --base-backup (and --operation-log), or --repo")
        if history is not None:
            raise UsageError("--history chooses among the histories of a --repo; give --repo")
        base = backup_location(base_backup, s3)
        logs = [log_location(x, s3) for x in operation_log or []]
        lineage = None
    out = output if output is not None else data_dir
    ids = identities(identity)
    with contextlib.ExitStack() as plain, progress_bar("replay", unit="records") as bar:
        # Encrypted backups are read from decrypted copies beside the output.
        src = plain.enter_context(decrypted(base, ids, near=out))
        srcs = [plain.enter_context(decrypted(x, ids, near=out)) for x in logs]
        res = do_pitr(src, srcs, target, out, force, None if as_json else bar, lineage=lineage)
    if as_json:
        emit_json(res.to_json())
        return
    con.print(
        f"recovered {res.output} to LSN {res.reached_lsn} ({res.reached_time or 'base'}), "
        f"target {res.target}",
        markup=False,
    )
    con.print(
        f"  base LSN {res.base_lsn}, replayed {plural(res.records, 'record')} at "
        f"{res.rate:.0f}/s; "
        f"digest {res.digest} recomputed and equal",
        markup=False,
    )
    if res.moved_aside:
        con.print(f"  the previous contents were moved to {res.moved_aside}", markup=False)
    con.print(
        f"  on history {res.history}; its first write starts a new history (`engram history`)",
        markup=False,
    )
    con.print(f"  took {res.duration_s} s", markup=False)


@s3_options()
def validate_backup(
    path: Annotated[
        str,
        typer.Argument(
            help="A full archive or an incremental .log: a path or s3://BUCKET/PREFIX/NAME."
        ),
    ],
    level: Level = 4,
    p50_warn_ms: P50Warn = 10.0,
    priority: Annotated[
        str,
        typer.Option(
            "--priority",
            help="low = only on idle CPU (for a machine a busy server shares; slower, and the "
            "read benchmark's figures then include waiting for a CPU); normal = every core.",
        ),
    ] = "normal",
    identity: Identity = None,
    as_json: Json = False,
    *,
    s3: S3Options,
) -> None:
    """Check a backup: checksums, a restore test, verify, the digest, a read benchmark."""
    from engram.backup.request import check_priority

    prio = check_priority(priority, "--priority")
    where = backup_location(path, s3)
    ids = identities(identity)
    # Without the identity an encrypted backup gets the checks of its stored bytes only.
    v = ciphertext_validation(where, ids)
    if v is None:
        with decrypted(where, ids) as src:
            v = _validate(src, level, p50_warn_ms, as_json, prio)
            v["path"] = str(path)
    if as_json:
        emit_json(v)
    else:
        _render_validation(v)
    _check_recorded(v)
    if not v["ok"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("backup")(backup)
    app.command("restore")(restore)
    app.command("apply-log")(apply_log)
    app.command("restore-pitr")(restore_pitr)
    app.command("validate-backup")(validate_backup)
