"""docs/RUNBOOK.md, run as written: every ```bash block of each scenario, in order, in bash.

The only substitution: `systemctl start|stop engram` become functions that start and stop a real
test server on 127.0.0.1. Everything else — restore, apply-log, restore-pitr, verify, curl on
/health/ready, engram test --quick, export/import — runs exactly as the runbook says.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netutil import free_port

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
BIN = Path(sys.executable).parent
WAIT_READY = (
    'for i in $(seq 1 100); do curl -fsS "$ENGRAM_URL/health/ready" >/dev/null && exit 0; '
    "sleep 0.1; done; exit 1"
)


def _sections() -> dict[str, list[str]]:
    text = RUNBOOK.read_text()
    out: dict[str, list[str]] = {}
    current = "preamble"
    for part in re.split(r"^## ", text, flags=re.M):
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
