"""What a new user hit (issue 10, item 4): write commands on a directory that is not a data dir,
the exit-code table (refusals because of state exit 3), a closed stdout pipe, --version and
shell completion, and the HTTP API's batch index and Authorization scheme."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from engram import __version__
from engram.cli.main import app
from engram.errors import NotInitialized, Refused
from engram.graph import Engine
from engram.server.routes import create_app

runner = CliRunner()
ENGRAM = [sys.executable, "-m", "engram.cli"]


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


WRITES = [
    ("put", "--content", "x"),
    ("link", "--src", "a", "--dst", "b"),
    ("unlink", "--src", "a", "--dst", "b"),
    ("delete", "--id", "a"),
    ("activate", "--id", "a"),
    ("mark", "m"),
    ("import", "--file", "OPS"),
]


@pytest.mark.parametrize("args", WRITES, ids=[w[0] for w in WRITES])
@pytest.mark.parametrize("where", ["missing", "empty", "foreign"])
def test_a_write_on_a_directory_that_is_not_a_data_dir_creates_nothing(
    tmp_path: Path, args: tuple[str, ...], where: str
) -> None:
    ops = tmp_path / "ops.jsonl"
    ops.write_text('{"op": "create_memory", "id": "a", "content": "x"}\n')
    dd = tmp_path / "data"
    if where != "missing":
        dd.mkdir()
    if where == "foreign":
        (dd / "notes.txt").write_text("mine\n")
    before = sorted(p.name for p in dd.iterdir()) if dd.exists() else None
    res = cli(*[str(ops) if a == "OPS" else a for a in args], "--data-dir", str(dd))
    assert res.exit_code == NotInitialized.exit_code == 3, (res.stdout, res.stderr)
    line = res.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line
    assert "not an engram data dir" in line and f"engram init --data-dir {dd}" in line
    after = sorted(p.name for p in dd.iterdir()) if dd.exists() else None
    assert after == before


def test_serve_still_initializes_an_empty_or_missing_directory(tmp_path: Path) -> None:
    # `engram serve` opens its data dir with Engine.open's default: create it when empty.
    for dd in (tmp_path / "missing", tmp_path / "empty"):
        if dd.name == "empty":
            dd.mkdir()
        Engine.open(dd).close()
        assert (dd / "identity.json").is_file()


def test_refusals_because_of_state_exit_3(tmp_path: Path) -> None:
    dd = tmp_path / "data"
    assert cli("init", "--data-dir", str(dd)).exit_code == 0
    assert cli("put", "--data-dir", str(dd), "--content", "x", "--id", "a").exit_code == 0
    # no server to quiesce
    res = cli("quiesce", "--timeout=2s", "--data-dir", str(dd))
    assert res.exit_code == Refused.exit_code == 3 and "no engram server" in res.stderr
    # an export name that exists
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    res = cli("export", "--data-dir", str(dd), "-o", str(out))
    assert res.exit_code == 3 and "already exists" in res.stderr
    # a backup name that exists
    bk = tmp_path / "full.tar.zst"
    bk.write_bytes(b"earlier")
    res = cli("backup", "--full", f"--output={bk}", "--data-dir", str(dd), "--no-validate")
    assert res.exit_code == 3 and "already exists" in res.stderr
    assert bk.read_bytes() == b"earlier"
    # a usage error stays 2, a failure 1
    assert cli("put", "--data-dir", str(dd), "--content", "x", "--strength", "2").exit_code == 2
    assert cli("query", "--data-dir", str(dd), "--id", "nope").exit_code == 1


def _with_closed_stdout(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written: `| head -0`
    try:
        return subprocess.run(
            [*ENGRAM, *args], stdout=w, stderr=subprocess.PIPE, text=True, env=env, timeout=120
        )
    finally:
        os.close(w)


def test_a_closed_stdout_pipe_is_not_a_failure(tmp_path: Path) -> None:
    dd = tmp_path / "data"
    e = Engine.open(dd)
    e.apply([{"op": "create_memory", "id": f"m{i}", "content": "x"} for i in range(50)])
    e.close()
    env = {**os.environ, "ENGRAM_DATA_DIR": str(dd)}
    out = tmp_path / "full.tar.zst"
    for args in (
        ["backup", "--full", f"--output={out}", "--no-validate"],
        ["export", "-o", "-"],
        ["stats", "--json"],
        ["stats"],
    ):
        p = _with_closed_stdout(args, env)
        assert p.returncode == 0 and p.stderr == "", (args, p.returncode, p.stderr)
    # The backup is finished and recorded: archive, sidecar and entry.
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith("full")) == [
        "full.tar.zst",
        "full.tar.zst.info.json",
        "full.tar.zst.sha256",
    ]


def test_version_and_completion() -> None:
    res = cli("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"engram {__version__}"
    for shell, needle in (("bash", "complete -o"), ("zsh", "compdef")):
        res = cli("completion", shell)
        assert res.exit_code == 0 and needle in res.stdout and "_ENGRAM_COMPLETE" in res.stdout
    assert cli("completion", "fish").exit_code == 2
    env = {
        **os.environ,
        "_ENGRAM_COMPLETE": "complete_bash",
        "COMP_WORDS": "engram restore-p",
        "COMP_CWORD": "1",
    }
    p = subprocess.run(ENGRAM, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.split() == ["restore-pitr"], (p.stdout, p.stderr)


# -- HTTP ------------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.open(tmp_path / "data")
    try:
        yield e
    finally:
        e.close()


def _request(eng: Engine, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(eng, token, 1 << 20))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


@pytest.mark.parametrize("n", [1, 2])
def test_batch_names_the_bad_ops_index_also_for_one_op(engine: Engine, n: int) -> None:
    good = [{"op": "create_memory", "id": f"g{i}", "content": "x"} for i in range(n - 1)]
    bad = {"op": "create_memory", "id": "b", "content": "x", "strength": 7}
    r = _request(engine, "POST", "/v1/batch", json={"ops": [*good, bad]})
    body = r.json()
    assert r.status_code == 400 and body["index"] == n - 1, body
    assert body["message"].startswith(f"op {n - 1}: "), body
    # The single-op routes keep their messages without an index.
    r = _request(engine, "POST", "/v1/memories", json={"content": "x", "strength": 7})
    assert r.status_code == 400 and "index" not in r.json(), r.json()
    assert engine.stats()["memories"] == 0


def test_the_authorization_scheme_is_case_insensitive(engine: Engine) -> None:
    for header in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "BeArEr s3cret"):
        r = _request(engine, "GET", "/v1/stats", "s3cret", headers={"authorization": header})
        assert r.status_code == 200, (header, r.text)
    for header in ("Bearer S3CRET", "Basic s3cret", "Bearers3cret", "bearer  s3cret", "s3cret", ""):
        r = _request(engine, "GET", "/v1/stats", "s3cret", headers={"authorization": header})
        assert r.status_code == 401, (header, r.text)
