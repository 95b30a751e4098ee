"""Commands that read the graph: query, neighbors, recall, stats."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from engram.cli.common import DEFAULT_DATA_DIR as _DD
from engram.cli.common import CaCert, DataDir, Json, TokenFile, backend, console, emit_json


class Direction(StrEnum):
    out = "out"
    in_ = "in"
    both = "both"


def _short(text: str, width: int = 60) -> Text:
    one = " ".join(text.split())
    return Text(one if len(one) <= width else one[: width - 1] + "…")


def _kv(rows: list[tuple[str, Any]]) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v if isinstance(v, Text) else Text("" if v is None else str(v)))
    return t


def query(
    id: Annotated[str, typer.Option("--id", help="Memory id.")],
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Print one memory (exit 1 when it does not exist)."""
    with backend(data_dir, token_file, cacert=cacert) as b:
        m = b.memory(id)
    if as_json:
        emit_json(m)
        return
    eff = m.get("effective_strength")
    console().print(
        _kv(
            [
                ("id", m["id"]),
                ("content", Text(m["content"])),
                ("strength", f"{m['strength']:.4f}"),
                ("effective", "" if eff is None else f"{eff:.4f}"),
                ("metadata", json.dumps(m["metadata"], ensure_ascii=False)),
                ("created_at", m["created_at"]),
                ("updated_at", m["updated_at"]),
                ("last_activated", m.get("last_activated_at") or "never"),
                ("activations", m["activation_count"]),
            ]
        )
    )


def neighbors(
    id: Annotated[str, typer.Option("--id", help="Memory id to start from.")],
    direction: Annotated[
        Direction, typer.Option("--direction", help="Follow edges out of, into, or both ways.")
    ] = Direction.both,
    depth: Annotated[int, typer.Option("--depth", min=1, max=3, help="Hops, 1 to 3.")] = 1,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """List the memories reachable from a memory within DEPTH hops."""
    with backend(data_dir, token_file, cacert=cacert) as b:
        found = b.neighbors(id, direction.value, depth)
    if as_json:
        emit_json({"id": id, "neighbors": found})
        return
    if not found:
        console().print(f"{id} has no neighbors ({direction.value}, depth {depth})", markup=False)
        return
    t = Table("depth", "edge", "kind", "weight", "id", "strength", "content")
    for n in found:
        e, m = n["edge"], n["memory"]
        arrow = f"{e['src']} -> {e['dst']}"
        t.add_row(
            str(n["depth"]),
            Text(arrow),
            Text(e["kind"]),
            f"{e['weight']:g}",
            Text(m["id"]),
            f"{m.get('effective_strength', m['strength']):.3f}",
            _short(m["content"]),
        )
    console().print(t)


def recall(
    query: Annotated[str, typer.Argument(help="Words to look for.")],
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=1000, help="Results, 1 to 1000.")
    ] = 10,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Full-text recall ranked by strength, with one step of spreading activation."""
    with backend(data_dir, token_file, cacert=cacert) as b:
        results = b.recall(query, limit)
    if as_json:
        emit_json({"query": query, "results": results})
        return
    if not results:
        console().print(f"nothing matches {query!r}", markup=False)
        return
    t = Table("score", "id", "strength", "match", "content")
    for r in results:
        t.add_row(
            f"{r['score']:.4g}",
            Text(r["id"]),
            f"{r.get('effective_strength', r['strength']):.3f}",
            "text" if r.get("matched") else "linked",
            _short(r["content"]),
        )
    console().print(t)


def stats(
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """How many memories and edges, the last write's LSN (log sequence number), the graph's
    digest and what each storage tier (memory, disk, archive) holds."""
    with backend(data_dir, token_file, cacert=cacert) as b:
        s = b.stats()
        where = b.where
    if as_json:
        emit_json(s)
        return
    rows: list[tuple[str, Any]] = [
        ("database", s.get("database_id")),
        ("via", where),
        ("memories", s["memories"]),
        ("edges", s["edges"]),
        ("lsn", s["lsn"]),
        ("digest", s["digest"]),
    ]
    for tier, info in (s.get("tiers") or {}).items():
        if isinstance(info, dict):
            detail = ", ".join(f"{k} {v}" for k, v in info.items())
            rows.append((f"{tier} tier", detail))
    console().print(_kv(rows))


def register(app: typer.Typer) -> None:
    for fn in (query, neighbors, recall, stats):
        app.command(fn.__name__)(fn)
