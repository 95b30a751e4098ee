"""Backup priority: through a real server, `POST /v1/admin/backup` takes an optional
``priority`` ("low", the server's default: the archive is written by a worker process on idle
CPU; or "normal": in the server's process on every core), validated like the other fields, and
`engram backup --priority` passes it on; on a data dir no server holds the CLI's default is
"normal". A low-priority backup's ``cpu_share`` (`--cpu-share`) caps its worker while the log
grows; it is checked the same way, and implies priority low. (The route's ``output``, used here,
is a file the server writes inside its --backup-dir; tests/integration/test_backup_stream.py
covers the streamed backup and the refusals of ``output``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from serverproc import ServerProcess
from typer.testing import CliRunner

from engram.backup.restore import restore
from engram.backup.worker import DEFAULT_CPU_SHARE
from engram.cli.main import app
from engram.graph import Engine, EngineConfig

ENGRAM = str(Path(sys.executable).with_name("engram"))
BAD_SHARE = "--cpu-share must be a number from 0.05 to 1 (a fraction of one core), "


def _engram(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    return subprocess.run([ENGRAM, *args], capture_output=True, text=True, env=env, timeout=120)


def _error(r: httpx.Response, field: str) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["field"] == field and body["message"] and "\n" not in body["message"], body
    return dict(body)


def test_admin_backup_priority_field(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    bk = tmp_path / "bk"
    bk.mkdir()
    srv = start_server(tmp_path / "data", extra_args=("--backup-dir", str(bk)))
    with srv.client() as c:
        for i in range(20):
            assert c.post("/v1/memories", json={"id": f"m{i}", "content": f"text {i}"}).is_success
        got = {}
        for name, extra in [("default", {}), ("low", {"priority": "low"}),
                            ("normal", {"priority": "normal"})]:
            out = bk / f"{name}.tar.zst"
            r = c.post("/v1/admin/backup", json={"kind": "full", "output": str(out), **extra})
            assert r.status_code == 200, r.text
            got[name] = r.json()
            assert Path(got[name]["path"]) == out and out.exists()
        assert got["default"]["priority"] == "low"  # the server's default
        assert got["low"]["priority"] == "low" and got["normal"]["priority"] == "normal"
        assert got["default"]["cpu_share"] == DEFAULT_CPU_SHARE
        assert got["normal"]["cpu_share"] is None
        r = c.post("/v1/admin/backup", json={
            "kind": "full", "output": str(bk / "share.tar.zst"), "cpu_share": 0.5})
        assert r.status_code == 200, r.text
        assert (r.json()["priority"], r.json()["cpu_share"]) == ("low", 0.5)
        files = sorted(os.listdir(bk))
        for bad_share in [0, 0.01, 1.5, -1]:
            body = _error(c.post("/v1/admin/backup", json={
                "kind": "full", "output": str(bk / "bad.tar.zst"), "cpu_share": bad_share}),
                "cpu_share")
            assert "from 0.05 to 1" in body["message"]
        for bad_type in ["0.5", True, [0.5]]:
            _error(c.post("/v1/admin/backup", json={
                "kind": "full", "output": str(bk / "bad.tar.zst"), "cpu_share": bad_type}),
                "cpu_share")
        body = _error(c.post("/v1/admin/backup", json={
            "kind": "full", "output": str(bk / "bad.tar.zst"), "priority": "normal",
            "cpu_share": 0.5}), "cpu_share")
        assert "priority low only" in body["message"]
        body = _error(c.post("/v1/admin/backup", json={
            "kind": "incremental", "output": str(bk / "i.log"), "cpu_share": 0.5}), "cpu_share")
        assert "full backups only" in body["message"]
        for bad in ["fast", "", "LOW"]:
            body = _error(c.post("/v1/admin/backup", json={
                "kind": "full", "output": str(bk / "bad.tar.zst"), "priority": bad}), "priority")
            assert "low or normal" in body["message"]
        for bad_type in [1, True, ["low"], {"p": "low"}]:
            _error(c.post("/v1/admin/backup", json={
                "kind": "full", "output": str(bk / "bad.tar.zst"), "priority": bad_type}),
                "priority")
        body = _error(c.post("/v1/admin/backup", json={
            "kind": "incremental", "output": str(bk / "i.log"), "priority": "low"}), "priority")
        assert "full backups only" in body["message"]
        assert sorted(os.listdir(bk)) == files  # nothing was written by a refused request
        r = c.post("/v1/admin/backup", json={"kind": "incremental", "output": str(bk / "i.log")})
        assert r.status_code == 200 and r.json()["priority"] is None, r.text
        lsn = c.get("/v1/stats").json()["lsn"]
    for name in ("default", "low", "normal"):
        res = restore(bk / f"{name}.tar.zst", tmp_path / f"r-{name}")
        assert (res.snapshot_lsn, res.digest) == (lsn, got["normal"]["digest"])


def test_cli_priority_through_a_server(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "data")
    dd = str(srv.data_dir)
    bk = tmp_path / "bk"
    bk.mkdir()
    with srv.client() as c:
        assert c.post("/v1/memories", json={"id": "a", "content": "hello"}).is_success
    p = _engram("backup", "--full", f"--output={bk}/d.tar.zst", "--level=3", "--data-dir", dd,
                "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["priority"] == "low" and res["validation"]["ok"], res
    assert res["validation"]["priority"] == "low"  # validated on idle CPU, like the backup
    p = _engram("backup", "--full", "--priority=normal", f"--output={bk}/n.tar.zst",
                "--no-validate", "--data-dir", dd)
    assert p.returncode == 0, p.stderr
    assert "at normal priority" in p.stdout
    p = _engram("backup", "--incremental", f"--output={bk}/i.log", "--level=2", "--data-dir", dd,
                "--json")
    assert p.returncode == 0, p.stderr
    # An incremental runs in the server's process; its validation here shares the machine too.
    assert json.loads(p.stdout)["validation"]["priority"] == "low"
    p = _engram("backup", "--full", "--cpu-share=0.5", f"--output={bk}/s.tar.zst",
                "--no-validate", "--data-dir", dd, "--json")
    assert p.returncode == 0, p.stderr
    assert (json.loads(p.stdout)["priority"], json.loads(p.stdout)["cpu_share"]) == ("low", 0.5)
    files = sorted(os.listdir(bk))
    for args, needle in [
        (("--full", "--priority=idle"), "--priority must be low or normal, got 'idle'"),
        (("--incremental", "--priority=normal"), "--priority applies to full backups only"),
        (("--full", "--cpu-share=2"), BAD_SHARE + "got 2.0"),
    ]:
        p = _engram("backup", *args, f"--output={bk}/bad.tar.zst", "--data-dir", dd)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], (p.stdout, p.stderr)
    assert sorted(os.listdir(bk)) == files


# -- the CLI on a data dir no server holds ---------------------------------------------------------


def test_cli_priority_flag(tmp_path: Path) -> None:
    dd = tmp_path / "data"
    e = Engine.open(dd, EngineConfig(checkpoint_interval=3600))
    e.apply([{"op": "create_memory", "id": f"m{i}", "content": f"text {i}"} for i in range(5)])
    e.close()
    bk = tmp_path / "bk"
    bk.mkdir()
    runner = CliRunner()

    def backup(*args: str) -> Any:
        return runner.invoke(app, ["backup", f"--data-dir={dd}", "--no-validate", *args])

    r = backup("--full", f"--output={bk / 'default.tar.zst'}", "--json")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["priority"] == "normal"  # nobody else writes: every core
    r = backup("--full", "--priority=low", f"--output={bk / 'low.tar.zst'}", "--json")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["priority"] == "low"
    r = backup("--full", "--priority=low", f"--output={bk / 'low2.tar.gz'}")
    assert r.exit_code == 0 and "at low priority" in r.stdout, (r.stdout, r.stderr)
    assert f"at most {DEFAULT_CPU_SHARE:.0%} of it while the log grew" in r.stdout
    r = backup("--full", "--cpu-share=0.4", f"--output={bk / 'share.tar.zst'}", "--json")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    res = json.loads(r.stdout)
    assert (res["priority"], res["cpu_share"]) == ("low", 0.4)  # a share implies low
    assert res["paused_s"] == 0  # nothing wrote to the log while it ran
    r = backup("--full", "--cpu-share=1", f"--output={bk / 'free.tar.zst'}")
    assert r.exit_code == 0 and "while the log grew" not in r.stdout, r.stdout
    files = sorted(os.listdir(bk))
    for args, needle in [
        (("--full", "--priority=fast"), "--priority must be low or normal, got 'fast'"),
        (("--full", "--priority="), "--priority must be low or normal"),
        (("--incremental", "--priority=low"), "--priority applies to full backups only"),
        (("--incremental", "--cpu-share=0.5"), "--cpu-share applies to full backups only"),
        (("--full", "--cpu-share=0"), BAD_SHARE + "got 0.0"),
        (("--full", "--cpu-share=nan"), "--cpu-share must be a number from 0.05 to 1"),
        (("--full", "--priority=normal", "--cpu-share=0.5"),
         "--cpu-share applies to --priority low only"),
        (("--full", "--cpu-share=half"), "'--cpu-share'"),
    ]:
        r = backup(*args, f"--output={bk / 'bad.tar.zst'}")
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert sorted(os.listdir(bk)) == files
