"""``engram backups``: the backups of a repository (a backup directory), one line each.

One call into ``engram.backup.repository`` and a rendering of its listing; no archive is opened
beyond its header.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from engram.cli.common import (
    Json,
    S3Options,
    console,
    emit_json,
    is_url,
    plural,
    repository_location,
    s3_options,
    size_text,
)

Repo = Annotated[
    str,
    typer.Option("--repo", help="The backup directory (repository), or s3://BUCKET/PREFIX/."),
]

_COLUMNS = (
    "ID",
    "KIND",
    "HISTORY",
    "LSN",
    "TIME (UTC)",
    "SIZE",
    "PARENT",
    "VALIDATION",
    "AGE",
    "FLAGS",
)


def _time(ns: int | None) -> str:
    if not ns:
        return "-"
    from engram.model import ns_to_iso

    return ns_to_iso(ns)[:19].replace("T", " ")


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit}" if s >= 10 * n else f"{s / n:.1f}{unit}"
    return f"{s:.0f}s"


@s3_options()
def backups(repo: Repo, as_json: Json = False, *, s3: S3Options) -> None:
    """List every backup of a repository: what it covers, its validation, what is wrong."""
    from engram.backup.repository import age_s, choose_fulls, list_backups

    if not is_url(repo) and not Path(repo).is_dir():
        from engram.errors import UsageError

        raise UsageError(f"{repo} is not a directory; give the backup directory with --repo")
    listing = list_backups(repository_location(repo, s3))
    listing.check_is_repository()
    if as_json:
        emit_json(listing.to_json())
        return
    con = console()
    rows = [_COLUMNS]
    for b in listing.backups:
        first = b.from_lsn or 1
        if b.to_lsn is None:
            lsn = "-"
        elif first > b.to_lsn:  # an incremental that holds no record
            lsn = "none"
        else:
            lsn = f"{first}..{b.to_lsn}"
        when = _time(b.to_time_ns)
        if b.kind == "incremental" and b.from_time_ns:
            when = f"{_time(b.from_time_ns)} .. {when}"
        rows.append(
            (
                b.name,
                f"{b.kind} (age)" if b.encrypted else b.kind,
                (b.history or "-")[:8],
                lsn,
                when,
                "-" if b.size is None else size_text(b.size),
                b.parent or "-",
                b.validation,
                _age(age_s(b, listing.now_ns)),
                ", ".join(b.flags),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    # One write: a thousand lines through the console, one by one, take longer than the listing.
    sys.stdout.write("\n".join(lines) + "\n")
    fulls = sum(1 for b in listing.backups if b.kind == "full")
    flagged = [b for b in listing.backups if b.problem is not None or not b.usable]
    incrementals = len(listing.backups) - fulls
    con.print(
        f"{plural(len(listing.backups), 'backup')} in {listing.repository}: {fulls} full, "
        f"{plural(incrementals, 'incremental')}; {len(flagged)} not usable",
        markup=False,
    )
    for b in flagged:
        con.print(f"  {b.name}: {b.why_not()}", markup=False)
    choice = choose_fulls(listing)
    latest = choice.candidates[0].name if choice.candidates else "none"
    con.print(f"newest usable full backup (restore --latest): {latest}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("backups")(backups)
