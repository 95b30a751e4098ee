"""The seed's backup and recovery commands, run as written, in bash, against the real `engram`.

A module fixture plays the seed's routine through a running server (nightly script: quiesce,
full backup, resume, validate; then writes, a restore point, an accidental deletion and the
5-minute incremental; `engram test --quick`), then stops the server. The tests restore, replay
and validate those backups with the commands of the seed's scripts and runbook, and check the
shell pipelines the seed relies on (the sidecar's digest against `sha256sum X | awk`, `tar -tzf`,
`benchmark | grep 'p50:' | awk`). Local time runs in a fixed +05:30 zone so that "local" and
UTC differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverproc import ServerProcess

from engram.backup.catalog import read_info
from engram.oplog.reader import read_header

BIN = Path(sys.executable).parent
TZ = "ENG-05:30"  # POSIX: UTC+05:30, no DST (needs no tz database)
LOCAL = timezone(timedelta(hours=5, minutes=30))
MEMBERS = {"identity.json", "warm/engram.db", "fast/hot.json", "manifest.json"}


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", TZ=TZ, **extra)
    return env


def sh(script: str, env: dict[str, str], cwd: Path, check: bool = True) -> Any:
    p = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check:
        assert p.returncode == 0, f"{script}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    return p


def engram(env: dict[str, str], cwd: Path, *args: str, check: bool = True) -> Any:
    p = subprocess.run(
        [str(BIN / "engram"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check:
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p


def one_line_error(p: Any, code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    return str(lines[0])


@dataclass
class Flow:
    work: Path
    data: Path
    backups: Path
    env: dict[str, str]
    full: Path
    inc: Path
    t0: str  # local time between the restore point and the deletion, as `date` printed it
    stats_before_smoke: dict[str, Any]
    nightly_out: str
    inc_out: str
    smoke_out: str
    bulk: list[str]


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Flow:
    work = tmp_path_factory.mktemp("cli")
    data, backups = work / "data", work / "backups"
    backups.mkdir()
    env = base_env(ENGRAM_DATA_DIR=str(data), BACKUP_DIR=str(backups))
    srv = ServerProcess(data).start()
    try:
        sh(
            "engram put --id=critical-node --content='the node we must not lose'\n"
            "engram put --id=neighbour --content='a neighbour of it'\n"
            "engram link --src=critical-node --dst=neighbour\n",
            env,
            work,
        )
        bulk = [f"bulk-{i}" for i in range(60)]
        with srv.client() as c:
            for i in range(0, 60, 10):
                ops = [
                    {"op": "create_memory", "id": m, "content": f"bulk memory {m}"}
                    for m in bulk[i : i + 10]
                ]
                ops += [{"op": "activate", "id": "critical-node"}]
                assert c.post("/v1/batch", json={"ops": ops}).status_code == 200
        # The seed's nightly script, as written (paths under $BACKUP_DIR).
        nightly = sh(
            "engram quiesce --timeout=3m\n"
            "engram backup --full --output=$BACKUP_DIR/full-$(date +%Y%m%d).tar.gz\n"
            "engram resume\n"
            "engram validate-backup $BACKUP_DIR/full-$(date +%Y%m%d).tar.gz\n",
            env,
            work,
        )
        full = next(backups.glob("full-*.tar.gz"))
        with srv.client() as c:
            r = c.post("/v1/memories", json={"id": "before-mark", "content": "kept"})
            assert r.status_code == 201
        sh("engram mark before-mistake", env, work)
        time.sleep(1.1)
        t0 = sh('date +"%Y-%m-%d %H:%M:%S"', env, work).stdout.strip()
        time.sleep(1.1)
        sh(
            "engram delete --id=critical-node\n"
            "engram put --id=after-mistake --content='written after the deletion'\n",
            env,
            work,
        )
        inc_p = sh(
            "engram backup --incremental --since=5m \\\n"
            "  --output=$BACKUP_DIR/incremental-$(date +%Y%m%d-%H%M).log\n",
            env,
            work,
        )
        inc = next(backups.glob("incremental-*.log"))
        stats = json.loads(engram(env, work, "stats", "--json").stdout)
        smoke = engram(env, work, "test", "--quick")
    finally:
        srv.stop()
    return Flow(
        work,
        data,
        backups,
        env,
        full,
        inc,
        t0,
        stats,
        nightly.stdout,
        inc_p.stdout,
        smoke.stdout,
        bulk,
    )


def _query(f: Flow, data_dir: Path, mid: str) -> Any:
    return engram(f.env, f.work, "query", f"--id={mid}", f"--data-dir={data_dir}", check=False)


# -- backups and their sidecars ------------------------------------------------------------------


def test_nightly_script_writes_a_checked_full_backup(flow: Flow) -> None:
    assert "PASS" in flow.nightly_out and "FAIL" not in flow.nightly_out
    assert re.fullmatch(r"full-\d{8}\.tar\.gz", flow.full.name)
    side = flow.full.with_name(flow.full.name + ".sha256")
    want = hashlib.sha256(flow.full.read_bytes()).hexdigest()
    assert side.read_text() == f"{want}  {flow.full.name}\n"  # sha256sum's format
    info = read_info(flow.full)
    assert info is not None and info["validation"]["ok"] is True


def _sha_pipeline(f: Flow, path: Path) -> None:
    out = sh(
        f'BACKUP_FILE="{path}"\n'
        "EXPECTED=$(cut -d' ' -f1 ${BACKUP_FILE}.sha256)\n"
        "ACTUAL=$(sha256sum $BACKUP_FILE | awk '{print $1}')\n"
        'if [ "$EXPECTED" != "$ACTUAL" ]; then echo "FAIL: Checksum mismatch"; exit 1; fi\n'
        'echo "OK $EXPECTED"\n',
        f.env,
        f.work,
    ).stdout
    assert out.strip() == f"OK {hashlib.sha256(path.read_bytes()).hexdigest()}"


def test_full_backup_sidecar_and_gnu_tar(flow: Flow) -> None:
    _sha_pipeline(flow, flow.full)
    names = set(sh(f'tar -tzf "{flow.full}"', flow.env, flow.work).stdout.split())
    assert names >= MEMBERS, names
    # Quiesced before the backup: a checkpoint ran, so the warm tier is at the snapshot.
    manifest = json.loads(sh(f'tar -xzOf "{flow.full}" manifest.json', flow.env, flow.work).stdout)
    assert manifest["warm_lsn"] == manifest["snapshot_lsn"] > 0
    assert names == set(manifest["files"]) | {"manifest.json"}
    info = read_info(flow.full)
    assert info is not None and info["validation"]["ok"] is True
    assert info["validation"]["level"] == 4


@pytest.mark.parametrize("ext", [".tar.zst", ".tar.gz"])
def test_offline_full_backup(flow: Flow, tmp_path: Path, ext: str) -> None:
    if ext == ".tar.zst" and shutil.which("zstd") is None:
        pytest.skip("zstd is not installed: GNU tar cannot read .tar.zst without it")
    data = tmp_path / "copy"
    shutil.copytree(flow.data, data)
    out = tmp_path / "b"
    out.mkdir()
    res = engram(
        flow.env,
        flow.work,
        "backup",
        "--full",
        f"--output={out}/full-20251024{ext}",
        f"--data-dir={data}",
        "--no-validate",
        "--json",
    )
    j = json.loads(res.stdout)
    path = out / f"full-20251024{ext}"
    assert j["path"] == str(path) and j["validation"] is None
    assert j["snapshot_lsn"] == flow.stats_before_smoke["lsn"] + 2  # + the smoke test's two
    _sha_pipeline(flow, path)
    lister = "tar -I zstd -tf" if ext == ".tar.zst" else "tar -tzf"
    names = set(sh(f'{lister} "{path}"', flow.env, flow.work).stdout.split())
    assert names >= MEMBERS
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [path.name, path.name + ".sha256", path.name + ".info.json"]
    )


def test_incremental_since_5m(flow: Flow) -> None:
    assert re.fullmatch(r"incremental-\d{8}-\d{4}\.log", flow.inc.name)
    _sha_pipeline(flow, flow.inc)
    h = read_header(flow.inc)
    assert h["from_lsn"] == 1  # everything is younger than 5 minutes
    assert h["to_lsn"] == flow.stats_before_smoke["lsn"]
    assert h["digest"] == flow.stats_before_smoke["digest"]
    assert h["parent"] == flow.full.name
    assert "PASS" in flow.inc_out
    info = read_info(flow.inc)
    assert info is not None and info["validation"]["ok"] is True


def test_smoke_test_passed_against_the_server(flow: Flow, tmp_path: Path) -> None:
    assert "PASS" in flow.smoke_out
    for step in ("health", "write", "read", "recall", "delete"):
        assert step in flow.smoke_out
    p = engram(flow.env, flow.work, "test", "--quick", f"--data-dir={tmp_path}", check=False)
    assert "no engram server is running" in one_line_error(p, 3)


# -- restore, PITR, apply-log --------------------------------------------------------------------


def test_restore_then_query_and_verify(flow: Flow, tmp_path: Path) -> None:
    to = tmp_path / "restore-test"
    out = sh(
        f"engram restore --from={flow.full} --to={to}\nengram verify --data-dir={to} --check-all\n",
        flow.env,
        flow.work,
    ).stdout
    assert "restored" in out
    q = _query(flow, to, "critical-node")
    assert q.returncode == 0 and "the node we must not lose" in q.stdout
    assert _query(flow, to, "after-mistake").returncode == 1
    # An existing, non-empty target is refused without --force.
    p = engram(flow.env, flow.work, "restore", f"--from={flow.full}", f"--to={to}", check=False)
    assert "--force" in one_line_error(p, 3)


def test_restore_pitr_to_a_local_time(flow: Flow, tmp_path: Path) -> None:
    to = tmp_path / "pitr"
    out = sh(
        "engram restore-pitr \\\n"
        f"  --base-backup={flow.full} \\\n"
        f"  --operation-log={flow.inc} \\\n"
        f'  --target-time="{flow.t0}" \\\n'
        f"  --output={to}\n",
        flow.env,
        flow.work,
    ).stdout
    local = datetime.strptime(flow.t0, "%Y-%m-%d %H:%M:%S").replace(tzinfo=LOCAL)
    utc = local.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    assert f"target time '{flow.t0}' is {utc} UTC" in out, out
    assert "recovered" in out
    assert _query(flow, to, "critical-node").returncode == 0  # Found
    assert _query(flow, to, "before-mark").returncode == 0
    assert _query(flow, to, "after-mistake").returncode == 1
    # ISO 8601 with an offset names the same instant.
    iso = local.isoformat()
    j = json.loads(
        engram(
            flow.env,
            flow.work,
            "restore-pitr",
            f"--base-backup={flow.full}",
            f"--operation-log={flow.inc}",
            f"--target-time={iso}",
            f"--output={tmp_path / 'iso'}",
            "--json",
        ).stdout
    )
    assert j["target_utc"] == utc
    assert (
        j["digest"]
        == json.loads(engram(flow.env, flow.work, "stats", "--json", f"--data-dir={to}").stdout)[
            "digest"
        ]
    )


def test_restore_pitr_to_a_restore_point(flow: Flow, tmp_path: Path) -> None:
    to = tmp_path / "named"
    out = engram(
        flow.env,
        flow.work,
        "restore-pitr",
        f"--base-backup={flow.full}",
        f"--operation-log={flow.inc}",
        "--target-name",
        "before-mistake",
        f"--output={to}",
    ).stdout
    assert "restore point 'before-mistake'" in out
    assert _query(flow, to, "critical-node").returncode == 0
    assert _query(flow, to, "before-mark").returncode == 0
    assert _query(flow, to, "after-mistake").returncode == 1
    # --repo picks the base and the incrementals itself, and says which.
    to2 = tmp_path / "repo"
    out = engram(
        flow.env,
        flow.work,
        "restore-pitr",
        f"--repo={flow.backups}",
        "--target-name=before-mistake",
        f"--output={to2}",
    ).stdout
    assert f"chose base {flow.full.name}" in out and flow.inc.name in out
    assert _query(flow, to2, "critical-node").returncode == 0
    bad = engram(
        flow.env,
        flow.work,
        "restore-pitr",
        f"--base-backup={flow.full}",
        f"--operation-log={flow.inc}",
        "--target-name=never-marked",
        f"--output={tmp_path / 'x'}",
        check=False,
    )
    assert "no restore point named 'never-marked'" in one_line_error(bad, 2)
    assert not (tmp_path / "x").exists()


def test_apply_log_replays_the_incrementals(flow: Flow, tmp_path: Path) -> None:
    dd = tmp_path / "engram"
    env = flow.env | {"ENGRAM_DATA_DIR": str(dd)}
    sh(
        f"engram restore --from={flow.full} --to=$ENGRAM_DATA_DIR\n"
        f"for log in {flow.backups}/*.log; do\n"
        "    engram apply-log --log=$log\n"
        "done\n",
        env,
        flow.work,
    )
    st = json.loads(engram(env, flow.work, "stats", "--json").stdout)
    assert (st["lsn"], st["digest"]) == (
        flow.stats_before_smoke["lsn"],
        flow.stats_before_smoke["digest"],
    )
    assert _query(flow, dd, "critical-node").returncode == 1
    assert _query(flow, dd, "after-mistake").returncode == 0
    again = engram(env, flow.work, "apply-log", f"--log={flow.inc}").stdout
    assert "applied 0 records" in again
    st2 = json.loads(engram(env, flow.work, "stats", "--json").stdout)
    assert (st2["lsn"], st2["digest"]) == (st["lsn"], st["digest"])


def test_benchmark_prints_a_bare_p50(flow: Flow, tmp_path: Path) -> None:
    to = tmp_path / "bench"
    engram(flow.env, flow.work, "restore", f"--from={flow.full}", f"--to={to}")
    out = sh(
        f"engram benchmark --data-dir={to} --duration=1s | grep 'p50:' | awk '{{print $2}}'",
        flow.env,
        flow.work,
    ).stdout
    assert len(out.splitlines()) == 1
    assert float(out.strip()) >= 0
    lines = engram(flow.env, flow.work, "benchmark", f"--data-dir={to}", "--duration=1s").stdout
    for key in ("p50", "p95", "p99", "ops/s"):
        m = re.search(rf"^{re.escape(key)}: (\S+)$", lines, re.M)
        assert m is not None, lines
        float(m.group(1))


def test_validate_backup_passes_and_fails(flow: Flow, tmp_path: Path) -> None:
    p = engram(flow.env, flow.work, "validate-backup", str(flow.full), "--level", "3")
    assert p.stdout.strip().splitlines()[-1] == "PASS"
    bad = tmp_path / flow.full.name
    data = bytearray(flow.full.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    shutil.copy(flow.full.with_name(flow.full.name + ".sha256"), tmp_path)
    p = engram(flow.env, flow.work, "validate-backup", str(bad), check=False)
    assert p.returncode == 1
    assert p.stdout.strip().splitlines()[-1].startswith("FAIL: ")


# -- usage errors and --json -------------------------------------------------------------------


def test_bad_output_paths_are_refused(flow: Flow, tmp_path: Path) -> None:
    data = tmp_path / "copy"
    shutil.copytree(flow.data, data)
    p = engram(
        flow.env,
        flow.work,
        "backup",
        "--full",
        f"--output={tmp_path}/x.zip",
        f"--data-dir={data}",
        check=False,
    )
    msg = one_line_error(p, 2)
    assert ".tar.zst" in msg and ".tar.gz" in msg
    assert not (tmp_path / "x.zip").exists()
    p = engram(
        flow.env,
        flow.work,
        "backup",
        "--incremental",
        "--since=5m",
        f"--output={tmp_path}/x.tar.gz",
        f"--data-dir={data}",
        check=False,
    )
    assert ".log" in one_line_error(p, 2)
    existing = tmp_path / "full.tar.zst"
    existing.write_bytes(b"an earlier backup")
    p = engram(
        flow.env,
        flow.work,
        "backup",
        "--full",
        f"--output={existing}",
        f"--data-dir={data}",
        "--no-validate",
        check=False,
    )
    assert "already exists" in one_line_error(p, 3)
    assert existing.read_bytes() == b"an earlier backup"
    assert not existing.with_name("full.tar.zst.sha256").exists()
    p = engram(
        flow.env,
        flow.work,
        "backup",
        "--full",
        "--since=5m",
        f"--output={tmp_path}/y.tar.zst",
        f"--data-dir={data}",
        check=False,
    )
    one_line_error(p, 2)
    leftovers = [q.name for q in tmp_path.iterdir() if q.name.startswith(".")]
    assert leftovers == []


def test_json_outputs_parse(flow: Flow, tmp_path: Path) -> None:
    data = tmp_path / "copy"
    shutil.copytree(flow.data, data)
    env = flow.env | {"ENGRAM_DATA_DIR": str(data)}

    def j(*args: str) -> Any:
        return json.loads(engram(env, flow.work, *args, "--json").stdout)

    assert j("mark", "json-point")["name"] == "json-point"
    b = j("backup", "--full", f"--output={tmp_path}/f.tar.zst", "--level", "2")
    assert b["kind"] == "full" and b["validation"]["ok"] is True
    inc = j(
        "backup", "--incremental", "--since-lsn=1", f"--output={tmp_path}/i.log", "--no-validate"
    )
    assert inc["kind"] == "incremental" and inc["from_lsn"] == 1
    assert inc["snapshot_lsn"] == b["snapshot_lsn"]
    r = j("restore", f"--from={tmp_path}/f.tar.zst", f"--to={tmp_path}/r")
    assert r["snapshot_lsn"] == b["snapshot_lsn"] and r["sidecar_checked"] is True
    pit = j(
        "restore-pitr",
        f"--base-backup={flow.full}",
        f"--operation-log={data}/oplog",
        "--target-name=json-point",
        f"--output={tmp_path}/p",
    )
    assert pit["reached_lsn"] == b["snapshot_lsn"] and pit["digest"] == b["digest"]
    a = j("apply-log", f"--log={tmp_path}/i.log", f"--data-dir={tmp_path}/r")
    assert a["records"] == 0
    v = j("validate-backup", f"{tmp_path}/i.log", "--level", "2")
    assert v["ok"] is True and v["kind"] == "incremental"
    assert j("benchmark", f"--data-dir={tmp_path}/r", "--duration=0.2s")["ops"] > 0
    st = j("status")
    assert st["server"] is None and st["quiesce"]["quiesced"] is False


def test_verify_json_parses(flow: Flow, tmp_path: Path) -> None:
    to = tmp_path / "v"
    engram(flow.env, flow.work, "restore", f"--from={flow.full}", f"--to={to}")
    p = engram(
        flow.env, flow.work, "verify", f"--data-dir={to}", "--check-all", "--json", check=False
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ok"] is True


def test_backup_through_the_server_is_written_by_the_cli(flow: Flow, tmp_path: Path) -> None:
    """A second server on a copy: the server streams the backup and the CLI writes it, at its
    relative --output (resolved in the CLI's directory, never sent to the server), as the user
    who ran the command."""
    data = tmp_path / "copy"
    shutil.copytree(flow.data, data)
    srv = ServerProcess(data).start()
    try:
        with srv.client() as c:
            assert c.post("/v1/memories", json={"id": "live", "content": "x"}).status_code == 201
        out = sh(
            f"cd {tmp_path}\n"
            f"engram backup --full --output=full-$(date +%Y%m%d).tar.zst --data-dir={data} "
            "--no-validate --json\n",
            flow.env,
            flow.work,
        ).stdout
        j = json.loads(out)
        path = Path(j["path"])
        assert path.parent == tmp_path and path.is_file()
        assert path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o777 == 0o600
        _sha_pipeline(flow, path)
        with httpx.Client(base_url=srv.url or "", timeout=10) as c:
            assert j["snapshot_lsn"] == c.get("/v1/stats").json()["lsn"]
        info = read_info(path)
        assert info is not None and info["path"] == path.name and info["sha256"] == j["sha256"]
    finally:
        srv.stop()
