"""Online backups under concurrent writes, and quiesce/resume (issue 3, items 1-3).

A backup taken while writers keep going must restore to exactly its snapshot LSN: the state
there is reconstructed independently by folding the source's own op log (after images, digest
``- hash(before) + hash(after)``) up to that LSN, and cross-checked against what each writer was
acknowledged (every writer owns its ids, so its acknowledged ops in order are its truth).
In process (threads calling ``engine.apply``) and through a real server (HTTP writers, the
backup taken by ``engram backup`` through the server).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from serverproc import ServerProcess

from engram import digest as dg
from engram.backup.full import full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.pitr import Target, restore_pitr
from engram.backup.restore import restore
from engram.backup.verify import verify_data_dir
from engram.datadir import read_identity
from engram.graph import Engine, EngineConfig
from engram.model import EDGE_OPS, MEMORY_OPS, parse_edge_target
from engram.oplog.reader import iter_log_files, list_segments, read_header

ENGRAM = str(Path(sys.executable).with_name("engram"))
# Checkpoints run often (the cut must cope with a moving warm tier); segments rotate often.
CFG = EngineConfig(segment_bytes=32 << 10, checkpoint_interval=0.05)


# -- the truth at an LSN, from the source's own log ------------------------------------------


@dataclass
class State:
    lsn: int
    digest: str
    mems: dict[str, tuple] = field(default_factory=dict)
    edges: dict[tuple[str, str, str], tuple] = field(default_factory=dict)


def fold_log(root: Path, upto: int) -> State:
    """The graph after LSN ``upto``, by folding every record of the data dir's log."""
    db = read_identity(root).database_id
    files = [p for _, p in list_segments(root / "oplog")]
    st = State(0, "")
    d = dg.Digest()
    for rec in iter_log_files(files, db, 0, torn_tail_last=True):
        if rec.lsn > upto:
            break
        st.lsn = rec.lsn
        before, after = rec.decode_before(), rec.decode_after()
        if rec.op in MEMORY_OPS:
            d.replace(before, after)
            if after is None:
                st.mems.pop(rec.target)
            else:
                st.mems[rec.target] = msgspec.structs.astuple(after)
        elif rec.op in EDGE_OPS:
            d.replace(before, after)
            key = parse_edge_target(rec.target)
            if after is None:
                st.edges.pop(key)
            else:
                st.edges[key] = msgspec.structs.astuple(after)
    assert st.lsn == upto, f"the source log ends at {st.lsn}, before {upto}"
    st.digest = d.hex
    return st


def export(root: Path) -> State:
    eng = Engine.open(root, EngineConfig(checkpoint_interval=3600), create=False)
    try:
        return State(
            eng.last_lsn,
            eng.digest.hex,
            {m.id: msgspec.structs.astuple(m) for m in eng.iter_memories()},
            {e.key(): msgspec.structs.astuple(e) for e in eng.iter_edges()},
        )
    finally:
        eng.close()


# -- writers that own their ids ----------------------------------------------------------------


class Writer:
    """Random valid batches on ids only this writer touches; records what was acknowledged."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = random.Random(seed)
        self.alive: list[str] = []
        self.edges: set[tuple[str, str, str]] = set()
        self.n = 0
        self.acked: list[tuple[int, list[dict[str, Any]]]] = []
        self.errors: list[str] = []

    def batch(self) -> list[dict[str, Any]]:
        r = self.rng
        ops: list[dict[str, Any]] = []
        for _ in range(r.choice((1, 1, 2, 3))):
            k = r.random()
            if not self.alive or k < 0.35:
                self.n += 1
                mid = f"{self.name}-{self.n}"
                self.alive.append(mid)
                ops.append({"op": "create_memory", "id": mid, "content": f"{self.name} v{self.n}"})
            elif k < 0.55:
                ops.append(
                    {
                        "op": "update_memory",
                        "id": r.choice(self.alive),
                        "content": f"{self.name} u{r.randint(0, 10**6)}",
                    }
                )
            elif k < 0.75:
                ops.append({"op": "activate", "id": r.choice(self.alive)})
            elif k < 0.9:
                src, dst = r.choice(self.alive), r.choice(self.alive)
                self.edges.add((src, dst, "related"))
                ops.append(
                    {"op": "create_edge", "src": src, "dst": dst, "weight": round(r.random(), 4)}
                )
            else:
                mid = r.choice(self.alive)
                self.alive.remove(mid)
                self.edges = {e for e in self.edges if mid not in (e[0], e[1])}
                ops.append({"op": "delete_memory", "id": mid})
        return ops

    def expected(self, upto: int) -> tuple[dict[str, str], set[tuple[str, str, str]]]:
        """Contents and edges of this writer's acknowledged batches with LSN <= ``upto``."""
        contents: dict[str, str] = {}
        edges: set[tuple[str, str, str]] = set()
        for lsn, ops in self.acked:
            if lsn > upto:
                break
            for op in ops:
                if op["op"] in ("create_memory", "update_memory"):
                    contents[op["id"]] = op["content"]
                elif op["op"] == "create_edge":
                    edges.add((op["src"], op["dst"], "related"))
                elif op["op"] == "delete_memory":
                    contents.pop(op["id"])
                    edges = {e for e in edges if op["id"] not in (e[0], e[1])}
        return contents, edges


def run_writers(
    writers: list[Writer], submit: Callable[[list[dict[str, Any]]], int], stop: threading.Event
) -> list[threading.Thread]:
    def loop(w: Writer) -> None:
        while not stop.is_set():
            ops = w.batch()
            try:
                lsn = submit(ops)
            except Exception as e:  # reported by the test, not swallowed
                w.errors.append(f"{type(e).__name__}: {e}")
                return
            assert not w.acked or lsn > w.acked[-1][0]
            w.acked.append((lsn, ops))

    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in writers]
    for t in threads:
        t.start()
    return threads


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def acked_lsns(writers: list[Writer]) -> int:
    return sum(len(w.acked) for w in writers)


def check_against(restored: State, truth: State, writers: list[Writer]) -> None:
    assert restored.lsn == truth.lsn
    assert restored.digest == truth.digest
    assert restored.mems == truth.mems
    assert restored.edges == truth.edges
    for w in writers:
        contents, edges = w.expected(truth.lsn)
        mine = {k: v[1] for k, v in restored.mems.items() if k.startswith(w.name + "-")}
        assert mine == contents, w.name
        assert {k for k in restored.edges if k[0].startswith(w.name + "-")} == edges, w.name


# -- in process ----------------------------------------------------------------------------------


def test_online_full_backup_restores_to_exactly_its_snapshot(tmp_path: Path) -> None:
    src = tmp_path / "src"
    eng = Engine.open(src, CFG)
    writers = [Writer(f"w{i}", i) for i in range(4)]
    stop = threading.Event()
    threads = run_writers(writers, lambda ops: eng.apply(ops).lsn, stop)
    results = []
    try:
        for k in range(3):
            wait_for(lambda k=k: acked_lsns(writers) > 150 * (k + 1), "writes")
            before = eng.last_lsn
            ext = ".tar.zst" if k % 2 == 0 else ".tar.gz"
            results.append(full_backup(eng, tmp_path / f"online-{k}{ext}"))
            assert results[-1].snapshot_lsn >= before
        wait_for(lambda: eng.last_lsn > results[-1].snapshot_lsn + 20, "writes after the cut")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        eng.close()
    for w in writers:
        assert not w.errors, w.errors
    for k, res in enumerate(results):
        archive = Path(res.path)
        to = tmp_path / f"restored-{k}"
        rr = restore(archive, to)
        manifest = json.loads((to / "backup-manifest.json").read_text())
        assert rr.snapshot_lsn == manifest["snapshot_lsn"] == res.snapshot_lsn
        truth = fold_log(src, res.snapshot_lsn)
        assert manifest["digest"] == truth.digest
        assert manifest["counts"] == {"memories": len(truth.mems), "edges": len(truth.edges)}
        check_against(export(to), truth, writers)
        rep = verify_data_dir(to, check_all=True)
        assert rep.ok, [p.to_dict() for p in rep.problems]


def test_online_incrementals_chain_to_the_last_to_lsn(tmp_path: Path) -> None:
    src = tmp_path / "src"
    bdir = tmp_path / "backups"
    bdir.mkdir()
    eng = Engine.open(src, CFG)
    writers = [Writer(f"w{i}", 10 + i) for i in range(3)]
    stop = threading.Event()
    threads = run_writers(writers, lambda ops: eng.apply(ops).lsn, stop)
    incs = []
    try:
        wait_for(lambda: acked_lsns(writers) > 100, "writes")
        full = full_backup(eng, bdir / "full.tar.zst")
        for k in range(4):
            wait_for(lambda k=k: acked_lsns(writers) > 100 + 120 * (k + 1), "writes")
            incs.append(incremental_backup(eng, bdir / f"inc-{k}.log"))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        eng.close()
    for w in writers:
        assert not w.errors, w.errors
    prev = full.snapshot_lsn
    for r in incs:
        h = read_header(Path(r.path))
        assert h["from_lsn"] == prev + 1 and h["to_lsn"] == r.snapshot_lsn
        assert h["digest"] == fold_log(src, h["to_lsn"]).digest
        prev = h["to_lsn"]
    last = read_header(Path(incs[-1].path))
    out = tmp_path / "pitr"
    res = restore_pitr(Path(full.path), [bdir], Target(lsn=last["to_lsn"]), out)
    assert res.reached_lsn == last["to_lsn"]
    assert res.digest == last["digest"]
    check_against(export(out), fold_log(src, last["to_lsn"]), writers)
    rep = verify_data_dir(out, check_all=True)
    assert rep.ok, [p.to_dict() for p in rep.problems]


# -- through a real server ---------------------------------------------------------------------


def _engram(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    p = subprocess.run([ENGRAM, *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p


def test_backup_through_a_server_under_http_writes(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "data")
    bdir = tmp_path / "backups"
    bdir.mkdir()
    writers = [Writer(f"h{i}", 20 + i) for i in range(4)]
    clients = [srv.client(timeout=30) for _ in writers]
    it = iter(clients)
    local = threading.local()

    def submit(ops: list[dict[str, Any]]) -> int:
        if not hasattr(local, "c"):
            local.c = next(it)
        r = local.c.post("/v1/batch", json={"ops": ops})
        assert r.status_code == 200, r.text
        return int(r.json()["lsn"])

    stop = threading.Event()
    threads = run_writers(writers, submit, stop)
    try:
        wait_for(lambda: acked_lsns(writers) > 100, "writes")
        out = _engram(
            "backup",
            "--full",
            f"--output={bdir}/full.tar.zst",
            "--level",
            "3",
            "--data-dir",
            str(srv.data_dir),
            "--json",
        )
        full = json.loads(out.stdout)
        assert full["validation"]["ok"], full["validation"]
        wait_for(lambda: acked_lsns(writers) > 300, "writes")
        out = _engram(
            "backup",
            "--incremental",
            f"--output={bdir}/inc-1.log",
            "--level",
            "3",
            "--data-dir",
            str(srv.data_dir),
            "--json",
        )
        inc = json.loads(out.stdout)
        assert inc["validation"]["ok"], inc["validation"]
        wait_for(lambda: acked_lsns(writers) > 400, "writes after the backups")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for c in clients:
            c.close()
    for w in writers:
        assert not w.errors, w.errors
    with srv.client() as c:
        final = c.get("/v1/stats").json()
    assert final["lsn"] > inc["snapshot_lsn"] > full["snapshot_lsn"] > 0
    srv.stop()
    src = srv.data_dir
    assert inc["from_lsn"] == full["snapshot_lsn"] + 1  # the chain continues the full backup

    to = tmp_path / "restored"
    _engram("restore", f"--from={bdir}/full.tar.zst", f"--to={to}", "--json")
    restored = export(to)
    assert restored.lsn == full["snapshot_lsn"]
    truth = fold_log(src, full["snapshot_lsn"])
    assert truth.digest == full["digest"]
    check_against(restored, truth, writers)
    assert verify_data_dir(to, check_all=True).ok
    _engram("verify", "--data-dir", str(to), "--check-all")  # exit 0: no problems

    out_dir = tmp_path / "pitr"
    _engram(
        "restore-pitr",
        f"--base-backup={bdir}/full.tar.zst",
        f"--operation-log={bdir}",
        f"--target-lsn={inc['snapshot_lsn']}",
        f"--output={out_dir}",
        "--json",
    )
    truth = fold_log(src, inc["snapshot_lsn"])
    assert truth.digest == inc["digest"]
    check_against(export(out_dir), truth, writers)


# -- quiesce -----------------------------------------------------------------------------------


def _status(dd: Path) -> dict[str, Any]:
    return dict(json.loads(_engram("status", "--data-dir", str(dd), "--json").stdout))


def test_quiesce_pauses_writes_with_503_and_resume_lifts_it(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "data")
    dd = srv.data_dir
    stop = threading.Event()
    outcomes: list[tuple[int, str | None, str]] = []

    def writer(k: int) -> None:
        # Writers keep going while the quiesce lands: each request ends, 201 or 503, never hangs.
        with srv.client(timeout=10) as wc:
            n = 0
            while not stop.is_set():
                n += 1
                mid = f"q{k}-{n}"
                try:
                    r = wc.post("/v1/memories", json={"id": mid, "content": "during"})
                except httpx.HTTPError as e:  # a hang ends in a timeout: recorded as a failure
                    outcomes.append((-1, repr(e), mid))
                    return
                outcomes.append((r.status_code, r.headers.get("retry-after"), mid))

    threads = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(3)]
    c = srv.client(timeout=10)
    try:
        r = c.post("/v1/memories", json={"id": "pre", "content": "before quiesce"})
        assert r.status_code == 201
        assert _status(dd)["quiesce"]["quiesced"] is False
        for t in threads:
            t.start()
        wait_for(lambda: len(outcomes) > 30, "writes before the quiesce")
        # Long enough that it cannot lapse by itself before `engram resume` below.
        q = json.loads(_engram("quiesce", "--timeout=5m", "--data-dir", str(dd), "--json").stdout)
        assert q["quiesced"] is True
        assert q["checkpoint_lsn"] == q["lsn"]  # in-flight writes finished, then a checkpoint
        n_at_quiesce = len(outcomes)
        wait_for(lambda: len(outcomes) > n_at_quiesce + 10, "writes during the quiesce", 30)
        assert all(s == 503 for s, _, _ in outcomes[n_at_quiesce:])
        st = _status(dd)
        assert st["quiesce"]["quiesced"] is True and st["quiesce"]["until"]
        assert "PAUSED" in _engram("status", "--data-dir", str(dd)).stdout

        r = c.post("/v1/memories", json={"id": "blocked", "content": "x"})
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "engram resume" in r.json()["message"]
        assert c.post("/v1/batch", json={"ops": [{"op": "mark", "name": "x"}]}).status_code == 503
        # Reads continue.
        assert c.get("/v1/memories/pre").status_code == 200
        assert c.get("/v1/recall", params={"query": "quiesce"}).status_code == 200
        assert c.get("/v1/stats").json()["lsn"] == q["lsn"]

        res = json.loads(_engram("resume", "--data-dir", str(dd), "--json").stdout)
        assert res["quiesced"] is False and res["was_quiesced"] is True
        n_at_resume = len(outcomes)
        wait_for(
            lambda: any(s == 201 for s, _, _ in outcomes[n_at_resume:]), "writes after resume", 30
        )
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:  # started
                t.join(30)
    try:
        assert all(s in (201, 503) for s, _, _ in outcomes), {s for s, _, _ in outcomes}
        refused = [o for o in outcomes if o[0] == 503]
        assert refused and all(ra is not None and int(ra) >= 1 for _, ra, _ in refused)
        r = c.post("/v1/memories", json={"id": "after", "content": "resumed"})
        assert r.status_code == 201
        assert _status(dd)["quiesce"]["quiesced"] is False
        for s, _, mid in outcomes:  # acknowledged writes are there, refused ones are not
            assert c.get(f"/v1/memories/{mid}").status_code == (200 if s == 201 else 404)
    finally:
        c.close()


def test_quiesce_lifts_itself_after_the_timeout(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "data")
    dd = srv.data_dir
    _engram("quiesce", "--timeout=2s", "--data-dir", str(dd))
    with srv.client(timeout=10) as c:
        assert c.post("/v1/memories", json={"content": "too early"}).status_code == 503
        codes: list[int] = []

        def lifted() -> bool:
            codes.append(c.post("/v1/memories", json={"content": "later"}).status_code)
            return codes[-1] == 201

        wait_for(lifted, "the quiesce to lapse", timeout=60)
        assert set(codes) <= {201, 503}
    assert _status(dd)["quiesce"]["quiesced"] is False
    assert "quiesce timeout lapsed" in srv.log()


def test_quiesce_needs_a_server(tmp_path: Path) -> None:
    dd = tmp_path / "data"
    Engine.open(dd).close()
    p = _engram("quiesce", "--timeout=2s", "--data-dir", str(dd), check=False)
    assert p.returncode == 3 and "no engram server is running" in p.stderr


@pytest.mark.slow
def test_many_online_backups_under_writes(tmp_path: Path) -> None:
    """The in-process check, longer: 20 full backups while 6 writers run."""
    src = tmp_path / "src"
    eng = Engine.open(src, CFG)
    writers = [Writer(f"s{i}", 40 + i) for i in range(6)]
    stop = threading.Event()
    threads = run_writers(writers, lambda ops: eng.apply(ops).lsn, stop)
    results = []
    try:
        for k in range(20):
            wait_for(lambda k=k: acked_lsns(writers) > 200 * (k + 1), "writes")
            results.append(full_backup(eng, tmp_path / f"b-{k}.tar.zst"))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        eng.close()
    for w in writers:
        assert not w.errors, w.errors
    for k, res in enumerate(results):
        to = tmp_path / f"r-{k}"
        restore(Path(res.path), to)
        check_against(export(to), fold_log(src, res.snapshot_lsn), writers)
