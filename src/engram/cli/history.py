"""``engram history``: the tree of histories of a backup repository."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engram.cli.common import (
    Json,
    S3Options,
    console,
    emit_json,
    is_url,
    repository_location,
    s3_options,
)


@s3_options()
def history(
    repo: Annotated[
        str, typer.Option("--repo", help="The backup directory, or s3://BUCKET/PREFIX/.")
    ],
    as_json: Json = False,
    *,
    s3: S3Options,
) -> None:
    """Show the histories of a backup directory: where each began and its backups."""
    from engram.backup.catalog import read_catalog
    from engram.backup.history import tree_report
    from engram.backup.repository import list_backups
    from engram.errors import UsageError

    if not is_url(repo) and not Path(repo).is_dir():
        raise UsageError(f"{repo} is not a directory; give the backup directory as --repo")
    where = repository_location(repo, s3)
    cat = read_catalog(where)
    if not cat.entries and not cat.from_files:
        list_backups(where).check_is_repository()
    report = tree_report(where, cat.entries + cat.from_files)
    report["problems"] = [p.message for p in cat.problems] + report["problems"]
    if as_json:
        emit_json(report)
        return
    con = console()
    if not report["histories"]:
        con.print(f"no backups in {repo}", markup=False)
    for h in report["histories"]:
        pad = "  " * h["depth"]
        mark = "  (newest)" if h["id"] == report["newest"] else ""
        if h["parent"] is None:
            con.print(f"{pad}{h['id']}  original history{mark}", markup=False)
        else:
            why = h["began"]["command"] + (
                f" to {h['began']['target']}" if h["began"]["target"] else ""
            )
            con.print(
                f"{pad}{h['id']}  from {h['parent']} after LSN {h['branch_lsn']} at "
                f"{h['branch_time'] or '-'}; began with {why}{mark}",
                markup=False,
            )
        for b in h["backups"]:
            if b["kind"] == "full":
                lsn = f"LSN {b['to_lsn']}"
            elif b["from_lsn"] > b["to_lsn"]:  # an incremental that holds no record
                lsn = "no records"
            else:
                lsn = f"LSN {b['from_lsn']}..{b['to_lsn']}"
            con.print(f"{pad}  {b['kind']:<11} {b['name']}  {lsn}  {b['validation']}", markup=False)
    for p in report["problems"]:
        con.print(f"warning: {p}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("history")(history)
