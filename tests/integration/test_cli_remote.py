"""The CLI on a data dir that a real server process owns: every command goes over HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from serverproc import ServerProcess
from typer.testing import CliRunner

from engram.cli.main import app
from engram.datadir import read_owner

runner = CliRunner()


@pytest.fixture
def start(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> Callable[..., ServerProcess]:
    """``start(token=None)``: the server of ``tmp_path / "data"``, which the CLI finds through
    its engram.lock (the token, if any, in ``tmp_path / "data.token"``)."""

    def _start(token: str | None = None) -> ServerProcess:
        return start_server(tmp_path / "data", token=token)

    return _start


def cli(*args: str, env: dict[str, str | None] | None = None) -> Any:
    return runner.invoke(app, list(args), env={"ENGRAM_TOKEN": None, **(env or {})})


def okj(*args: str, env: dict[str, str | None] | None = None) -> Any:
    res = cli(*args, "--json", env=env)
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return json.loads(res.stdout)


def one_line_error(res: Any, code: int) -> str:
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return str(lines[0])


def test_cli_goes_through_the_server(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start()
    dd = str(srv.data_dir)
    owner = read_owner(srv.data_dir)
    assert owner is not None and owner["url"] == srv.url

    out = okj("put", "--data-dir", dd, "--id", "a", "--content", "remote fox", "--strength", "0.6")
    assert out["id"] == "a"
    okj("put", "--data-dir", dd, "--id", "b/c", "--content", "slashed id")
    okj("link", "--data-dir", dd, "--src", "a", "--dst", "b/c", "--kind", "k")
    with srv.client() as h:
        got = h.get("/v1/memories/a").json()
        assert got["content"] == "remote fox" and got["strength"] == 0.6
        http_stats = h.get("/v1/stats").json()

    stats = okj("stats", "--data-dir", dd)
    for key in ("memories", "edges", "lsn", "digest", "database_id"):
        assert stats[key] == http_stats[key]
    assert (stats["memories"], stats["edges"]) == (2, 1)

    assert okj("query", "--data-dir", dd, "--id", "b/c")["content"] == "slashed id"
    nb = okj("neighbors", "--data-dir", dd, "--id", "a")
    assert [n["memory"]["id"] for n in nb["neighbors"]] == ["b/c"]
    assert [r["id"] for r in okj("recall", "--data-dir", dd, "fox")["results"]][0] == "a"
    assert okj("activate", "--data-dir", dd, "--id", "a")["strength"] > 0.6
    assert okj("mark", "--data-dir", dd, "m1")["name"] == "m1"
    assert (
        okj("unlink", "--data-dir", dd, "--src", "a", "--dst", "b/c", "--kind", "k")["kind"] == "k"
    )

    # The same failures, messages and exit codes as on a local data dir.
    msg = one_line_error(cli("query", "--data-dir", dd, "--id", "nope"), 1)
    assert "not found" in msg
    bad = cli("put", "--data-dir", dd, "--content", "x", "--strength", "1.5")
    assert "strength must be in [0, 1]" in one_line_error(bad, 2)
    assert "already exists" in one_line_error(
        cli("put", "--data-dir", dd, "--content", "x", "--id", "a"), 1
    )

    # import and export through the server; the export equals the local one after shutdown.
    f = tmp_path / "ops.jsonl"
    ops = [{"op": "create_memory", "id": f"i{n}", "content": f"imported {n}"} for n in range(5)]
    ops.append({"op": "create_edge", "src": "i0", "dst": "i4"})
    f.write_text("\n".join(json.dumps(o) for o in ops) + "\n" + "{oops\n")
    msg = one_line_error(cli("import", "--data-dir", dd, "-f", str(f), "--batch-size", "3"), 2)
    assert "line 7: not valid JSON" in msg and "6 ops before it were applied" in msg
    remote = tmp_path / "remote.jsonl"
    exported = okj("export", "--data-dir", dd, "--output", str(remote))
    assert (exported["memories"], exported["edges"]) == (7, 1)
    assert okj("delete", "--data-dir", dd, "--id", "i0")["edges_deleted"] == 1
    okj("put", "--data-dir", dd, "--id", "i0", "--content", "imported 0")
    okj("link", "--data-dir", dd, "--src", "i0", "--dst", "i4")
    final_stats = okj("stats", "--data-dir", dd)
    # The export names the state it holds; the recreated i0 is a new memory (new times).
    remote_final = tmp_path / "remote-final.jsonl"
    exported = okj("export", "--data-dir", dd, "--output", str(remote_final))
    assert (exported["lsn"], exported["digest"]) == (final_stats["lsn"], final_stats["digest"])
    assert remote_final.read_bytes() != remote.read_bytes()

    srv.stop()
    assert read_owner(srv.data_dir) is None
    local = tmp_path / "local.jsonl"
    okj("export", "--data-dir", dd, "--output", str(local))
    assert (
        hashlib.sha256(local.read_bytes()).digest()
        == hashlib.sha256(remote_final.read_bytes()).digest()
    )
    after = okj("stats", "--data-dir", dd)
    assert (after["lsn"], after["digest"]) == (final_stats["lsn"], final_stats["digest"])


def test_token_is_required_and_taken_from_file_or_env(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start(token="t0ps3cret")
    dd = str(srv.data_dir)
    msg = one_line_error(cli("stats", "--data-dir", dd), 1)
    assert srv.url in msg and "--token-file" in msg
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    msg = one_line_error(cli("stats", "--data-dir", dd, "--token-file", str(wrong)), 1)
    assert "check the token" in msg

    tf = tmp_path / "data.token"  # written by the server fixture
    out = okj("put", "--data-dir", dd, "--id", "t", "--content", "x", "--token-file", str(tf))
    assert out["id"] == "t"
    stats = okj("stats", "--data-dir", dd, env={"ENGRAM_TOKEN": "t0ps3cret"})
    with srv.client() as h:
        assert h.get("/v1/stats").json()["digest"] == stats["digest"]


def test_entry_point_process_exit_codes(start: Callable[..., ServerProcess]) -> None:
    srv = start()
    base = [sys.executable, "-m", "engram.cli"]
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    env["ENGRAM_DATA_DIR"] = str(srv.data_dir)
    put = subprocess.run(
        [*base, "put", "--content", "from a process", "--json"], capture_output=True, env=env
    )
    assert put.returncode == 0, put.stderr
    mid = json.loads(put.stdout)["id"]
    with srv.client() as h:
        assert h.get(f"/v1/memories/{mid}").json()["content"] == "from a process"
    missing = subprocess.run([*base, "query", "--id", "nope"], capture_output=True, env=env)
    assert missing.returncode == 1
    lines = missing.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not found" in lines[0]
    usage = subprocess.run([*base, "put", "--strength", "x"], capture_output=True, env=env)
    assert usage.returncode == 2 and b"Traceback" not in usage.stderr
