"""The repository verbs as an operator runs them (issue 10, item 3): `engram backups --repo`,
`engram restore --repo --latest | --backup ID`, a repository copied elsewhere, `sha256sum -c`,
and validate-backup and restore agreeing on an archive without its sidecar — all through the
real `engram` command, in bash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent


def run(cwd: Path, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", ENGRAM_DATA_DIR=str(cwd / "data"))
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


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir and a repository: full-1, inc-1, full-2 (validated), full-3 (validation
    skipped)."""
    w = tmp_path_factory.mktemp("repo-cli")
    run(
        w,
        """
        R=$PWD/repo; mkdir -p $R; engram init >/dev/null
        engram put --id a --content one >/dev/null
        engram backup --full --output=$R/full-1.tar.zst --no-validate >/dev/null
        engram put --id b --content two >/dev/null
        engram backup --incremental --output=$R/inc-1.log --no-validate >/dev/null
        engram backup --full --output=$R/full-2.tar.zst --level=2 >/dev/null
        engram put --id c --content three >/dev/null
        engram backup --full --output=$R/full-3.tar.zst --no-validate >/dev/null
        """,
    )
    return w


def fresh(site: Path, tmp_path: Path) -> Path:
    """A private copy of the site's repository (a test may damage it)."""
    shutil.copytree(site / "repo", tmp_path / "repo")
    return tmp_path


def test_backups_lists_every_backup_and_flags_what_is_not_good(
    site: Path, tmp_path: Path
) -> None:
    w = fresh(site, tmp_path)
    out = json.loads(run(w, "engram backups --repo repo --json").stdout)
    got = {b["id"]: b for b in out["backups"]}
    assert list(got) == ["full-1.tar.zst", "full-2.tar.zst", "inc-1.log", "full-3.tar.zst"]
    assert (got["full-2.tar.zst"]["validation"], got["full-2.tar.zst"]["flags"]) == ("passed", [])
    assert got["full-3.tar.zst"]["flags"] == ["unvalidated"]
    assert (got["inc-1.log"]["from_lsn"], got["inc-1.log"]["to_lsn"]) == (2, 2)
    assert got["inc-1.log"]["parent"] == "full-1.tar.zst"
    assert all(b["size"] > 0 and b["age_s"] >= 0 for b in out["backups"])
    (w / "repo" / "full-1.tar.zst.info.json").write_text("{}")
    text = run(w, "engram backups --repo repo").stdout
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["ID", "KIND", "HISTORY", "LSN"]
    row = next(ln for ln in lines if ln.startswith("full-1.tar.zst "))
    assert row.rstrip().endswith("damaged")
    assert "1 not usable" in text and "full-1.tar.zst: its catalog entry is not trusted" in text
    assert "newest usable full backup (restore --latest): full-3.tar.zst" in text
    p = run(w, "engram backups --repo nowhere", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: nowhere is not a directory")


def test_restore_latest_falls_back_and_says_why(site: Path, tmp_path: Path) -> None:
    w = fresh(site, tmp_path)
    run(w, "python3 -c \"import sys; p='repo/full-3.tar.zst'; b=bytearray(open(p,'rb').read()); "
           "b[len(b)//2]^=255; open(p,'wb').write(b)\"")
    p = run(w, "engram restore --repo repo --latest --to restored")
    assert p.stdout.startswith(f"chose full-2.tar.zst in {w / 'repo'}\n"), p.stdout
    assert "  skipped full-3.tar.zst: the restore refused it: checksum mismatch" in p.stdout
    q = run(w, "engram query --id b --data-dir restored --json")
    assert json.loads(q.stdout)["content"] == "two"
    p = run(w, "engram restore --repo repo --backup full-1.tar.zst --to one --json")
    j: dict[str, Any] = json.loads(p.stdout)
    assert (j["backup"], j["snapshot_lsn"], j["skipped"]) == ("full-1.tar.zst", 1, [])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ("--to x", "give --from ARCHIVE, or --repo DIR with --latest or --backup ID"),
        ("--repo repo --to x", "with --repo, give exactly one of --latest or --backup ID"),
        ("--repo repo --latest --backup full-1.tar.zst --to x", "exactly one of --latest"),
        ("--from repo/full-1.tar.zst --latest --to x", "--latest and --backup choose from"),
        ("--repo repo --backup inc-1.log --to x", "inc-1.log is an incremental backup"),
        ("--repo repo --backup nope --to x", "no backup named 'nope' in"),
    ],
)
def test_restore_option_errors(site: Path, args: str, needle: str) -> None:
    p = run(site, f"engram restore {args}", check=False)
    assert p.returncode == 2 and needle in p.stderr, p.stderr
    assert not (site / "x").exists()


def test_a_copied_repository_restores_where_it_lands(site: Path, tmp_path: Path) -> None:
    w = fresh(site, tmp_path)
    run(w, "mkdir -p far && mv repo far/copy")
    p = run(w, "engram restore --repo far/copy --latest --to restored")
    assert p.stdout.startswith(f"chose full-3.tar.zst in {w / 'far' / 'copy'}\n")
    assert "sidecar checked" in p.stdout
    run(w, "engram restore-pitr --repo far/copy --target-lsn 2 --output pitr")
    assert json.loads(run(w, "engram stats --data-dir pitr --json").stdout)["lsn"] == 2


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs GNU sha256sum")
def test_sha256sum_checks_the_sidecars(site: Path) -> None:
    p = run(site, "cd repo && sha256sum -c *.sha256")
    assert p.stdout.count(": OK") == 4, p.stdout


def test_validate_backup_and_restore_agree_without_a_sidecar(site: Path, tmp_path: Path) -> None:
    w = fresh(site, tmp_path)
    run(w, "rm repo/full-2.tar.zst.sha256")
    said = (
        "sidecar absent: full-2.tar.zst.sha256 is missing, so the archive's own checksums and "
        "its manifest were checked instead"
    )
    v = run(w, "engram validate-backup repo/full-2.tar.zst --level=3")
    assert f"WARNING: {said}" in v.stdout and v.stdout.rstrip().endswith("PASS")
    r = run(w, "engram restore --from repo/full-2.tar.zst --to restored")
    assert f"WARNING: {said}" in r.stdout and "sidecar absent" in r.stdout
    run(w, "python3 -c \"import sys; p='repo/full-2.tar.zst'; b=bytearray(open(p,'rb').read()); "
           "b[len(b)//2]^=255; open(p,'wb').write(b)\"")
    v = run(w, "engram validate-backup repo/full-2.tar.zst --level=3", check=False)
    r = run(w, "engram restore --from repo/full-2.tar.zst --to again", check=False)
    assert v.returncode == 1 and r.returncode == 1, (v.stdout, r.stderr)
