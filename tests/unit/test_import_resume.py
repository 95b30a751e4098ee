"""`engram import` keeps its help's promise: a batch is applied whole or not at all, and
`--skip-existing` / `--resume-from LINE` make a re-run safe; a re-run into a graph that already
had memories says which memories it created (a deleted one coming back is never silent)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engram.cli.main import app
from engram.datadir import init_data_dir

runner = CliRunner()


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


def okj(*args: str) -> Any:
    res = cli(*args, "--json")
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr)
    return json.loads(res.stdout)


def error(code: int, *args: str) -> str:
    res = cli(*args)
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture
def dd(tmp_path: Path) -> str:
    init_data_dir(tmp_path / "data")
    return str(tmp_path / "data")


def write(path: Path, ops: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in ops))
    return path


def mem(i: int, **extra: Any) -> dict[str, Any]:
    return {"op": "create_memory", "id": f"m{i}", "content": f"memory {i}", **extra}


def ids(dd: str) -> set[str]:
    res = cli("export", "--data-dir", dd, "-o", "-")
    assert res.exit_code == 0, res.stderr
    return {json.loads(line)["id"] for line in res.stdout.splitlines() if '"create_memory"' in line}


def test_a_bad_op_applies_nothing_of_its_batch(dd: str, tmp_path: Path) -> None:
    # Batches of 3: lines 1-3 apply; line 5 is bad, so lines 4-6 apply nothing (not even 4).
    ops = [mem(i) for i in range(1, 8)]
    ops[4] = mem(5, strength=7)
    f = write(tmp_path / "ops.jsonl", ops)
    msg = error(2, "import", "--data-dir", dd, "-f", str(f), "--batch-size", "3")
    assert msg.startswith("error: line 5: strength must be in [0, 1]"), msg
    assert "nothing of its batch (lines 4-6) was applied" in msg
    assert "3 ops before it were applied" in msg and "--resume-from 4" in msg
    assert ids(dd) == {"m1", "m2", "m3"}

    # Fixed, the file resumes at the line the message named and ends with every memory.
    ops[4] = mem(5)
    write(f, ops)
    res = okj("import", "--data-dir", dd, "-f", str(f), "--batch-size", "3", "--resume-from", "4")
    assert (res["ops"], res["batches"], res["created_memories"]) == (4, 2, 4)
    assert ids(dd) == {f"m{i}" for i in range(1, 8)}


def test_a_bad_json_line_applies_nothing_of_its_batch(dd: str, tmp_path: Path) -> None:
    f = tmp_path / "ops.jsonl"
    f.write_text("\n".join([json.dumps(mem(1)), json.dumps(mem(2)), "{oops"]) + "\n")
    msg = error(2, "import", "--data-dir", dd, "-f", str(f), "--batch-size", "10")
    assert "line 3: not valid JSON" in msg and "nothing of its batch (lines 1-3)" in msg
    assert "0 ops before it were applied" in msg and "--resume-from 1" in msg
    assert ids(dd) == set()


def test_one_op_before_is_said_in_the_singular(dd: str, tmp_path: Path) -> None:
    f = write(tmp_path / "ops.jsonl", [mem(1), {"op": "create_edge", "src": "m1", "dst": "x"}])
    msg = error(1, "import", "--data-dir", dd, "-f", str(f), "--batch-size", "1")
    assert "line 2:" in msg and "1 op before it was applied" in msg, msg


def test_skip_existing_makes_a_rerun_a_no_op(dd: str, tmp_path: Path) -> None:
    ops = [mem(1), mem(2), {"op": "create_edge", "src": "m1", "dst": "m2", "weight": 0.5}]
    f = write(tmp_path / "ops.jsonl", ops)
    okj("import", "--data-dir", dd, "-f", str(f))
    # Without --skip-existing a re-run fails on the first create of an existing memory.
    assert "m1 already exists" in error(1, "import", "--data-dir", dd, "-f", str(f))
    lsn = okj("stats", "--data-dir", dd)["lsn"]
    res = okj("import", "--data-dir", dd, "-f", str(f), "--skip-existing")
    assert (res["ops"], res["skipped"], res["created_memories"]) == (0, 3, 0)
    assert okj("stats", "--data-dir", dd)["lsn"] == lsn  # nothing written

    # One that exists with different fields is an error naming its line and field.
    write(f, [mem(3), {**mem(1), "content": "changed"}])
    msg = error(1, "import", "--data-dir", dd, "-f", str(f), "--skip-existing")
    assert "line 2: memory m1 already exists with a different content" in msg, msg
    write(f, [{"op": "create_edge", "src": "m1", "dst": "m2", "weight": 0.9}])
    msg = error(1, "import", "--data-dir", dd, "-f", str(f), "--skip-existing")
    assert "line 1: edge m1 -> m2 (related) already exists with a different weight" in msg, msg


def test_a_deleted_memory_coming_back_is_said(dd: str, tmp_path: Path) -> None:
    f = write(tmp_path / "ops.jsonl", [mem(1), mem(2), mem(3)])
    res = cli("import", "--data-dir", dd, "-f", str(f))
    assert res.exit_code == 0 and "note:" not in res.stderr  # an empty graph: nothing to say
    okj("delete", "--data-dir", dd, "--id", "m2")
    res = cli("import", "--data-dir", dd, "-f", str(f), "--skip-existing")
    assert res.exit_code == 0, res.stderr
    assert "imported 1 op in 1 batch, skipped 2 existing lines" in res.stdout, res.stdout
    assert "note: 1 memory did not exist before this import (m2)" in res.stderr, res.stderr
    assert "m2" in ids(dd)


def test_resume_from_skips_the_lines_before(dd: str, tmp_path: Path) -> None:
    f = write(tmp_path / "ops.jsonl", [mem(1), mem(2), mem(3)])
    res = okj("import", "--data-dir", dd, "-f", str(f), "--resume-from", "3")
    assert res["ops"] == 1 and ids(dd) == {"m3"}
    res = okj("import", "--data-dir", dd, "-f", str(f), "--resume-from", "9")
    assert res["ops"] == 0
    assert cli("import", "--data-dir", dd, "-f", str(f), "--resume-from", "0").exit_code == 2
