"""``engram push``, ``pull`` and ``sync``: copies of backups between repositories, a directory
or an ``s3://BUCKET/PREFIX/`` (``engram.backup.offsite`` does the work; this renders it)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from engram.cli.common import (
    Json,
    S3Options,
    emit_json,
    is_url,
    plural,
    progress_bar,
    s3_options,
    size_text,
)
from engram.cli.crypt import (
    EncryptTo,
    Identity,
    RecipientsFile,
    encrypting_store,
    identities,
    pull_decrypted,
    recipients,
)

if TYPE_CHECKING:
    from engram.backup.offsite import Copied, SyncReport
    from engram.storage import BackupStore, Ref

DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Say what would be copied, and copy nothing.")
]


def _store(text: str, s3: S3Options) -> BackupStore:
    """A repository named on the command line: a directory, or the store of an s3:// URL."""
    if is_url(text):
        from engram.cloud import open_store

        return open_store(text, **s3.open_args())
    from engram.storage import LocalBackupStore

    return LocalBackupStore(Path(text))


def _backup(text: str, s3: S3Options) -> Ref:
    """A backup named on the command line: a file, or the object of an s3:// URL."""
    if is_url(text):
        from engram.cloud import open_ref

        return open_ref(text, **s3.open_args())
    from engram.storage import as_ref

    return as_ref(Path(text))


def _progress(
    bar: Callable[[int, int], None] | None,
) -> Callable[[str, int, int], None] | None:
    """The bytes of the backup being copied, on a terminal's progress bar."""
    if bar is None:
        return None
    return lambda _name, done, total: bar(done, total)


def _line(c: Copied, dst: BackupStore) -> str:
    from engram.backup import offsite as o

    where = dst.describe(c.name)
    if c.action == o.COPIED:
        return f"copied {c.source} -> {where} ({size_text(c.size)}, sha256 {c.sha256[:16]}…)"
    if c.action == o.COMPLETED:
        added = ", ".join(n.rsplit("/", 1)[-1] for n in c.created)
        return f"completed {where}: the file was there; added {added}"
    if c.action == o.ENTRY_UPDATED:
        return f"entry updated {where}: {c.note}"
    if c.action == o.PRESENT:
        kept = f" ({c.note})" if c.note else ""
        return f"already there: {where} holds the same bytes{kept}"
    return f"{c.action}: {c.source} -> {where}" + (f" ({c.note})" if c.note else "")


def _copies(copies: list[Copied], dst: BackupStore, as_json: bool, dry_run: bool) -> None:
    if as_json:
        emit_json(
            {
                "destination": dst.describe(),
                "dry_run": dry_run,
                "backups": [c.to_json() for c in copies],
            }
        )


@s3_options(writes=True)
def push(
    files: Annotated[
        list[str],
        typer.Argument(
            help="Backups to copy: files, or s3:// URLs of backups.", show_default=False
        ),
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to", help="The repository to copy them to: s3://BUCKET/PREFIX/ or a directory."
        ),
    ],
    encrypt_to: EncryptTo = None,
    recipients_file: RecipientsFile = None,
    dry_run: DryRun = False,
    as_json: Json = False,
    *,
    s3: S3Options,
) -> None:
    """Copy backups with their sidecars, catalog entries and history files to a repository
    (offsite), each checked and verified against its sidecar first. The same bytes already
    there are fine; another backup under the same name is refused (exit 3)."""
    from engram.backup.offsite import push as do_push

    dst = encrypting_store(_store(to, s3), recipients(encrypt_to, recipients_file))
    on_copy = None if as_json else (lambda c: print(_line(c, dst), flush=True))
    with progress_bar("copying") as bar:
        copies = do_push(
            [_backup(f, s3) for f in files],
            dst,
            dry_run=dry_run,
            on_copy=on_copy,
            progress=_progress(bar),
        )
    _copies(copies, dst, as_json, dry_run)


@s3_options()
def pull(
    source: Annotated[str, typer.Argument(help="The backup: s3://BUCKET/PREFIX/NAME (or a file).")],
    directory: Annotated[
        str, typer.Argument(help="The repository to copy it into: a directory (or s3://…/).")
    ],
    identity: Identity = None,
    dry_run: DryRun = False,
    as_json: Json = False,
    *,
    s3: S3Options,
) -> None:
    """Copy a backup with its sidecar, catalog entry and history files from a repository
    (offsite) into a directory, verified against its sidecar first; then restore it from there
    (`restore --from DIR/NAME` or `--repo DIR`)."""
    from engram.backup.offsite import push as do_push

    src = _backup(source, s3)
    if not dry_run and (plain := pull_decrypted(src, directory, identities(identity))):
        if as_json:
            emit_json({"source": src.describe(), "path": str(plain), "decrypted": True})
        else:
            print(f"decrypted {src.describe()} into {plain}", flush=True)
        return
    dst = _store(directory, s3)
    on_copy = None if as_json else (lambda c: print(_line(c, dst), flush=True))
    with progress_bar("copying") as bar:
        copies = do_push([src], dst, dry_run=dry_run, on_copy=on_copy, progress=_progress(bar))
    _copies(copies, dst, as_json, dry_run)


def _summary(r: SyncReport) -> str:
    from engram.backup import offsite as o

    copied = r.of(o.COPIED, o.COMPLETED, o.WOULD_COPY, o.WOULD_COMPLETE)
    updated = r.of(o.ENTRY_UPDATED, o.WOULD_UPDATE)
    present = r.of(o.PRESENT)
    if not copied and not updated:
        what = "nothing to copy" if not r.dry_run else "nothing would be copied"
        return f"{what}: {plural(len(present), 'backup')} of {r.source} already at {r.destination}"
    verb = "would copy" if r.dry_run else "copied"
    size = "" if r.dry_run else f" ({size_text(r.bytes_copied)} in {r.seconds:.1f}s)"
    return (
        f"{verb} {plural(len(copied), 'backup')}{size} from {r.source} to {r.destination}; "
        f"{plural(len(updated), 'entry', 'entries')} updated, {len(present)} already there"
    )


@s3_options(writes=True)
def sync(
    repo: Annotated[
        str,
        typer.Option(
            "--repo", help="The repository to mirror: a directory or s3://BUCKET/PREFIX/."
        ),
    ],
    to: Annotated[
        str,
        typer.Option("--to", help="Where to mirror it: s3://BUCKET/PREFIX/ or a directory."),
    ],
    encrypt_to: EncryptTo = None,
    recipients_file: RecipientsFile = None,
    dry_run: DryRun = False,
    as_json: Json = False,
    *,
    s3: S3Options,
) -> None:
    """Mirror a repository offsite: every good backup the destination lacks, fulls before
    their incrementals, each verified; newer verdicts carried over; damaged or failed ones named
    and left out. It never deletes at the destination: --delete comes with `engram prune`."""
    from engram.backup.offsite import PRESENT
    from engram.backup.offsite import sync as do_sync

    src = _store(repo, s3)
    dst = encrypting_store(_store(to, s3), recipients(encrypt_to, recipients_file))

    def on_copy(c: Copied) -> None:
        if not as_json and c.action != PRESENT:  # a backup already there is only counted
            print(_line(c, dst), flush=True)

    with progress_bar("copying") as bar:
        report = do_sync(src, dst, dry_run=dry_run, on_copy=on_copy, progress=_progress(bar))
    if as_json:
        emit_json(report.to_json())
    else:
        print(_summary(report), flush=True)
    for name, why in report.not_copied:
        print(f"not copied: {name}: {why}", file=sys.stderr, flush=True)


def register(app: typer.Typer) -> None:
    app.command("push")(push)
    app.command("pull")(pull)
    app.command("sync")(sync)
