"""Admin routes with a token of their own: which token opens which route, and the CLI's choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverproc import ServerProcess
from typer.testing import CliRunner

from engram.cli.main import app

DATA = "data-token-5b1e"
ADMIN = "admin-token-9c2d"

runner = CliRunner()


def cli(*args: str, env: dict[str, str | None] | None = None) -> Any:
    base: dict[str, str | None] = {
        "ENGRAM_TOKEN": None,
        "ENGRAM_ADMIN_TOKEN": None,
        "ENGRAM_CACERT": None,
    }
    return runner.invoke(app, list(args), env={**base, **(env or {})})


def _status(srv: ServerProcess, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{srv.url}/v1/admin/status", headers=headers).status_code


def _stats(srv: ServerProcess, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{srv.url}/v1/stats", headers=headers).status_code


def test_each_token_opens_only_its_own_routes(start_server: Any) -> None:
    srv = start_server(token=DATA, admin_token=ADMIN)
    assert _status(srv, ADMIN) == 200
    assert _status(srv, DATA) == 401
    assert _status(srv, None) == 401
    assert _stats(srv, DATA) == 200
    assert _stats(srv, ADMIN) == 401
    headers = {"Authorization": f"Bearer {DATA}"}
    for method, path in [("POST", "/v1/admin/quiesce"), ("POST", "/v1/admin/resume")]:
        r = httpx.request(method, f"{srv.url}{path}", headers=headers, json={"timeout_s": 5})
        assert r.status_code == 401, r.text
        assert "admin token" in r.json()["message"]
    assert "admin-token" not in srv.log() and ADMIN not in srv.log()


def test_without_an_admin_token_admin_routes_take_the_data_token(start_server: Any) -> None:
    srv = start_server(token=DATA)
    assert _status(srv, DATA) == 200
    assert _status(srv, None) == 401


def test_admin_token_alone_guards_admin_routes_only(start_server: Any) -> None:
    srv = start_server(admin_token=ADMIN)  # loopback: the data routes may stay open
    assert _stats(srv, None) == 200
    assert _status(srv, None) == 401
    assert _status(srv, ADMIN) == 200


def test_the_admin_token_from_the_environment(start_server: Any) -> None:
    srv = start_server(token=DATA, env={"ENGRAM_ADMIN_TOKEN": ADMIN})
    assert _status(srv, ADMIN) == 200 and _status(srv, DATA) == 401


def test_an_admin_token_equal_to_the_data_token_is_refused(start_server: Any) -> None:
    srv = start_server(token=DATA, admin_token=DATA, wait=None)
    assert srv.wait_exit() == 2
    assert "the admin token is the data token" in srv.log()


@pytest.fixture
def served(start_server: Any, tmp_path: Path) -> tuple[ServerProcess, Path, Path]:
    srv = start_server(tmp_path / "data", token=DATA, admin_token=ADMIN)
    data_file, admin_file = tmp_path / "data.tok", tmp_path / "admin.tok"
    data_file.write_text(DATA)
    admin_file.write_text(ADMIN)
    return srv, data_file, admin_file


def test_cli_admin_commands_send_the_admin_token(
    served: tuple[ServerProcess, Path, Path],
) -> None:
    srv, data_file, admin_file = served
    dd = str(srv.data_dir)
    base = ("--data-dir", dd, "--token-file", str(data_file))
    res = cli("status", *base, "--admin-token-file", str(admin_file), "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["server"]["url"] == srv.url
    res = cli("quiesce", *base, "--timeout", "30s", "--json", env={"ENGRAM_ADMIN_TOKEN": ADMIN})
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["quiesced"] is True
    res = cli("resume", *base, "--admin-token-file", str(admin_file))
    assert res.exit_code == 0, res.stderr
    # The data commands go on with the data token alone, even when an admin token is set.
    res = cli("stats", *base, "--json", env={"ENGRAM_ADMIN_TOKEN": ADMIN})
    assert res.exit_code == 0, res.stderr


def test_cli_admin_command_without_the_admin_token_says_so(
    served: tuple[ServerProcess, Path, Path],
) -> None:
    srv, data_file, _ = served
    res = cli("status", "--data-dir", str(srv.data_dir), "--token-file", str(data_file))
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--admin-token-file" in lines[0], res.stderr
    assert DATA not in res.stderr
