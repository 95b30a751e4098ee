"""Backups through a server are streamed to the client that writes them (issue 8, items 1, 3
and 4; docs/FORMAT.md "Backup stream").

Through a real server: the stream's frames, size and sha256; the server never writes a file at
a path a client names (without --backup-dir an ``output`` is refused; with it, only a new plain
file inside the directory, never outside, through a symlink, ``..``, NUL, an overlong name or an
existing path); every numeric field range-checked with a 400 naming it; two backups to one name
through the server, one winner; a client that disconnects mid-stream stops the backup, its worker
is killed and reaped, and the cut is released (the server then stops promptly, which it cannot do
while a cut is held). On the client side, a stream that is cut off, lies about its bytes or ends
in an error leaves nothing at PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverproc import ServerProcess

from engram.backend import RemoteBackend
from engram.backup.request import BackupRequest
from engram.backup.restore import restore
from engram.backup.validate import validate_backup
from engram.client import EngramClient
from engram.errors import EngramError, Refused, RemoteError
from engram.format import stream as bs

ENGRAM = str(Path(sys.executable).with_name("engram"))


def _fill(srv: ServerProcess, n: int, size: int, prefix: str = "m") -> None:
    with srv.client() as c:
        for i in range(0, n, 20):
            ops = [{"op": "create_memory", "id": f"{prefix}{j}", "content": os.urandom(size).hex()}
                   for j in range(i, min(n, i + 20))]
            assert c.post("/v1/batch", json={"ops": ops}).status_code == 200


def _frames(raw: bytes) -> list[tuple[int, bytes]]:
    dec = bs.Decoder()
    out = list(dec.feed(raw))
    dec.finish()
    return out


def test_a_streamed_backup_is_its_frames(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "data")
    _fill(srv, 100, 3000)
    with srv.client() as c:
        lsn = c.get("/v1/stats").json()["lsn"]
    for body in ({"kind": "full"}, {"kind": "full", "priority": "normal", "compression": "gzip"},
                 {"kind": "incremental", "since_lsn": 1}):
        with srv.client(timeout=60) as c:
            r = c.post("/v1/admin/backup", json=body)
        assert r.status_code == 200 and r.headers["content-type"] == bs.CONTENT_TYPE.decode()
        frames = _frames(r.content)
        data = b"".join(p for k, p in frames if k == bs.DATA)
        kinds = [k for k, _ in frames]
        assert kinds[-1] == bs.RESULT and bs.ERROR not in kinds, kinds
        res = json.loads(frames[-1][1])
        assert "path" not in res and "sidecar" not in res  # the server names no file
        assert res["size"] == len(data) and res["sha256"] == hashlib.sha256(data).hexdigest()
        assert res["kind"] == body["kind"] and res["snapshot_lsn"] == lsn
        if body["kind"] == "full":
            assert bs.PROGRESS in kinds
            assert res["priority"] == body.get("priority", "low")
            assert "snapshot_time_ns" in res["catalog"]
    assert not list(tmp_path.rglob("*.tar.*")) and not list(tmp_path.rglob("*.log.*"))


def test_the_cli_writes_a_streamed_backup_and_restores_it(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "data")
    _fill(srv, 60, 1000)
    bk = tmp_path / "bk"
    bk.mkdir()
    p = _engram("backup", "--full", f"--output={bk}/full.tar.zst", "--level=3",
                "--data-dir", str(srv.data_dir), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["validation"]["ok"] and res["path"] == str(bk / "full.tar.zst")
    _fill(srv, 20, 100, prefix="later")
    p = _engram("backup", "--incremental", f"--output={bk}/inc.log", "--level=2",
                "--data-dir", str(srv.data_dir), "--json")
    assert p.returncode == 0, p.stderr
    inc = json.loads(p.stdout)
    # The CLI read its directory and asked for a range that continues the full backup.
    assert inc["from_lsn"] == res["snapshot_lsn"] + 1 and inc["validation"]["ok"]
    info = json.loads((bk / "inc.log.info.json").read_text())
    assert info["parent"] == "full.tar.zst" and info["sha256"] == inc["sha256"]
    r = restore(bk / "full.tar.zst", tmp_path / "restored")
    assert (r.snapshot_lsn, r.digest) == (res["snapshot_lsn"], res["digest"])


def _engram(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    return subprocess.run([ENGRAM, *args], capture_output=True, text=True, env=env, timeout=180)


# -- two backups to one name -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_two_cli_backups_to_one_name_through_a_server(
    start_server: Callable[..., ServerProcess], tmp_path: Path, kind: str
) -> None:
    srv = start_server(tmp_path / "data")
    _fill(srv, 400, 2000)
    bk = tmp_path / "bk"
    bk.mkdir()
    out = bk / ("full.tar.zst" if kind == "full" else "inc.log")
    extra = ("--since-lsn=1",) if kind == "incremental" else ()
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    args = [ENGRAM, "backup", f"--{kind}", f"--output={out}", *extra, "--no-validate",
            "--data-dir", str(srv.data_dir), "--json"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    done = [(p.wait(120), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in done) == [0, 3], done
    (err,) = [e for rc, _, e in done if rc]
    assert err.strip().splitlines() == [
        f"error: {out} already exists; choose a new name (backups are never overwritten)"
    ]
    (win,) = [json.loads(o) for rc, o, _ in done if rc == 0]
    assert sorted(os.listdir(bk)) == sorted([out.name, out.name + ".sha256",
                                             out.name + ".info.json"])
    assert hashlib.sha256(out.read_bytes()).hexdigest() == win["sha256"]
    assert validate_backup(out, level=3 if kind == "full" else 2, record=False).ok


def test_two_streams_racing_at_publish_have_one_winner(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Both streams are held at a barrier until both are receiving, so both passed the early
    check: the name is decided by the no-replace publish, and the loser removes only its own."""
    srv = start_server(tmp_path / "data")
    _fill(srv, 200, 2000)
    bk = tmp_path / "bk"
    bk.mkdir()
    out = bk / "full.tar.zst"
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def one(k: int) -> None:
        waited = [False]

        def progress(done: int, total: int) -> None:
            if not waited[0]:
                waited[0] = True
                barrier.wait(timeout=60)

        assert srv.url is not None
        with EngramClient(srv.url) as client:
            try:
                results[k] = RemoteBackend(client).backup(BackupRequest("full", str(out)), progress)
            except EngramError as e:
                results[k] = e

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wins = [r for r in results if isinstance(r, dict)]
    losses = [r for r in results if isinstance(r, Refused)]
    assert len(wins) == 1 and len(losses) == 1, results
    assert "already exists; choose a new name" in losses[0].message
    assert sorted(os.listdir(bk)) == ["full.tar.zst", "full.tar.zst.info.json",
                                      "full.tar.zst.sha256"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == wins[0]["sha256"]
    assert validate_backup(out, level=3, record=False).ok


# -- a client that goes away ---------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def test_a_client_that_disconnects_stops_the_backup(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "data")
    _fill(srv, 300, 40_000)  # ~24 MB of incompressible warm tier
    body = {"kind": "full", "priority": "low", "cpu_share": 0.05}
    with srv.client(timeout=60) as c, c.stream("POST", "/v1/admin/backup", json=body) as r:
        assert r.status_code == 200
        it = r.iter_raw()
        got = 0
        while got < 64 << 10:
            got += len(next(it))
        workers = _children(srv.pid)
        assert workers, "no backup worker was running mid-stream"
    # The connection is closed: the worker is killed and reaped, the cut released.
    deadline = time.monotonic() + 15
    while _children(srv.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children(srv.pid) == [], "the backup worker outlived its client"
    with srv.client() as c:  # the server goes on, and takes another backup
        assert c.post("/v1/memories", json={"content": "after"}).status_code == 201
        again = c.post("/v1/admin/backup", json={"kind": "incremental", "since_lsn": 1})
        assert _frames(again.content)[-1][0] == bs.RESULT
    t0 = time.monotonic()
    assert srv.stop(timeout=20) == 0  # closing waits for every cut: none is held
    assert time.monotonic() - t0 < 15


# -- the route's fields ----------------------------------------------------------------------


def _refused(c: httpx.Client, body: dict[str, Any] | bytes, field: str, needle: str = "") -> None:
    if isinstance(body, bytes):
        r = c.post("/v1/admin/backup", content=body,
                   headers={"content-type": "application/json"})
    else:
        r = c.post("/v1/admin/backup", json=body)
    assert r.status_code == 400, (body, r.status_code, r.text[:300])
    j = r.json()
    assert j["field"] == field and "\n" not in j["message"], (body, j)
    assert needle in j["message"], (body, j)


def test_numeric_fields_are_range_checked(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "data")
    _fill(srv, 5, 10)
    huge = b"1" + b"0" * 30
    with srv.client() as c:
        for v in (1e300, -1e300, 0, -1, 10 * 366 * 86400.0):
            _refused(c, {"kind": "incremental", "since_s": v}, "since_s", "since_s must be")
        _refused(c, b'{"kind": "incremental", "since_s": ' + huge + b"}", "since_s")
        for name in ("since_lsn", "start_by_lsn"):
            for v in (0, -5, 2**63):
                _refused(c, {"kind": "incremental", name: v}, name, f"{name} must be an LSN")
            _refused(c, b'{"kind": "incremental", "%s": %s}' % (name.encode(), huge), name)
            _refused(c, {"kind": "incremental", name: 1.5}, name)
        for v in (1e300, -1e300, 0.0):
            _refused(c, {"kind": "full", "cpu_share": v}, "cpu_share", "from 0.05 to 1")
        _refused(c, b'{"kind": "full", "cpu_share": ' + huge + b"}", "cpu_share")
        r = c.post("/v1/admin/backup", content=b'{"kind": "full", "cpu_share": NaN}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 400
        for bad in ("a/b", "x\0y", "n" * 300, ".."):
            _refused(c, {"kind": "incremental", "since_lsn": 1, "parent": bad}, "parent")
        _refused(c, {"kind": "full", "compression": "lz4"}, "compression")
        _refused(c, {"kind": "full", "since_lsn": 3}, "since_lsn")
        _refused(c, {"kind": "incremental"}, "since_s")
        _refused(c, {"kind": "snapshot"}, "kind")
        # A valid one still works after all of that.
        r = c.post("/v1/admin/backup", json={"kind": "incremental", "since_s": 3600})
        assert r.status_code == 200 and _frames(r.content)[-1][0] == bs.RESULT


def test_the_server_writes_no_file_a_client_names(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    srv = start_server(tmp_path / "data")
    with srv.client() as c:
        for out in (str(outside / "x.tar.zst"), str(tmp_path / ".ssh" / "authorized_keys")):
            _refused(c, {"kind": "full", "output": out}, "output", "writes no backup files")
    srv.stop()
    bk = tmp_path / "bk"
    (bk / "sub").mkdir(parents=True)
    (bk / "escape").symlink_to(outside)
    (bk / "taken.tar.zst").write_bytes(b"earlier")
    srv = start_server(tmp_path / "data", extra_args=("--backup-dir", str(bk)))
    with srv.client() as c:
        refusals = [
            (str(outside / "x.tar.zst"), "inside a backup directory"),
            (str(bk / "escape" / "x.tar.zst"), "inside a backup directory"),
            (f"{bk}/sub/../../outside/x.tar.zst", "'..'"),
            (str(bk / "x\0.tar.zst"), "NUL"),
            (str(bk / ("n" * 5000 + ".tar.zst")), "bytes"),
            ("/" + "d/" * 2100 + "x.tar.zst", "longer than 4096"),
            ("x.tar.zst", "absolute"),
            (str(bk / "x.zip"), ".tar.zst"),
        ]
        for out, needle in refusals:
            _refused(c, {"kind": "full", "output": out}, "output", needle)
        _refused(c, {"kind": "full", "output": 5}, "output")
        # An existing name is refused because of state (409), not as a bad request.
        r = c.post("/v1/admin/backup", json={"kind": "full", "output": str(bk / "taken.tar.zst")})
        assert r.status_code == 409 and r.json()["field"] == "output", r.text
        assert "already exists" in r.json()["message"], r.text
        assert sorted(os.listdir(outside)) == []
        assert (bk / "taken.tar.zst").read_bytes() == b"earlier"
        new = str(bk / "sub" / "n.tar.zst")
        r = c.post("/v1/admin/backup", json={"kind": "full", "output": new})
        assert r.status_code == 200, r.text
        assert r.json()["path"] == str((bk / "sub" / "n.tar.zst").resolve())
    assert sorted(os.listdir(bk / "sub")) == ["n.tar.zst", "n.tar.zst.info.json",
                                             "n.tar.zst.sha256"]


# -- the client's side: a stream it must not trust ------------------------------------------


def _answer(frames: bytes, ctype: bytes = bs.CONTENT_TYPE) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": ctype.decode()},
                              content=bs.preamble() + frames)

    return httpx.MockTransport(handler)


@pytest.fixture
def bk(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "bk"
    d.mkdir()
    yield d


def test_the_client_keeps_nothing_of_a_bad_stream(bk: Path) -> None:
    data = os.urandom(5000)
    good = {"kind": "full", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "catalog": {}}
    cases: list[tuple[bytes, type[EngramError], str]] = [
        (bs.frame(bs.DATA, data), RemoteError, "cut off before its result"),
        (bs.frame(bs.DATA, data[:100]), RemoteError, "cut off"),
        (bs.frame(bs.DATA, data) + bs.json_frame(bs.RESULT, good | {"size": 4999}),
         EngramError, "is not what the server sent"),
        (bs.frame(bs.DATA, data[:-1] + b"x") + bs.json_frame(bs.RESULT, good),
         EngramError, "is not what the server sent"),
        (bs.frame(bs.DATA, data) + bs.json_frame(bs.ERROR, {"error": "backup_failed",
                                                             "message": "the worker died"}),
         EngramError, "the worker died"),
        (bs.frame(bs.DATA, data) + bs.json_frame(bs.RESULT, good) + b"\x01", RemoteError,
         "after its last frame"),
        (b"\x09\x00\x00\x00\x00", RemoteError, "unknown type"),
    ]
    for frames, cls, needle in cases:
        with EngramClient("http://127.0.0.1:9", transport=_answer(frames)) as client:
            with pytest.raises(cls) as ei:
                RemoteBackend(client).backup(BackupRequest("full", str(bk / "b.tar.zst")))
        assert needle in ei.value.message, (needle, ei.value.message)
        assert os.listdir(bk) == [], os.listdir(bk)
    with EngramClient("http://127.0.0.1:9", transport=_answer(b"", b"application/json")) as c:
        with pytest.raises(RemoteError, match="did not answer with a backup stream"):
            RemoteBackend(c).backup(BackupRequest("full", str(bk / "b.tar.zst")))
    # And the same frames, whole and true, are published.
    frames = bs.frame(bs.DATA, data) + bs.json_frame(bs.RESULT, good)
    with EngramClient("http://127.0.0.1:9", transport=_answer(frames)) as client:
        res = RemoteBackend(client).backup(BackupRequest("full", str(bk / "b.tar.zst")))
    assert (bk / "b.tar.zst").read_bytes() == data and res["path"] == str(bk / "b.tar.zst")
