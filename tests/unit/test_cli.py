"""The CLI against a temp data dir: every command, its --json shape, exit codes and errors."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from engram.cli.main import app
from engram.client import EngramClient
from engram.datadir import DirLock, init_data_dir
from engram.errors import (
    Conflict,
    DataDirLocked,
    NotFound,
    Refused,
    RemoteError,
    Unavailable,
    ValidationError,
)
from engram.graph import EngineConfig
from netutil import free_port

runner = CliRunner()


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


def ok(*args: str) -> Any:
    res = cli(*args)
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr)
    return res


def okj(*args: str) -> Any:
    return json.loads(ok(*args, "--json").stdout)


def fails(code: int, *args: str) -> str:
    """Run, expect ``code``, and check the failure is one ``error:`` line without a traceback."""
    res = cli(*args)
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.fixture
def fresh(tmp_path: Path) -> str:
    """A data dir path where nothing exists yet."""
    return str(tmp_path / "data")


@pytest.fixture
def dd(fresh: str) -> str:
    """An initialized data dir (`engram init`): write commands refuse any other."""
    init_data_dir(Path(fresh))
    return fresh


def put(dd: str, mid: str, content: str, *extra: str) -> dict[str, Any]:
    return okj("put", "--data-dir", dd, "--id", mid, "--content", content, *extra)


# -- init, put, query ----------------------------------------------------------------------


def test_init_creates_and_is_repeatable(fresh: str) -> None:
    dd = fresh
    first = okj("init", "--data-dir", dd)
    assert first["created"] is True
    assert first["data_dir"] == dd
    assert len(first["database_id"]) == 36
    again = okj("init", "--data-dir", dd)
    assert again["created"] is False
    assert again["database_id"] == first["database_id"]
    text = ok("init", "--data-dir", dd).stdout
    assert first["database_id"] in text


def test_init_refuses_a_foreign_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "stuff.txt").write_text("x")
    msg = fails(1, "init", "--data-dir", str(tmp_path))
    assert "not empty" in msg


def test_put_and_query(dd: str) -> None:
    out = put(dd, "m1", "hello world", "--strength", "0.75", "--metadata", '{"k": [1, 2]}')
    assert out == {"id": "m1", "lsn": 1}
    m = okj("query", "--data-dir", dd, "--id", "m1")
    assert m["id"] == "m1"
    assert m["content"] == "hello world"
    assert m["strength"] == 0.75
    assert m["metadata"] == {"k": [1, 2]}
    assert m["activation_count"] == 0
    text = ok("query", "--data-dir", dd, "--id", "m1").stdout
    assert "hello world" in text and "m1" in text


def test_put_generates_an_id_and_prints_it(dd: str) -> None:
    text = ok("put", "--data-dir", dd, "--content", "anonymous").stdout
    assert "created memory" in text and "lsn 1" in text
    out = okj("put", "--data-dir", dd, "--content", "again")
    assert len(out["id"]) == 36 and out["lsn"] == 2


def test_content_with_markup_is_printed_verbatim(dd: str) -> None:
    put(dd, "m", "[bold]not markup[/bold]")
    assert "[bold]not markup[/bold]" in ok("query", "--data-dir", dd, "--id", "m").stdout


def test_query_missing_memory_exits_1(dd: str) -> None:
    ok("init", "--data-dir", dd)
    msg = fails(1, "query", "--data-dir", dd, "--id", "nope")
    assert "not found" in msg


def test_reads_do_not_create_a_data_dir(fresh: str) -> None:
    dd = fresh
    for args in (("query", "--id", "x"), ("stats",), ("recall", "x"), ("export", "-o", "-")):
        msg = fails(3, *args, "--data-dir", dd)
        assert "not an engram data dir" in msg
    assert not os.path.exists(dd)


def test_writes_need_an_initialized_data_dir(fresh: str) -> None:
    dd = fresh
    msg = fails(3, "put", "--data-dir", dd, "--content", "first", "--id", "a")
    assert "not an engram data dir" in msg and "engram init" in msg
    assert not os.path.exists(dd)
    ok("init", "--data-dir", dd)
    put(dd, "a", "first")
    assert okj("stats", "--data-dir", dd)["memories"] == 1


def test_data_dir_from_environment(dd: str) -> None:
    res = cli("put", "--content", "via env", "--id", "e", env={"ENGRAM_DATA_DIR": dd})
    assert res.exit_code == 0, res.stderr
    assert okj("query", "--data-dir", dd, "--id", "e")["content"] == "via env"


# -- usage errors (exit 2) and failures (exit 1) -----------------------------------------


@pytest.mark.parametrize("strength", ["1.5", "-0.1"])
def test_strength_out_of_range_exits_2(dd: str, strength: str) -> None:
    msg = fails(2, "put", "--data-dir", dd, "--content", "x", "--strength", strength)
    assert "strength must be in [0, 1]" in msg


def test_strength_not_a_number_exits_2(dd: str) -> None:
    msg = fails(2, "put", "--data-dir", dd, "--content", "x", "--strength", "abc")
    assert "--strength" in msg


@pytest.mark.parametrize(
    ("metadata", "expect"),
    [("{bad", "not valid JSON"), ("[1, 2]", "must be a JSON object")],
)
def test_bad_metadata_exits_2(dd: str, metadata: str, expect: str) -> None:
    msg = fails(2, "put", "--data-dir", dd, "--content", "x", "--metadata", metadata)
    assert expect in msg and "--metadata" in msg


def test_bad_id_exits_2(dd: str) -> None:
    msg = fails(2, "put", "--data-dir", dd, "--content", "x", "--id", "has space")
    assert "id must be" in msg
    assert "longer than 256" in fails(
        2, "put", "--data-dir", dd, "--content", "x", "--id", "a" * 300
    )


def test_duplicate_id_exits_1(dd: str) -> None:
    put(dd, "a", "one")
    assert "already exists" in fails(1, "put", "--data-dir", dd, "--content", "two", "--id", "a")


@pytest.mark.parametrize(
    "args",
    [
        ("bogus",),
        ("put",),
        ("put", "--content", "x", "--no-such-option"),
        ("neighbors", "--id", "a", "--depth", "4"),
        ("neighbors", "--id", "a", "--direction", "sideways"),
        ("recall", "x", "--limit", "0"),
        ("serve", "--durability", "sometimes"),
    ],
)
def test_usage_errors_exit_2_on_one_line(args: tuple[str, ...]) -> None:
    fails(2, *args)


def test_no_arguments_shows_help() -> None:
    res = cli()
    assert res.exit_code == 2
    assert "put" in res.stdout + res.stderr


def test_help_is_exit_0() -> None:
    res = cli("--help")
    assert res.exit_code == 0
    for name in ("init", "put", "link", "query", "import", "export", "serve", "mark"):
        assert name in res.stdout


def test_unexpected_error_is_one_line_and_debug_shows_traceback(
    dd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("engram.cli.reads.backend", boom)
    msg = fails(1, "stats", "--data-dir", dd)
    assert msg == "error: unexpected RuntimeError: boom (rerun with --debug for the traceback)"
    res = cli("stats", "--data-dir", dd, "--debug")
    assert res.exit_code == 1
    assert "Traceback" in res.stderr and "RuntimeError: boom" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: unexpected RuntimeError")


def test_keyboard_interrupt_exits_130(dd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("engram.cli.reads.backend", interrupted)
    assert fails(130, "stats", "--data-dir", dd) == "error: interrupted"


def test_debug_is_accepted_anywhere(dd: str) -> None:
    ok("--debug", "init", "--data-dir", dd)
    ok("stats", "--debug", "--data-dir", dd)


# -- edges, neighbors, delete, activate, recall, stats, mark -----------------------------


def test_link_neighbors_unlink(dd: str) -> None:
    put(dd, "a", "alpha")
    put(dd, "b", "beta")
    put(dd, "c", "gamma")
    out = okj("link", "--data-dir", dd, "--src", "a", "--dst", "b", "--weight", "0.5")
    assert out == {"src": "a", "dst": "b", "kind": "related", "lsn": 4}
    okj("link", "--data-dir", dd, "--src", "b", "--dst", "c", "--kind", "causes")

    got = okj("neighbors", "--data-dir", dd, "--id", "a")
    assert got["id"] == "a"
    assert [(n["depth"], n["memory"]["id"]) for n in got["neighbors"]] == [(1, "b")]
    assert got["neighbors"][0]["edge"]["weight"] == 0.5
    deep = okj("neighbors", "--data-dir", dd, "--id", "a", "--depth", "2", "--direction", "out")
    assert [(n["depth"], n["memory"]["id"]) for n in deep["neighbors"]] == [(1, "b"), (2, "c")]
    assert okj("neighbors", "--data-dir", dd, "--id", "a", "--direction", "in")["neighbors"] == []
    assert "beta" in ok("neighbors", "--data-dir", dd, "--id", "a").stdout

    out = okj("unlink", "--data-dir", dd, "--src", "a", "--dst", "b")
    assert out["src"] == "a" and out["dst"] == "b" and out["kind"] == "related"
    assert okj("neighbors", "--data-dir", dd, "--id", "a")["neighbors"] == []
    assert "does not exist" in fails(1, "unlink", "--data-dir", dd, "--src", "a", "--dst", "b")
    assert "no neighbors" in ok("neighbors", "--data-dir", dd, "--id", "a").stdout


def test_link_to_missing_memory_exits_1(dd: str) -> None:
    put(dd, "a", "alpha")
    msg = fails(1, "link", "--data-dir", dd, "--src", "a", "--dst", "ghost")
    assert "ghost does not exist" in msg


def test_delete_removes_edges(dd: str) -> None:
    put(dd, "a", "alpha")
    put(dd, "b", "beta")
    ok("link", "--data-dir", dd, "--src", "a", "--dst", "b")
    out = okj("delete", "--data-dir", dd, "--id", "a")
    assert out["id"] == "a" and out["edges_deleted"] == 1 and out["lsn"] > 0
    assert okj("stats", "--data-dir", dd)["edges"] == 0
    fails(1, "query", "--data-dir", dd, "--id", "a")
    assert "does not exist" in fails(1, "delete", "--data-dir", dd, "--id", "a")


def test_activate(dd: str) -> None:
    put(dd, "a", "alpha", "--strength", "0.2")
    out = okj("activate", "--data-dir", dd, "--id", "a", "--boost", "0.5")
    assert out["id"] == "a" and 0.69 < out["strength"] <= 0.7
    m = okj("query", "--data-dir", dd, "--id", "a")
    assert m["activation_count"] == 1 and m["last_activated_at"] is not None
    assert "boost" in fails(2, "activate", "--data-dir", dd, "--id", "a", "--boost", "2")
    assert "not" in fails(1, "activate", "--data-dir", dd, "--id", "ghost")


def test_recall(dd: str) -> None:
    put(dd, "a", "the quick brown fox")
    put(dd, "b", "a lazy dog sleeps")
    put(dd, "c", "unrelated words here")
    out = okj("recall", "--data-dir", dd, "fox")
    assert out["query"] == "fox"
    assert [r["id"] for r in out["results"]] == ["a"]
    assert out["results"][0]["matched"] is True and "score" in out["results"][0]
    assert "quick brown fox" in ok("recall", "--data-dir", dd, "fox").stdout
    assert okj("recall", "--data-dir", dd, "zebra")["results"] == []
    assert "nothing matches" in ok("recall", "--data-dir", dd, "zebra").stdout
    assert "query" in fails(2, "recall", "--data-dir", dd, "!!!")


def test_stats(dd: str) -> None:
    put(dd, "a", "alpha")
    put(dd, "b", "beta")
    ok("link", "--data-dir", dd, "--src", "a", "--dst", "b")
    s = okj("stats", "--data-dir", dd)
    assert s["memories"] == 2 and s["edges"] == 1 and s["lsn"] == 3
    assert len(s["digest"]) == 64 and set(s["tiers"]) >= {"fast", "warm"}
    text = ok("stats", "--data-dir", dd).stdout
    assert s["digest"] in text and "memories" in text


def test_mark(dd: str) -> None:
    put(dd, "a", "alpha")
    assert okj("mark", "--data-dir", dd, "before-upgrade") == {"name": "before-upgrade", "lsn": 2}
    assert "marked again at lsn 3" in ok("mark", "--data-dir", dd, "again").stdout
    assert "name" in fails(2, "mark", "--data-dir", dd, "bad name")


# -- import and export ---------------------------------------------------------------------


def _graph(dd: str) -> None:
    ok("init", "--data-dir", dd)
    put(dd, "a", "alpha", "--metadata", '{"tags": ["x"], "n": 1}')
    put(dd, "b", "beta ünïcode", "--strength", "0.9")
    put(dd, "c/with:slash@x", "gamma")
    ok("link", "--data-dir", dd, "--src", "a", "--dst", "b", "--weight", "0.25")
    ok("link", "--data-dir", dd, "--src", "b", "--dst", "c/with:slash@x", "--kind", "causes")
    ok("activate", "--data-dir", dd, "--id", "a")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_export_import_round_trip(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _graph(src)
    f1, f2 = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    out = okj("export", "--data-dir", src, "--output", str(f1))
    assert out["memories"] == 3 and out["edges"] == 2 and out["ops"] == 5
    assert out["sha256"] == _sha(f1) and out["bytes"] == f1.stat().st_size
    assert stat.S_IMODE(f1.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    ops = [json.loads(line) for line in f1.read_text().splitlines()]
    assert [o["op"] for o in ops] == ["create_memory"] * 3 + ["create_edge"] * 2

    ok("init", "--data-dir", dst)
    res = okj("import", "--data-dir", dst, "--file", str(f1))
    assert res["ops"] == 5 and res["batches"] == 1
    ok("export", "--data-dir", dst, "--output", str(f2))
    assert _sha(f1) == _sha(f2)
    s1, s2 = okj("stats", "--data-dir", src), okj("stats", "--data-dir", dst)
    assert (s1["memories"], s1["edges"]) == (s2["memories"], s2["edges"])
    assert (
        "exported 3 memories and 2 edges"
        in ok("export", "--data-dir", src, "-o", str(f2), "--force").stdout
    )


def test_export_to_stdout(dd: str) -> None:
    _graph(dd)
    res = ok("export", "--data-dir", dd, "--output", "-")
    lines = res.stdout.splitlines()
    assert len(lines) == 5 and all(json.loads(line)["op"] for line in lines)
    assert "exported 3 memories" in res.stderr


def test_export_refuses_an_existing_file_unless_forced(dd: str, tmp_path: Path) -> None:
    put(dd, "a", "alpha")
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    assert "already exists" in fails(3, "export", "--data-dir", dd, "-o", str(out))
    assert out.read_text() == "old\n"
    ok("export", "--data-dir", dd, "-o", str(out), "--force")
    assert json.loads(out.read_text())["id"] == "a"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    # Through a symlink, --force replaces the file it points to; the link stays a link.
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)
    out.write_text("old\n")
    assert "already exists" in fails(3, "export", "--data-dir", dd, "-o", str(link))
    ok("export", "--data-dir", dd, "-o", str(link), "--force")
    assert link.is_symlink() and json.loads(out.read_text())["id"] == "a"


def test_export_refuses_what_is_not_a_file(dd: str, tmp_path: Path) -> None:
    put(dd, "a", "alpha")
    assert "is a directory" in fails(2, "export", "--data-dir", dd, "-o", str(tmp_path))
    assert "is a directory" in fails(2, "export", "--data-dir", dd, "-o", str(tmp_path), "--force")
    sock_path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(sock_path))
        assert "is a socket" in fails(2, "export", "--data-dir", dd, "-o", str(sock_path))
    finally:
        sock.close()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert "symlink to nothing" in fails(2, "export", "--data-dir", dd, "-o", str(dangling))
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    missing = tmp_path / "no-such-dir" / "out.jsonl"
    assert "does not exist" in fails(2, "export", "--data-dir", dd, "-o", str(missing))


def test_export_writes_through_a_device_and_a_fifo(dd: str, tmp_path: Path) -> None:
    put(dd, "a", "alpha")
    res = ok("export", "--data-dir", dd, "-o", "/dev/null")
    assert "exported 1 memory and 0 edges" in res.stdout
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "to-pipe"
    link.symlink_to(fifo)
    got: list[bytes] = []

    def drain() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    import threading

    reader = threading.Thread(target=drain)
    reader.start()
    ok("export", "--data-dir", dd, "-o", str(link))
    reader.join(10)
    assert json.loads(got[0])["id"] == "a"
    assert link.is_symlink() and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "pipe", "to-pipe"]


def test_two_exports_to_one_new_name_one_wins(tmp_path: Path) -> None:
    """Both pass the check before the export; publishing never replaces, so the second to
    finish is refused and nothing of it remains."""
    import threading

    from engram.cli.transfer import _output, _output_kind

    out = tmp_path / "out.jsonl"
    kinds = [_output_kind(out, force=False) for _ in range(2)]
    assert kinds == ["new", "new"]
    barrier = threading.Barrier(2)
    results: list[str] = []

    def export(i: int) -> None:
        try:
            with _output(out, "new") as fh:
                fh.write(f"writer {i}\n".encode())
                barrier.wait()  # both temp files written before either is published
            results.append(f"won {i}")
        except Refused as e:
            results.append(e.message)

    threads = [threading.Thread(target=export, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if r.startswith("won")]
    assert len(won) == 1, results
    assert any("already exists" in r for r in results), results
    assert out.read_text() == f"writer {won[0].split()[1]}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_import_in_batches_with_progress_free_output(dd: str, tmp_path: Path) -> None:
    f = tmp_path / "ops.jsonl"
    ops = [{"op": "create_memory", "id": f"m{i}", "content": f"memory {i}"} for i in range(7)]
    ops.append({"op": "create_edge", "src": "m0", "dst": "m6"})
    f.write_text("\n".join(json.dumps(o) for o in ops) + "\n\n")
    res = okj("import", "--data-dir", dd, "--file", str(f), "--batch-size", "3")
    assert res == {"ops": 8, "batches": 3, "lsn": 8, "skipped": 0, "created_memories": 7}
    assert okj("stats", "--data-dir", dd)["edges"] == 1
    assert "imported 0 ops" in ok("import", "--data-dir", dd, "--file", os.devnull).stdout


def test_import_bad_json_line_names_it_and_what_was_applied(dd: str, tmp_path: Path) -> None:
    f = tmp_path / "ops.jsonl"
    good = [json.dumps({"op": "create_memory", "id": f"m{i}", "content": "x"}) for i in range(3)]
    f.write_text("\n".join([*good, "{not json", good[0]]) + "\n")
    msg = fails(2, "import", "--data-dir", dd, "--file", str(f), "--batch-size", "3")
    assert "line 4: not valid JSON" in msg
    assert "3 ops before it were applied" in msg and "from line 4" in msg
    assert okj("stats", "--data-dir", dd)["memories"] == 3


def test_import_bad_op_names_its_line(dd: str, tmp_path: Path) -> None:
    f = tmp_path / "ops.jsonl"
    lines = [
        {"op": "create_memory", "id": "a", "content": "x"},
        {"op": "create_memory", "id": "b", "content": "y"},
        {"op": "create_memory", "id": "c", "content": "z", "strength": 7},
        {"op": "create_memory", "id": "d", "content": "w"},
    ]
    f.write_text("\n".join(json.dumps(o) for o in lines) + "\n")
    msg = fails(2, "import", "--data-dir", dd, "--file", str(f), "--batch-size", "2")
    assert msg.startswith("error: line 3: strength must be in [0, 1]")
    assert "2 ops before it were applied" in msg
    assert okj("stats", "--data-dir", dd)["memories"] == 2  # a, b: the batch before the bad one

    f.write_text(json.dumps({"op": "create_edge", "src": "a", "dst": "ghost"}) + "\n")
    msg = fails(1, "import", "--data-dir", dd, "--file", str(f))
    assert "line 1:" in msg and "ghost does not exist" in msg and "0 ops before" in msg
    msg = fails(2, "import", "--data-dir", dd, "--file", str(tmp_path / "missing.jsonl"))
    assert "cannot read" in msg
    f.write_text("[1, 2]\n")
    assert "line 1: each line must be a JSON object" in fails(
        2, "import", "-f", str(f), "--data-dir", dd
    )


# -- ownership: another CLI, a server ----------------------------------------------------


def test_busy_data_dir_names_the_pid(dd: str) -> None:
    ok("init", "--data-dir", dd)
    lock = DirLock(Path(dd))
    lock.acquire()  # as another CLI process would: no URL
    try:
        msg = fails(1, "stats", "--data-dir", dd)
        assert f"pid {os.getpid()}" in msg and "not serving" in msg
    finally:
        lock.release()
    ok("stats", "--data-dir", dd)


def test_owned_by_a_server_goes_over_http(dd: str) -> None:
    ok("init", "--data-dir", dd)
    url = f"http://127.0.0.1:{free_port()}"
    lock = DirLock(Path(dd))
    lock.acquire(url)  # a "server" that is not listening
    try:
        msg = fails(1, "stats", "--data-dir", dd)
        assert f"cannot reach the engram server at {url}" in msg
        fails(1, "put", "--data-dir", dd, "--content", "x")
    finally:
        lock.release()


# -- serve ----------------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def fake_serve(**kw: Any) -> None:
        seen.update(kw)

    monkeypatch.setattr("engram.server.app.serve", fake_serve)
    monkeypatch.delenv("ENGRAM_TOKEN", raising=False)
    return seen


def test_serve_builds_the_config(served: dict[str, Any], dd: str, tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("  s3cret\n")
    tok.chmod(0o600)
    ok(
        "serve", "--data-dir", dd, "--host", "0.0.0.0", "--port", "9999", "--token-file", str(tok),
        "--durability", "batch", "--fast-tier-bytes", "1000", "--segment-bytes", "65536",
        "--checkpoint-interval", "2.5", "--half-life", "60", "--max-body", "2048",
    )  # fmt: skip
    assert served["data_dir"] == Path(dd)
    assert (served["host"], served["port"], served["token"]) == ("0.0.0.0", 9999, "s3cret")
    assert served["insecure"] is False and served["max_body"] == 2048
    cfg = served["engine_config"]
    assert cfg == EngineConfig(
        durability="batch",
        fast_tier_bytes=1000,
        segment_bytes=65536,
        checkpoint_interval=2.5,
        half_life_s=60.0,
    )


def test_serve_defaults_and_start_alias(served: dict[str, Any], dd: str) -> None:
    res = cli("start", "--data-dir", dd, "--insecure", env={"ENGRAM_TOKEN": "from-env"})
    assert res.exit_code == 0, res.stderr
    assert (served["host"], served["port"], served["token"]) == ("127.0.0.1", 8080, "from-env")
    assert served["insecure"] is True and served["engine_config"] == EngineConfig()


def test_serve_token_file_errors(served: dict[str, Any], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    assert "is empty" in fails(2, "serve", "--token-file", str(empty))
    assert "cannot read token file" in fails(2, "serve", "--token-file", str(tmp_path / "nope"))
    assert not served


def test_serve_warns_about_a_readable_token_file(served: dict[str, Any], tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("s3cret")
    tok.chmod(0o644)
    res = cli("serve", "--token-file", str(tok))
    assert res.exit_code == 0 and served["token"] == "s3cret"
    assert "readable by other users" in res.stderr and "s3cret" not in res.stderr


def test_serve_help_documents_durability() -> None:
    res = cli("serve", "--help")
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    for word in ("sync", "batch", "none", "fsync"):
        assert word in text


# -- the HTTP client's error mapping -------------------------------------------------------


def _client(status: int, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers=headers or {})

    return EngramClient("http://127.0.0.1:1", transport=httpx.MockTransport(handler), **kw)


@pytest.mark.parametrize(
    ("status", "body", "cls", "exit_code"),
    [
        (404, {"error": "not_found", "message": "memory x not found", "field": "id"}, NotFound, 1),
        (
            400,
            {"error": "invalid", "message": "strength bad", "field": "strength"},
            ValidationError,
            2,
        ),
        (409, {"error": "conflict", "message": "exists"}, Conflict, 1),
        (503, {"error": "unavailable", "message": "starting", "retry_after": 2}, Unavailable, 1),
        (409, {"error": "locked", "message": "in use", "pid": 7, "url": None}, DataDirLocked, 1),
        (413, {"error": "too_large", "message": "body over 16 MiB"}, RemoteError, 1),
        (502, b"<html>bad gateway</html>", RemoteError, 1),
    ],
)
def test_client_maps_error_bodies(status: int, body: Any, cls: type, exit_code: int) -> None:
    with _client(status, body) as c, pytest.raises(cls) as info:
        c.stats()
    err = info.value
    assert err.exit_code == exit_code
    if isinstance(body, dict):
        assert err.message == body["message"]
    if isinstance(err, ValidationError) and isinstance(body, dict):
        assert err.field == body.get("field")
    if isinstance(err, Unavailable):
        assert err.retry_after == 2
    if isinstance(err, DataDirLocked):
        assert err.pid == 7


def test_client_401_says_how_to_pass_a_token() -> None:
    body = {"error": "unauthorized", "message": "missing or wrong bearer token"}
    with _client(401, body) as c, pytest.raises(RemoteError, match="--token-file"):
        c.stats()
    with _client(401, body, token="t") as c, pytest.raises(RemoteError, match="check the token"):
        c.stats()


def test_client_sends_the_token_and_quotes_ids() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "a/b"})

    with EngramClient("http://0.0.0.0:5", "tok", transport=httpx.MockTransport(handler)) as c:
        assert c.url == "http://127.0.0.1:5"
        c.get_memory("a/b:c")
    assert seen[0].headers["authorization"] == "Bearer tok"
    assert seen[0].url.raw_path == b"/v1/memories/a%2Fb%3Ac"


def test_client_connection_refused_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with EngramClient(url) as c, pytest.raises(RemoteError, match=f"cannot reach .* at {url}"):
        c.stats()
