"""Operating a data dir: quiesce, resume, status, verify, benchmark, test."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from engram.cli.common import DEFAULT_DATA_DIR as _DD
from engram.cli.common import (
    AdminTokenFile,
    CaCert,
    DataDir,
    Json,
    TokenFile,
    backend,
    console,
    emit_json,
    parse_duration,
    plural,
    resolve_token,
)
from engram.errors import EngramError, Refused


def quiesce(
    timeout: Annotated[
        str, typer.Option("--timeout", help="Lift the pause by itself after this long (3m, 90s).")
    ] = "3m",
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    admin_token_file: AdminTokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Pause writes on the running server (503 + Retry-After) after a checkpoint."""
    seconds = parse_duration(timeout, "--timeout")
    with backend(data_dir, token_file, admin_token_file=admin_token_file, cacert=cacert) as b:
        st = b.quiesce(seconds)
    if as_json:
        emit_json(st)
    else:
        console().print(
            f"writes paused at LSN {st['lsn']} (checkpointed); they resume at {st['until']} "
            "or with `engram resume`",
            markup=False,
        )


def resume(
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    admin_token_file: AdminTokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Let the running server take writes again."""
    with backend(data_dir, token_file, admin_token_file=admin_token_file, cacert=cacert) as b:
        st = b.resume()
    if as_json:
        emit_json(st)
    else:
        was = "resumed" if st.get("was_quiesced") else "was not paused; nothing to resume"
        console().print(f"writes {was} (LSN {st['lsn']})", markup=False)


def status(
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    admin_token_file: AdminTokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """What the data dir (or its server) is doing: the last write's LSN, how many memories
    and edges, each storage tier, whether writes are paused, health."""
    with backend(data_dir, token_file, admin_token_file=admin_token_file, cacert=cacert) as b:
        st = b.status()
    if as_json:
        emit_json(st)
        return
    con = console()
    server = st.get("server")
    con.print(f"data dir   {st['data_dir']}", markup=False)
    where = f"{server['url']} (pid {server['pid']})" if server else "none (opened directly)"
    con.print(f"server     {where}", markup=False)
    con.print(f"database   {st['database_id']}", markup=False)
    con.print(
        f"lsn        {st['lsn']} (warm tier checkpointed at {st['tiers']['warm']['applied_lsn']})",
        markup=False,
    )
    con.print(
        f"graph      {plural(st['memories'], 'memory')}, {plural(st['edges'], 'edge')}",
        markup=False,
    )
    fast = st["tiers"]["fast"]
    con.print(
        f"fast tier  {plural(fast['memories'], 'memory')}, "
        f"{fast['bytes']} of {fast['budget_bytes']} bytes, {fast['dirty']} dirty",
        markup=False,
    )
    q = st["quiesce"]
    con.print(
        f"writes     {'PAUSED until ' + q['until'] if q['quiesced'] else 'accepted'}", markup=False
    )
    if st.get("failed"):
        con.print(f"FAILED     {st['failed']}", markup=False)
    v = st.get("verification")
    if v:  # a restore's digest check: pending, verifying, verified or failed
        said = "FAILED: " + str(v["reason"]) if v["state"] == "failed" else v["state"]
        con.print(f"verify     {said} (restored from {v['backup']}, LSN {v['lsn']})", markup=False)
    con.print(f"durability {st['durability']}; digest {st['digest']}", markup=False)


def verify(
    data_dir: DataDir = _DD,
    check_all: Annotated[
        bool, typer.Option("--check-all", help="SQLite integrity_check instead of quick_check.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Check a data dir: its SQLite files, edges, strengths, archived memories, the log's
    checksums and LSN order, and the graph's digest."""
    from engram.backup.verify import render_text, verify_data_dir

    rep = verify_data_dir(Path(data_dir), check_all=check_all)
    done = None
    if rep.ok and check_all and not rep.live:  # a restore's pending check, now done
        from engram.verifying import complete_by_verify

        done = complete_by_verify(Path(data_dir), rep.applied_lsn, rep.digest_recomputed)
    if as_json:
        emit_json(rep.to_dict() | {"pending_check_done": done is not None})
    else:
        console().print(render_text(rep), markup=False)
        if done:
            console().print(done, markup=False)
    if not rep.ok:
        raise typer.Exit(1)


def rebuild_index(data_dir: DataDir = _DD, as_json: Json = False) -> None:
    """Rebuild the full-text index of a stopped data dir from its rows (what verify names)."""
    from engram.backup.verify import rebuild_index as do_rebuild

    res = do_rebuild(Path(data_dir))
    if as_json:
        emit_json(res.to_dict())
        return
    was = f"it did not match them: {res.problem}" if res.problem else "it matched them already"
    console().print(
        f"rebuilt the full-text index of {res.data_dir} from "
        f"{plural(res.memories, 'memory')} ({was}); checked against the rows ({res.seconds:.2f}s)",
        markup=False,
    )


def benchmark(
    data_dir: DataDir = _DD,
    duration: Annotated[str, typer.Option("--duration", help="How long to run (10s, 1m).")] = "10s",
    as_json: Json = False,
) -> None:
    """A read benchmark on a read-only open; prints `p50: <ms>`, `p95:`, `p99:`, `ops/s:`."""
    from engram.backup.readbench import render_lines, run_benchmark

    res = run_benchmark(Path(data_dir), parse_duration(duration, "--duration"))
    if as_json:
        emit_json(res.to_json())
    else:
        typer.echo(render_lines(res), nl=False)


def _smoke(url: str, token: str | None, cacert: Path | None) -> list[tuple[str, str]]:
    from engram.client import EngramClient

    steps: list[tuple[str, str]] = []
    tag = uuid.uuid4().hex[:12]
    cid = f"engram-canary-{tag}"
    word = f"canary{tag}"

    def step(name: str, fn: Any) -> Any:
        try:
            out = fn()
        except EngramError as e:
            raise EngramError(f"smoke test failed at step '{name}': {e.message}") from None
        steps.append((name, "ok"))
        return out

    with EngramClient(url, token, timeout=10, cacert=cacert) as c:

        def health() -> None:
            c.live()
            if not c.ready():
                raise EngramError("the server is not ready (GET /health/ready is not 200)")

        step("health", health)
        step("write", lambda: c.create_memory(f"engram smoke test {word}", id=cid))
        got = step("read", lambda: c.get_memory(cid))
        if got.get("content") != f"engram smoke test {word}":
            raise EngramError("smoke test failed at step 'read': the canary came back different")
        hits = step("recall", lambda: c.recall(word, 5))
        if not any(r.get("id") == cid for r in hits.get("results", [])):
            raise EngramError("smoke test failed at step 'recall': the canary was not recalled")
        step("delete", lambda: c.delete_memory(cid))
    return steps


def test(
    quick: Annotated[
        bool, typer.Option("--quick", help="The smoke test (the only test there is now).")
    ] = True,
    url: Annotated[
        str | None, typer.Option("--url", help="Server URL; default: the one in engram.lock.")
    ] = None,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Smoke-test the running server: health, write a canary, read, recall, delete it."""
    from engram.datadir import read_owner

    if url is None:
        owner = read_owner(Path(data_dir))
        if not owner or not owner.get("url"):
            raise Refused(f"no engram server is running on {data_dir}; start one, or give --url")
        url = owner["url"]
    steps = _smoke(url, resolve_token(token_file), cacert)
    if as_json:
        emit_json({"ok": True, "url": url, "steps": [s for s, _ in steps]})
    else:
        console().print(
            f"smoke test of {url}: " + ", ".join(s for s, _ in steps) + " — PASS", markup=False
        )


def register(app: typer.Typer) -> None:
    app.command("quiesce")(quiesce)
    app.command("resume")(resume)
    app.command("status")(status)
    app.command("verify")(verify)
    app.command("rebuild-index")(rebuild_index)
    app.command("benchmark")(benchmark)
    app.command("test")(test)
