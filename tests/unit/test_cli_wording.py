"""The CLI's text output says counts and ranges right: "1 edge" / "2 edges", "1 record", and an
empty range as "no records" or "nothing to apply", never a backwards range like "LSN 5..4"."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engram.cli.common import lsn_range, plural
from engram.cli.main import app
from engram.datadir import init_data_dir

runner = CliRunner()
BACKWARDS = re.compile(r"(\d+)\.\.(\d+)")


def ok(*args: str) -> Any:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr)
    for a, b in BACKWARDS.findall(res.stdout + res.stderr):
        assert int(a) <= int(b), res.stdout  # no range is printed backwards
    return res


@pytest.mark.parametrize(
    ("n", "word", "said"),
    [
        (0, "edge", "0 edges"),
        (1, "edge", "1 edge"),
        (2, "edge", "2 edges"),
        (1, "memory", "1 memory"),
        (3, "memory", "3 memories"),
        (2, "batch", "2 batches"),
        (1, "batch", "1 batch"),
        (2, "day", "2 days"),
        (2, "index", "2 indexes"),
        (2, "child", "2 children"),
    ],
)
def test_plural(n: int, word: str, said: str) -> None:
    many = "children" if word == "child" else None
    assert plural(n, word, many) == said


def test_lsn_range_never_backwards() -> None:
    assert lsn_range(5, 4) == "no records"
    assert lsn_range(5, 1) == "no records"
    assert lsn_range(5, 5) == "1 record (LSN 5)"
    assert lsn_range(5, 7) == "3 records (LSN 5..7)"
    assert lsn_range(1, 2, "op") == "2 ops (LSN 1..2)"


@pytest.fixture
def dd(tmp_path: Path) -> str:
    init_data_dir(tmp_path / "data")
    return str(tmp_path / "data")


def test_commands_say_one_and_many(dd: str, tmp_path: Path) -> None:
    ok("put", "--data-dir", dd, "--id", "a", "--content", "alpha")
    ok("put", "--data-dir", dd, "--id", "b", "--content", "beta")
    ok("link", "--data-dir", dd, "--src", "a", "--dst", "b")
    out = ok("export", "--data-dir", dd, "-o", str(tmp_path / "one.jsonl")).stdout
    assert "exported 2 memories and 1 edge as of LSN 3" in out, out
    assert "deleted memory b and 1 edge" in ok("delete", "--data-dir", dd, "--id", "b").stdout
    out = ok("export", "--data-dir", dd, "-o", str(tmp_path / "two.jsonl")).stdout
    assert "exported 1 memory and 0 edges" in out, out
    assert "deleted memory a and 0 edges" in ok("delete", "--data-dir", dd, "--id", "a").stdout
    out = ok("status", "--data-dir", dd).stdout
    assert "0 memories, 0 edges" in out, out


def test_an_incremental_and_apply_log_say_their_range(dd: str, tmp_path: Path) -> None:
    ok("put", "--data-dir", dd, "--id", "a", "--content", "alpha")
    log = tmp_path / "inc.log"
    out = ok(
        "backup",
        "--data-dir",
        dd,
        "--incremental",
        "--since-lsn",
        "1",
        "-o",
        str(log),
        "--no-validate",
    ).stdout
    assert "1 record (LSN 1)" in out, out
    # Every record of the log is in the data dir already: nothing to apply, no "LSN 2..1".
    out = ok("apply-log", "--data-dir", dd, "--log", str(log)).stdout
    assert "applied 0 records" in out and "nothing to apply (it is at LSN 1)" in out, out
    ok("put", "--data-dir", dd, "--id", "b", "--content", "beta")
    ok("put", "--data-dir", dd, "--id", "c", "--content", "gamma")
    log2 = tmp_path / "inc2.log"
    out = ok(
        "backup",
        "--data-dir",
        dd,
        "--incremental",
        "--since-lsn",
        "2",
        "-o",
        str(log2),
        "--no-validate",
    ).stdout
    assert "2 records (LSN 2..3)" in out, out


def test_validating_an_empty_incremental_says_no_records(dd: str, tmp_path: Path) -> None:
    """An incremental that holds nothing (nothing written since the last backup) validates and
    says so, never as a backwards range like "LSN 8..7"."""
    ok("put", "--data-dir", dd, "--id", "a", "--content", "alpha")
    repo = tmp_path / "repo"
    repo.mkdir()
    ok("backup", "--data-dir", dd, "--full", "-o", str(repo / "full.tar.zst"), "--no-validate")
    ok("backup", "--data-dir", dd, "--incremental", "-o", str(repo / "inc.log"), "--no-validate")
    out = ok("validate-backup", str(repo / "inc.log"), "--level", "2").stdout
    assert "no records (nothing after LSN 1)" in out and "LSN 2..1" not in out, out
