"""``engram init``: create a data directory (or confirm an existing one)."""

from __future__ import annotations

import typer

from engram.cli.common import DEFAULT_DATA_DIR as _DD
from engram.cli.common import CaCert, DataDir, Json, TokenFile, backend, console, emit_json
from engram.datadir import is_initialized, read_identity


def init(
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Create an engram data directory; prints its database id. Safe to repeat."""
    created = not is_initialized(data_dir)
    if created:
        # Opening for writing lays out the directory, creates the warm tier and the first log
        # segment, and refuses a non-empty directory that is not engram's.
        with backend(data_dir, token_file, create=True, cacert=cacert):
            pass
    ident = read_identity(data_dir)
    out = {
        "data_dir": str(data_dir),
        "database_id": ident.database_id,
        "created": created,
        "format_version": ident.format_version,
    }
    if as_json:
        emit_json(out)
        return
    verb = "created" if created else "already initialized:"
    console().print(f"{verb} {data_dir}\ndatabase id {ident.database_id}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
