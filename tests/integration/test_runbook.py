"""docs/RUNBOOK.md, run as written: every ```bash block of each scenario, in order, in bash.

The only substitution: `systemctl start|stop engram` become functions that start and stop a real
test server on 127.0.0.1. Everything else — restore, apply-log, restore-pitr, verify, curl on
/health/ready, engram test --quick, export/import, age-keygen, engram sync — runs exactly as the
runbook says. Scenario 1b's bucket is on the session's SeaweedFS (tests/s3servers.py), reached
through the variables the runbook names (AWS_ENDPOINT_URL and the AWS credentials); its
unencrypted variant follows the runbook's own rule (the same commands without `--identity=…`,
`--recipients-file=…` and the `age-keygen` line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netutil import free_port
from s3servers import AWS_ENV, S3Server, s3_prefix

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
BIN = Path(sys.executable).parent
WAIT_READY = (
    'for i in $(seq 1 100); do curl -fsS "$ENGRAM_URL/health/ready" >/dev/null && exit 0; '
    "sleep 0.1; done; exit 1"
)


def _sections() -> dict[str, list[str]]:
    """The ```bash blocks under each `##` or `###` heading, by its lowercased title (a
    scenario's up to its colon)."""
    text = RUNBOOK.read_text()
    out: dict[str, list[str]] = {}
    current = "preamble"
    for part in re.split(r"^###? ", text, flags=re.M):
        title = part.splitlines()[0] if part else ""
        if title.startswith("Scenario"):
            current = title.split(":")[0].strip().lower()
        elif title:
            current = title.strip().lower()
        blocks = re.findall(r"```bash\n(.*?)```", part, flags=re.S)
        out.setdefault(current, []).extend(blocks)
    return out


SERVICE = """
start_engram() {
    engram serve --data-dir "$ENGRAM_DATA_DIR" --port "$PORT" >>"$WORK/server.log" 2>&1 &
    echo $! > "$WORK/server.pid"
}
stop_engram() {
    if [ -s "$WORK/server.pid" ]; then
        pid=$(cat "$WORK/server.pid"); kill "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        rm -f "$WORK/server.pid"
    fi
}
"""


class Runbook:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.env = dict(os.environ)
        self.env.update(
            PATH=f"{BIN}:{self.env.get('PATH', '')}",
            WORK=str(work),
            PORT=str(self.port),
            ENGRAM_DATA_DIR=str(work / "data"),
            BACKUP_DIR=str(work / "backups"),
            ENGRAM_URL=f"http://127.0.0.1:{self.port}",
        )
        (work / "backups").mkdir()
        self.settings = _sections()["before anything goes wrong"]

    def bash(self, script: str, **extra: str) -> str:
        script = script.replace("systemctl start engram", "start_engram")
        script = script.replace("systemctl stop engram", "stop_engram")
        full = "set -euo pipefail\n" + SERVICE + "\n".join(self.settings) + "\n" + script
        env = self.env | extra
        p = subprocess.run(
            ["bash", "-c", full], cwd=self.work, env=env, capture_output=True, text=True,
            timeout=300,
        )
        assert p.returncode == 0, (
            f"runbook step failed:\n{script}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
        )
        return p.stdout

    def engram(self, *args: str) -> str:
        return self.bash("engram " + " ".join(f"'{a}'" for a in args))

    def start(self) -> None:
        self.bash("start_engram\n" + WAIT_READY)

    def stop(self) -> None:
        self.bash("stop_engram")

    def stats(self) -> dict:
        return json.loads(self.engram("stats", "--json"))


def _local_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture
def rb(tmp_path: Path):
    r = Runbook(tmp_path)
    yield r
    r.stop()


def test_runbook_commands_are_tested_here() -> None:
    s = _sections()
    assert len(s["scenario 1"]) == 3 and len(s["scenario 2"]) == 2 and len(s["scenario 3"]) == 2
    assert len(s["the offsite copy"]) == 2 and len(s["scenario 1b"]) == 3
    assert len(s["before anything goes wrong"]) == 1  # the settings, prepended to every script


def test_scenario_1_complete_data_loss(rb: Runbook) -> None:
    rb.start()
    for i in range(20):
        rb.engram("put", "--content", f"memory {i}", "--id", f"m{i}")
    rb.engram("backup", "--full", f"--output={rb.work}/backups/full-20251024.tar.zst")
    for i in range(20, 30):
        rb.engram("put", "--content", f"memory {i}", "--id", f"m{i}")
    rb.engram("link", "--src", "m1", "--dst", "m25")
    rb.engram("backup", "--incremental", "--since=5m", "--no-validate",
              f"--output={rb.work}/backups/incremental-20251024-1400.log")
    rb.engram("delete", "--id", "m3")
    rb.engram("backup", "--incremental", "--since=5m", "--no-validate",
              f"--output={rb.work}/backups/incremental-20251024-1405.log")
    before = rb.stats()
    rb.stop()
    rb.bash('rm -rf "$ENGRAM_DATA_DIR"')  # the disk is gone
    out = rb.bash("\n".join(_sections()["scenario 1"]))
    assert "PASS" in out
    assert "chose full-20251024.tar.zst in" in out  # by the repository's own listing
    after = rb.stats()
    assert (after["memories"], after["edges"]) == (before["memories"], before["edges"])
    assert after["lsn"] >= before["lsn"]  # + the smoke test's canary write and delete
    assert "error" not in rb.engram("query", "--id", "m25")


def test_scenario_2_corruption(rb: Runbook) -> None:
    rb.start()
    for i in range(10):
        rb.engram("put", "--content", f"good {i}", "--id", f"g{i}")
    rb.engram(
        "backup", "--full", "--no-validate", f"--output={rb.work}/backups/full-20251024.tar.zst"
    )
    rb.engram("put", "--content", "also good", "--id", "g-late")
    time.sleep(1.1)
    restore_time = _local_now()
    time.sleep(1.1)
    rb.engram("delete", "--id", "g1")  # the "corruption"
    rb.engram("put", "--content", "bad", "--id", "bad")
    rb.engram("backup", "--incremental", "--since=5m", "--no-validate",
              f"--output={rb.work}/backups/incremental-20251024-1430.log")
    out = rb.bash(_sections()["scenario 2"][0], RESTORE_TIME=restore_time)
    assert "recovered" in out
    rb.bash(WAIT_READY)
    assert '"id": "g1"' in rb.engram("query", "--id", "g1", "--json")
    assert '"id": "g-late"' in rb.engram("query", "--id", "g-late", "--json")
    missing = subprocess.run(
        [str(BIN / "engram"), "query", "--id", "bad"], env=rb.env, capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert list(rb.work.glob("data.before-restore-*")), "the damaged data dir is kept aside"


def test_scenario_2_only_the_index_is_damaged(rb: Runbook) -> None:
    rb.start()
    for i in range(10):
        rb.engram("put", "--content", f"needle {i}", "--id", f"n{i}")
    rb.stop()
    # Take memory n3's words out of the full-text index behind engram's back: the rows stay
    # intact, recall misses it, only the index check can tell.
    db = rb.work / "data" / "warm" / "engram.db"
    conn = sqlite3.connect(db)
    rowid, content = conn.execute("SELECT rowid, content FROM memories WHERE id='n3'").fetchone()
    conn.execute(
        "INSERT INTO memories_fts(memories_fts, rowid, content) VALUES('delete', ?, ?)",
        (rowid, content),
    )
    conn.commit()
    conn.close()
    damaged = subprocess.run(
        [str(BIN / "engram"), "verify", "--check-all"], env=rb.env, capture_output=True, text=True
    )
    assert damaged.returncode == 1 and "memories_fts" in damaged.stdout, damaged.stdout
    rb.bash(_sections()["scenario 2"][1])
    rb.bash(WAIT_READY)
    found = json.loads(rb.engram("recall", "needle", "--limit", "20", "--json"))["results"]
    assert sorted(r["id"] for r in found) == sorted(f"n{i}" for i in range(10))


def test_scenario_3_accidental_deletion(rb: Runbook) -> None:
    rb.start()
    rb.engram("put", "--content", "the one we need", "--id", "critical-node")
    rb.engram("put", "--content", "a neighbour", "--id", "neighbour")
    rb.engram("link", "--src", "critical-node", "--dst", "neighbour")
    rb.engram(
        "backup", "--full", "--no-validate", f"--output={rb.work}/backups/full-20251024.tar.zst"
    )
    time.sleep(1.1)
    before_delete = _local_now()
    time.sleep(1.1)
    rb.engram("delete", "--id", "critical-node")
    rb.engram("put", "--content", "written after the mistake", "--id", "later")
    rb.engram("backup", "--incremental", "--since=5m", "--no-validate",
              f"--output={rb.work}/backups/incremental-20251024-1445.log")
    # One shell for the whole scenario, as an operator would type it.
    out = rb.bash("\n".join(_sections()["scenario 3"]), BEFORE_DELETE=before_delete)
    assert out.count("the one we need") == 2  # in the side copy, then back in the live server
    n = json.loads(rb.engram("neighbors", "--id", "critical-node", "--json"))
    rows = n["neighbors"] if isinstance(n, dict) else n
    assert [x["memory"]["id"] for x in rows] == ["neighbour"]
    assert '"id": "later"' in rb.engram("query", "--id", "later", "--json")


OFFSITE_BUCKET = "engram-backups"  # the runbook's bucket; the operator makes it, here the test


def _offsite_bucket(server: S3Server) -> None:
    try:
        server.client().create_bucket(Bucket=OFFSITE_BUCKET)
    except Exception as e:  # made by an earlier test of the session
        if getattr(e, "response", {}).get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise


def _unencrypted(script: str) -> str:
    """The runbook's rule for offsite copies that are not encrypted: the same commands without
    `--identity=…` and `--recipients-file=…`, and without the `age-keygen` line."""
    script = re.sub(r' --(identity|recipients-file)="\$OFFSITE_[A-Z]+"', "", script)
    assert "--identity" not in script and "--recipients-file" not in script
    return "\n".join(line for line in script.splitlines() if not line.startswith("age-keygen"))


def _memory(i: int) -> dict[str, object]:
    return {"op": "create_memory", "id": f"m{i}", "content": f"memory {i}", "strength": 0.7}


def _import(rb: Runbook, name: str, ops: list[dict[str, object]]) -> None:
    """Ops written through the running server in one command (one CLI start, not one a write)."""
    (rb.work / name).write_text("".join(json.dumps(op) + "\n" for op in ops))
    rb.engram("import", f"--file={rb.work / name}")


@pytest.mark.parametrize("encrypted", [True, False], ids=["age", "plain"])
def test_scenario_1b_total_loss_from_the_offsite_copy(
    rb: Runbook, seaweed_s3: S3Server, encrypted: bool
) -> None:
    if encrypted and shutil.which("age-keygen") is None:
        pytest.skip("the age CLI is absent: apt-get install age (.ci/run installs it)")
    _offsite_bucket(seaweed_s3)
    prefix = s3_prefix()
    offline = rb.work / "offline"  # where the identity is kept: not the server's disk
    offline.mkdir()
    rb.env.update(
        AWS_ENV,
        AWS_ENDPOINT_URL=seaweed_s3.endpoint,
        OFFSITE=f"s3://{OFFSITE_BUCKET}/{prefix}",
        OFFSITE_RECIPIENTS=str(rb.work / "offsite.pub"),
        OFFSITE_IDENTITY=str(offline / "offsite-key.txt"),
    )
    keys, sync = _sections()["the offsite copy"]
    scenario = "\n".join(_sections()["scenario 1b"])
    if encrypted:
        rb.bash(keys)  # the key pair, as "Before anything goes wrong" makes it
    else:
        sync, scenario = _unencrypted(sync), _unencrypted(scenario)

    # The old machine: backups into $BACKUP_DIR, each mirrored offsite by the runbook's sync.
    rb.start()
    _import(rb, "first.jsonl", [_memory(i) for i in range(20)])
    rb.engram("backup", "--full", f"--output={rb.work}/backups/full-20251024.tar.zst")
    rb.bash(sync)
    link = {"op": "create_edge", "src": "m1", "dst": "m25", "kind": "related", "weight": 0.5}
    _import(rb, "second.jsonl", [_memory(i) for i in range(20, 30)] + [link])
    rb.engram("backup", "--incremental", "--since=5m", "--no-validate",
              f"--output={rb.work}/backups/incremental-20251024-1400.log")
    rb.bash(sync)
    rb.engram("delete", "--id", "m3")
    rb.engram("backup", "--incremental", "--since=5m", "--no-validate",
              f"--output={rb.work}/backups/incremental-20251024-1405.log")
    assert "copied" in rb.bash(sync)
    assert "nothing to copy" in rb.bash(sync)  # the bucket is up to date
    before = rb.stats()
    rb.engram("export", f"--output={rb.work}/before.jsonl")
    rb.stop()

    stored = seaweed_s3.client().get_object(
        Bucket=OFFSITE_BUCKET, Key=f"{prefix}full-20251024.tar.zst", Range="bytes=0-21"
    )["Body"].read()
    assert stored.startswith(b"age-encryption.org/v1") == encrypted

    # Total loss: the data dir, the backup directory and the server's public key file are gone;
    # what is left is the bucket and the identity kept offline.
    rb.bash('rm -rf "$ENGRAM_DATA_DIR" "$BACKUP_DIR" "$OFFSITE_RECIPIENTS"')
    out = rb.bash(scenario)

    assert "chose full-20251024.tar.zst in" in out
    assert "PASS" in out  # engram test --quick
    if encrypted:  # the identity is used, never shown
        secret = next(
            ln for ln in Path(rb.env["OFFSITE_IDENTITY"]).read_text().splitlines()
            if ln.startswith("AGE-SECRET-KEY-")
        )
        assert secret not in out
    after = rb.stats()
    assert (after["memories"], after["edges"], after["digest"]) == (
        before["memories"], before["edges"], before["digest"]
    )
    rb.engram("export", f"--output={rb.work}/after.jsonl")
    assert (rb.work / "after.jsonl").read_text() == (rb.work / "before.jsonl").read_text()

    # The offsite copy runs again: the new history's first full backup is in the bucket beside
    # the old machine's, encrypted to the public key put back on the server, and nothing of the
    # old machine's backups was deleted.
    if encrypted:
        assert (rb.work / "offsite.pub").read_text().startswith("age1")
    listing = json.loads(rb.engram("backups", f"--repo=s3://{OFFSITE_BUCKET}/{prefix}", "--json"))
    fulls = [b for b in listing["backups"] if b["kind"].startswith("full")]
    assert len(fulls) == 2 and len(listing["backups"]) == 4, listing
    assert all(b["encrypted"] == encrypted for b in listing["backups"])
    assert len({b["history"] for b in fulls}) == 2  # the restore began a new history
