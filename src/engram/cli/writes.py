"""Commands that change the graph: put, link, unlink, delete, activate, mark.

Each is one op through ``Backend.apply`` (or ``mark``), so it is validated, logged and applied
exactly like the same op in ``POST /v1/batch``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from engram.cli.common import DEFAULT_DATA_DIR as _DD
from engram.cli.common import (
    CaCert,
    DataDir,
    Json,
    TokenFile,
    backend,
    console,
    emit_json,
    parse_json_object,
    plural,
)

Id = Annotated[str, typer.Option("--id", help="Memory id.", show_default=False)]
Src = Annotated[str, typer.Option("--src", help="Id of the edge's source memory.")]
Dst = Annotated[str, typer.Option("--dst", help="Id of the edge's target memory.")]
Kind = Annotated[str | None, typer.Option("--kind", help="Edge kind.", show_default="related")]


def _one(data_dir: Any, token_file: Any, cacert: Any, op: dict[str, Any]) -> dict[str, Any]:
    with backend(data_dir, token_file, cacert=cacert) as b:
        res = b.apply([op])
    out = {k: v for k, v in res["results"][0].items() if k != "op"}
    out["lsn"] = res["lsn"]
    return out


def _report(out: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        emit_json(out)
    else:
        console().print(text, markup=False)


def put(
    content: Annotated[str, typer.Option("--content", help="The memory's text.")],
    id: Annotated[
        str | None, typer.Option("--id", help="Memory id.", show_default="a new UUID")
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option("--strength", help="Initial strength in [0, 1].", show_default="0.5"),
    ] = None,
    metadata: Annotated[
        str | None, typer.Option("--metadata", help="Metadata as a JSON object, e.g. '{\"k\": 1}'.")
    ] = None,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Create a memory; prints its id and the LSN of the write."""
    op: dict[str, Any] = {"op": "create_memory", "content": content}
    if id is not None:
        op["id"] = id
    if strength is not None:
        op["strength"] = strength
    md = parse_json_object(metadata, "metadata")
    if md is not None:
        op["metadata"] = md
    out = _one(data_dir, token_file, cacert, op)
    _report(out, as_json, f"created memory {out['id']} (lsn {out['lsn']})")


def link(
    src: Src,
    dst: Dst,
    kind: Kind = None,
    weight: Annotated[
        float | None, typer.Option("--weight", help="Edge weight.", show_default="1.0")
    ] = None,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Create (or re-weight) the edge SRC -> DST of a kind; both memories must exist."""
    op: dict[str, Any] = {"op": "create_edge", "src": src, "dst": dst}
    if kind is not None:
        op["kind"] = kind
    if weight is not None:
        op["weight"] = weight
    out = _one(data_dir, token_file, cacert, op)
    _report(out, as_json, f"linked {out['src']} -> {out['dst']} ({out['kind']}) (lsn {out['lsn']})")


def unlink(
    src: Src,
    dst: Dst,
    kind: Kind = None,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Delete the edge SRC -> DST of a kind."""
    op: dict[str, Any] = {"op": "delete_edge", "src": src, "dst": dst}
    if kind is not None:
        op["kind"] = kind
    out = _one(data_dir, token_file, cacert, op)
    _report(
        out, as_json, f"unlinked {out['src']} -> {out['dst']} ({out['kind']}) (lsn {out['lsn']})"
    )


def delete(
    id: Id,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Delete a memory and, in the same transaction, every edge to or from it."""
    out = _one(data_dir, token_file, cacert, {"op": "delete_memory", "id": id})
    n = out["edges_deleted"]
    text = f"deleted memory {out['id']} and {plural(n, 'edge')} (lsn {out['lsn']})"
    _report(out, as_json, text)


def activate(
    id: Id,
    boost: Annotated[
        float | None,
        typer.Option("--boost", help="Strength added after decay, in [0, 1].", show_default="0.1"),
    ] = None,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Activate a memory: decay its strength to now, then raise it by BOOST (capped at 1)."""
    op: dict[str, Any] = {"op": "activate", "id": id}
    if boost is not None:
        op["boost"] = boost
    out = _one(data_dir, token_file, cacert, op)
    _report(
        out, as_json, f"activated {out['id']}: strength {out['strength']:.4f} (lsn {out['lsn']})"
    )


def mark(
    name: Annotated[str, typer.Argument(help="Name of the restore point.")],
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Write a named restore point into the log (a target for point-in-time recovery). A name
    is used once: a name already marked is refused with the LSN and time it stands for."""
    with backend(data_dir, token_file, cacert=cacert) as b:
        out = b.mark(name)
    _report(out, as_json, f"marked {out['name']} at lsn {out['lsn']}")


def register(app: typer.Typer) -> None:
    for fn in (put, link, unlink, delete, activate, mark):
        app.command(fn.__name__)(fn)
