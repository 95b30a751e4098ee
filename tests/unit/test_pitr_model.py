"""Point-in-time recovery equals a model at 100 random targets (issue 3, "Tests that must exist").

One seeded history of a few thousand ops (batches, so transactions span several records; named
restore points mixed in) runs on an Engine with small segments. An early full backup and a chain
of incrementals are taken into one directory as the history runs. A plain in-memory model of the
graph (no decay: half-life 0) is replayed alongside: it predicts each transaction's LSN range and
every field of every memory and edge from the ops and the transaction's timestamp alone.

Then ``restore_pitr(base, [dir], target, out)`` for 100 random target LSNs, for target times
(inclusive: transactions at or before T) and for restore point names must land on the last
transaction boundary at or before the target with exactly the model's graph and digest. A
restore point name means the LSN of its marker record (the model predicts it) and the replay
stops right after the transaction holding it, whether the name is found in the logs, in a base
backup's own records (a mark right before each full backup, as the runbook suggests) or in a
full backup's catalog entry (``--repo``).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engram import digest as dg
from engram.backup.catalog import read_info
from engram.backup.full import full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.pitr import Target, choose_from_repo, choose_path, restore_pitr
from engram.errors import ForeignLog, LogGap, UsageError
from engram.graph import Engine, EngineConfig
from engram.model import Edge, Memory
from engram.oplog.reader import read_header
from opgen import OpGen

CFG = EngineConfig(
    segment_bytes=16 << 10, checkpoint_interval=3600, checkpoint_ops=10**9, half_life_s=0.0
)

MemT = tuple[str, str, float, dict, int, int, int, int]
EdgeT = tuple[str, str, str, float, int]


@dataclass
class Model:
    """The graph as the API promises it (planner semantics, half-life 0)."""

    mems: dict[str, MemT] = field(default_factory=dict)
    edges: dict[tuple[str, str, str], EdgeT] = field(default_factory=dict)

    def apply(self, ops: list[dict[str, Any]], ts: int) -> int:
        """Apply one batch at timestamp ``ts``; returns how many log records it takes."""
        n = 0
        for op in ops:
            n += self._one(op, ts)
        return n

    def _one(self, op: dict[str, Any], ts: int) -> int:
        kind = op["op"]
        if kind == "create_memory":
            mid = op["id"]
            assert mid not in self.mems
            self.mems[mid] = (
                mid,
                op["content"],
                float(op.get("strength", 0.5)),
                op.get("metadata", {}),
                ts,
                ts,
                0,
                0,
            )
            return 1
        if kind == "update_memory":
            mid, content, s, md, c, _, la, cnt = self.mems[op["id"]]
            self.mems[mid] = (
                mid,
                op.get("content", content),
                float(op.get("strength", s)),
                op.get("metadata", md),
                c,
                ts,
                la,
                cnt,
            )
            return 1
        if kind == "activate":
            mid, content, s, md, c, _, _, cnt = self.mems[op["id"]]
            s2 = min(1.0, s + op.get("boost", 0.1))
            self.mems[mid] = (mid, content, s2, md, c, ts, ts, cnt + 1)
            return 1
        if kind == "delete_memory":
            mid = op["id"]
            gone = [k for k in self.edges if mid in (k[0], k[1])]
            for k in gone:
                del self.edges[k]
            del self.mems[mid]
            return len(gone) + 1
        if kind == "create_edge":
            key = (op["src"], op["dst"], op.get("kind", "related"))
            assert key[0] in self.mems and key[1] in self.mems
            old = self.edges.get(key)
            self.edges[key] = (*key, float(op.get("weight", 1.0)), old[4] if old else ts)
            return 1
        if kind == "delete_edge":
            del self.edges[(op["src"], op["dst"], op.get("kind", "related"))]
            return 1
        assert kind == "mark"
        return 1

    def digest(self) -> str:
        items: list[Memory | Edge] = [Memory(*m) for m in self.mems.values()]
        items += [Edge(*e) for e in self.edges.values()]
        return dg.compute(items).hex


@dataclass
class Txn:
    first: int
    last: int
    ts: int
    ops: list[dict[str, Any]]
    marks: list[str]
    mark_lsns: dict[str, int] = field(default_factory=dict)  # the model's LSN of each marker


@dataclass
class History:
    txns: list[Txn]
    backups: Path  # full-1 + the incremental chain
    base: Path
    base_lsn: int
    base_ts: int
    full2: Path  # a later full, kept in another directory
    full2_lsn: int
    last_lsn: int
    last_ts: int
    final: Model

    def model_at(self, pred: Any) -> tuple[Model, int]:
        """The model after every transaction ``pred`` accepts (a prefix), and its last LSN."""
        m, last = Model(), 0
        for t in self.txns:
            if not pred(t):
                break
            m.apply(t.ops, t.ts)
            last = t.last
        return m, last

    def marks(self) -> dict[str, int]:
        return {name: i for i, t in enumerate(self.txns) for name in t.marks}

    def mark_lsn(self, name: str) -> int:
        return self.txns[self.marks()[name]].mark_lsns[name]


def _build(root: Path, seed: int = 7, n_txns: int = 1300) -> History:
    rng = random.Random(seed)
    gen = OpGen(rng, marks=0.02)
    backups = root / "backups"
    later = root / "later"
    backups.mkdir()
    later.mkdir()
    model = Model()
    txns: list[Txn] = []
    base = backups / "full-1.tar.zst"
    full2 = later / "full-2.tar.gz"
    base_lsn = base_ts = full2_lsn = 0
    incs = 0
    eng = Engine.open(root / "src", CFG)
    try:
        for i in range(1, n_txns + 1):
            if i in (120, 800):  # the runbook: `engram mark NAME`, then `backup --full`
                ops = [{"op": "mark", "name": f"at-full-{1 if i == 120 else 2}"}]
            else:
                ops = gen.batch((1, 1, 2, 3, 5))
            res = eng.apply(ops)
            ts = eng.last_ts
            first = txns[-1].last + 1 if txns else 1
            lsn, mark_lsns = first, {}
            for op in ops:
                if op["op"] == "mark":
                    mark_lsns[op["name"]] = lsn
                lsn += model.apply([op], ts)
            assert res.lsn == lsn - 1, "the model predicts every transaction's LSNs"
            txns.append(Txn(first, res.lsn, ts, ops, list(mark_lsns), mark_lsns))
            if rng.random() < 0.03:
                eng.checkpoint()
            if i == 120:
                full_backup(eng, base)
                base_lsn, base_ts = eng.last_lsn, eng.last_ts
            elif i == 800:
                full_backup(eng, full2)
                full2_lsn = eng.last_lsn
            elif i > 120 and (i % 97 == 0 or i == n_txns):
                incs += 1
                r = incremental_backup(eng, backups / f"inc-{incs:03d}.log")
                assert r.note is None
        mems = {m.id: msgspec.structs.astuple(m) for m in eng.iter_memories()}
        edges = {e.key(): msgspec.structs.astuple(e) for e in eng.iter_edges()}
        assert (mems, edges) == (model.mems, model.edges), "the model matches the source"
        assert eng.digest.hex == model.digest()
        last_lsn, last_ts = eng.last_lsn, eng.last_ts
    finally:
        eng.close()
    assert incs >= 12 and gen.marks >= 20
    return History(
        txns, backups, base, base_lsn, base_ts, full2, full2_lsn, last_lsn, last_ts, model
    )


@pytest.fixture(scope="module")
def hist(tmp_path_factory: pytest.TempPathFactory) -> History:
    return _build(tmp_path_factory.mktemp("pitr"))


def _restored(out: Path) -> tuple[int, str, dict, dict]:
    eng = Engine.open(out, CFG, create=False)
    try:
        mems = {m.id: msgspec.structs.astuple(m) for m in eng.iter_memories()}
        edges = {e.key(): msgspec.structs.astuple(e) for e in eng.iter_edges()}
        return eng.last_lsn, eng.digest.hex, mems, edges
    finally:
        eng.close()


def _check(base: Path, logs: list[Path], target: Target, out: Path, model: Model, lsn: int) -> None:
    res = restore_pitr(base, logs, target, out)
    try:
        assert res.reached_lsn == lsn, target
        assert res.digest == model.digest(), target
        got_lsn, got_digest, mems, edges = _restored(out)
        assert got_lsn == lsn
        assert got_digest == res.digest
        assert mems == model.mems, target
        assert edges == model.edges, target
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_the_chain_is_contiguous(hist: History) -> None:
    incs = sorted(hist.backups.glob("inc-*.log"))
    prev = hist.base_lsn
    for p in incs:
        h = read_header(p)
        assert h["from_lsn"] == prev + 1
        assert h["parent"] is not None
        prev = h["to_lsn"]
    assert prev == hist.last_lsn
    assert read_info(hist.base)["snapshot_lsn"] == hist.base_lsn  # type: ignore[index]


def test_pitr_at_100_random_lsns_equals_the_model(hist: History, tmp_path: Path) -> None:
    rng = random.Random(2024)
    targets = {hist.base_lsn, hist.last_lsn, hist.base_lsn + 1}
    # Inside multi-record transactions too: those must stop at the boundary before them.
    inner = [t.first for t in hist.txns if t.last > t.first and t.first > hist.base_lsn + 1]
    targets |= set(rng.sample(inner, 10))
    while len(targets) < 100:
        targets.add(rng.randint(hist.base_lsn, hist.last_lsn))
    for lsn in sorted(targets):
        model, boundary = hist.model_at(lambda t, lsn=lsn: t.last <= lsn)
        assert boundary <= lsn and (boundary >= hist.base_lsn)
        _check(hist.base, [hist.backups], Target(lsn=lsn), tmp_path / "out", model, boundary)


def test_pitr_at_target_times_is_inclusive(hist: History, tmp_path: Path) -> None:
    rng = random.Random(99)
    after = [t for t in hist.txns if t.last > hist.base_lsn]
    times = {hist.base_ts, hist.last_ts}
    for t in rng.sample(after, 8):
        times |= {t.ts, t.ts - 1}  # at the transaction (included) and just before it
    pairs = list(zip(after, after[1:], strict=False))
    for a, b in rng.sample(pairs, 4):
        times.add((a.ts + b.ts) // 2)
    for tns in sorted(x for x in times if x >= hist.base_ts):
        model, boundary = hist.model_at(lambda t, tns=tns: t.ts <= tns)
        _check(hist.base, [hist.backups], Target(time_ns=tns), tmp_path / "out", model, boundary)


def _name_case(hist: History, name: str) -> tuple[Model, int]:
    """What restoring to restore point ``name`` must give: everything through the transaction
    holding its marker record."""
    idx = hist.marks()[name]
    model, boundary = hist.model_at(lambda t: t.last <= hist.txns[idx].last)
    assert boundary == hist.txns[idx].last and hist.txns[idx].first <= hist.mark_lsn(name)
    return model, boundary


def test_pitr_at_restore_point_names(hist: History, tmp_path: Path) -> None:
    marks = {n: i for n, i in hist.marks().items() if hist.txns[i].first > hist.base_lsn}
    names = sorted(marks)
    # Markers in the middle of a batch too: the whole transaction holding one is replayed.
    inner = sorted(n for n in names if hist.mark_lsn(n) < hist.txns[marks[n]].last)
    assert inner
    rng = random.Random(5)
    chosen = rng.sample(names, min(8, len(names))) + [names[-1], rng.choice(inner)]
    # The runbook's mark right before the base backup: the base alone is the answer.
    assert hist.mark_lsn("at-full-1") == hist.base_lsn
    for name in [*chosen, "at-full-1", "at-full-2"]:
        model, boundary = _name_case(hist, name)
        _check(hist.base, [hist.backups], Target(name=name), tmp_path / "out", model, boundary)


def test_a_name_means_one_lsn_through_repo_and_base(hist: History, tmp_path: Path) -> None:
    """``--repo`` resolves a name through the full backups' catalog entries (or the
    incrementals) and chooses as for that LSN; ``--base-backup`` resolves it through the base's
    own marks and the logs: both reach the same moment, the model's."""
    repo = _repo(hist, tmp_path)
    for full, upto in ((hist.base, hist.base_lsn), (hist.full2, hist.full2_lsn)):
        want = {
            n: {"lsn": hist.mark_lsn(n), "time_ns": hist.txns[i].ts}
            for n, i in hist.marks().items()
            if hist.mark_lsn(n) <= upto
        }
        assert read_info(full)["marks"] == want  # type: ignore[index]
    names = [n for n in hist.marks() if hist.mark_lsn(n) > hist.base_lsn]
    rng = random.Random(11)
    for name in [*rng.sample(names, 6), "at-full-1", "at-full-2"]:
        model, boundary = _name_case(hist, name)
        base, logs, says = choose_from_repo(repo, Target(name=name))
        lsn = hist.mark_lsn(name)
        want = hist.full2.name if lsn >= hist.full2_lsn else hist.base.name
        assert base.name == want, (name, says)
        _check(base, logs, Target(name=name), tmp_path / "out", model, boundary)
        # The same name from the older base and every log: the same moment.
        _check(hist.base, [hist.backups], Target(name=name), tmp_path / "out", model, boundary)


def test_targets_outside_the_covered_range_are_refused(hist: History, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bad = [
        (Target(lsn=hist.base_lsn - 1), "outside the covered range"),
        (Target(lsn=hist.last_lsn + 1), "outside the covered range"),
        (Target(time_ns=hist.base_ts - 1), "before the base backup"),
        (Target(time_ns=hist.last_ts + 1), "after the last record"),
        (Target(name="no-such-point"), "no restore point named"),
    ]
    for target, why in bad:
        with pytest.raises(UsageError, match=why) as ei:
            restore_pitr(hist.base, [hist.backups], target, out)
        assert f"{hist.base_lsn}..{hist.last_lsn}" in ei.value.message
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    # A restore point inside the base backup (below its snapshot) is refused naming both LSNs.
    early = [n for n in hist.marks() if hist.mark_lsn(n) < hist.base_lsn]
    assert early
    for name in early[:3]:
        with pytest.raises(UsageError, match="inside the base backup") as ei:
            restore_pitr(hist.base, [hist.backups], Target(name=name), out)
        assert f"LSN {hist.mark_lsn(name)} " in ei.value.message
        assert f"LSN {hist.base_lsn} " in ei.value.message
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_gap_and_a_foreign_log_are_refused(hist: History, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    incs = sorted(hist.backups.glob("inc-*.log"))
    for p in incs[:3] + incs[4:]:
        shutil.copy(p, logs / p.name)
    missing = read_header(incs[3])
    out = tmp_path / "out"
    with pytest.raises(LogGap) as ei:
        restore_pitr(hist.base, [logs], Target(lsn=hist.last_lsn), out)
    assert f"{missing['from_lsn']}..{missing['to_lsn']}" in ei.value.message
    assert not out.exists()
    # A target before the hole is reachable with the logs that precede it.
    end = read_header(incs[2])["to_lsn"]
    model, boundary = hist.model_at(lambda t: t.last <= end)
    _check(hist.base, [logs / p.name for p in incs[:3]], Target(lsn=end), out, model, boundary)

    other = Engine.open(tmp_path / "other", CFG)
    try:
        other.apply([{"op": "create_memory", "id": "x", "content": "elsewhere"}])
        foreign_id = other.database_id
    finally:
        other.close()
    foreign = sorted((tmp_path / "other" / "oplog").glob("*.log"))
    with pytest.raises(ForeignLog) as fe:
        restore_pitr(hist.base, [incs[0], *foreign], Target(lsn=hist.last_lsn), out)
    assert foreign_id in fe.value.message and read_header(incs[0])["database_id"] in (
        fe.value.message
    )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "other"]


def test_the_source_oplog_serves_as_the_operation_log(hist: History, tmp_path: Path) -> None:
    oplog = hist.backups.parent / "src" / "oplog"
    rng = random.Random(3)
    for lsn in sorted(rng.sample(range(hist.base_lsn, hist.last_lsn + 1), 5)):
        model, boundary = hist.model_at(lambda t, lsn=lsn: t.last <= lsn)
        _check(hist.base, [oplog], Target(lsn=lsn), tmp_path / "out", model, boundary)


def _repo(hist: History, root: Path) -> Path:
    """full-1 + its incremental chain, and the later full-2 copied in beside them."""
    repo = root / "repo"
    shutil.copytree(hist.backups, repo)
    for suffix in ("", ".sha256", ".info.json"):
        src = hist.full2.with_name(hist.full2.name + suffix)
        shutil.copy(src, repo / src.name)
    return repo


def test_repo_picks_the_newest_full_before_the_target(hist: History, tmp_path: Path) -> None:
    repo = _repo(hist, tmp_path)
    i2 = next(i for i, t in enumerate(hist.txns) if t.last == hist.full2_lsn)
    cases: list[tuple[Target, str, Any]] = [
        (Target(lsn=hist.full2_lsn - 1), "full-1.tar.zst", lambda t: t.last <= hist.full2_lsn - 1),
        (Target(lsn=hist.full2_lsn), "full-2.tar.gz", lambda t: t.last <= hist.full2_lsn),
        (Target(lsn=hist.last_lsn), "full-2.tar.gz", lambda t: True),
        (Target(time_ns=hist.txns[i2].ts), "full-2.tar.gz", lambda t: t.ts <= hist.txns[i2].ts),
        (
            Target(time_ns=hist.txns[i2 - 5].ts),
            "full-1.tar.zst",
            lambda t: t.ts <= hist.txns[i2 - 5].ts,
        ),
    ]
    marks = hist.marks()
    before2 = [n for n, i in marks.items() if hist.base_lsn < hist.txns[i].last < hist.full2_lsn]
    after2 = [n for n, i in marks.items() if hist.txns[i].last > hist.full2_lsn]
    for name, want in ((before2[-1], "full-1.tar.zst"), (after2[0], "full-2.tar.gz")):
        last = hist.txns[marks[name]].last
        cases.append((Target(name=name), want, lambda t, last=last: t.last <= last))
    for target, want, pred in cases:
        base, logs, says = choose_from_repo(repo, target)
        assert base.name == want, (target, says)
        assert want in says
        assert all(p.suffix == ".log" for p in logs)
        model, boundary = hist.model_at(pred)
        _check(base, logs, target, tmp_path / "out", model, boundary)
    with pytest.raises(UsageError, match="no full backup"):
        choose_from_repo(repo, Target(lsn=hist.base_lsn - 1))


def test_repo_with_a_second_full_in_the_same_directory(tmp_path: Path) -> None:
    """The seed's routine: nightly fulls and incrementals into one directory. An incremental
    taken after the second full continues from it, so the chain of the first full stops short
    of the second; a target inside the first full's chain must still be recoverable."""
    rng = random.Random(17)
    gen = OpGen(rng, marks=0.02)
    repo = tmp_path / "repo"
    repo.mkdir()
    model = Model()
    txns: list[Txn] = []
    eng = Engine.open(tmp_path / "src", CFG)
    try:

        def run(n: int) -> None:
            for _ in range(n):
                ops = gen.batch((1, 2, 3))
                res = eng.apply(ops)
                k = model.apply(ops, eng.last_ts)
                txns.append(Txn(res.lsn - k + 1, res.lsn, eng.last_ts, ops, []))

        run(40)
        full_backup(eng, repo / "full-day1.tar.zst")
        run(40)
        incremental_backup(eng, repo / "inc-day1-a.log")
        mid = eng.last_lsn
        run(40)
        full_backup(eng, repo / "full-day2.tar.zst")
        run(40)
        incremental_backup(eng, repo / "inc-day2-a.log")
    finally:
        eng.close()
    target = Target(lsn=mid)
    base, logs, says = choose_from_repo(repo, target)
    assert base.name == "full-day1.tar.zst", says
    m = Model()
    for t in txns:
        if t.last > mid:
            break
        m.apply(t.ops, t.ts)
    _check(base, logs, target, tmp_path / "out", m, mid)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [31, 32])
def test_pitr_on_a_longer_history(tmp_path: Path, seed: int) -> None:
    """The quick test's check on longer histories (5,000 transactions), other seeds."""
    h = _build(tmp_path, seed=seed, n_txns=5000)
    rng = random.Random(seed)
    for lsn in sorted(rng.sample(range(h.base_lsn, h.last_lsn + 1), 100)):
        model, boundary = h.model_at(lambda t, lsn=lsn: t.last <= lsn)
        _check(h.base, [h.backups], Target(lsn=lsn), tmp_path / "out", model, boundary)


def test_random_histories_with_recoveries_equal_the_model(tmp_path: Path) -> None:
    """Histories grow at random: writes, incrementals and an occasional full into one repository,
    and recoveries (``restore-pitr --repo`` of the newest history) to random LSNs of the data
    dir's own path, each followed by more writes — a new history each time. Then every history of
    the tree, restored through ``--repo --history`` at random LSNs of its path, must equal the
    model replayed along that path (its own transactions after its ancestors' up to each branch),
    and the default (no ``--history``) is the history that began last."""
    rng = random.Random(4242)
    gen = OpGen(rng)
    repo, src = tmp_path / "repo", tmp_path / "src"
    repo.mkdir()
    paths: dict[str, list[Txn]] = {}  # history id -> the transactions on its path
    first_full = 0
    n_inc = n_full = 0
    path: list[Txn] = []
    live = Model()  # the model of the data dir's path
    current = ""

    def write(eng: Engine, n: int) -> None:
        nonlocal n_inc, n_full, first_full
        for _ in range(n):
            ops = gen.batch((1, 1, 2, 3))
            res = eng.apply(ops)
            k = live.apply(ops, eng.last_ts)
            path.append(Txn(res.lsn - k + 1, res.lsn, eng.last_ts, ops, []))
            if not first_full and len(path) == 8:
                n_full += 1
                full_backup(eng, repo / f"full-{n_full:02d}.tar.zst")
                first_full = eng.last_lsn
            elif first_full and rng.random() < 0.08:
                n_inc += 1
                incremental_backup(eng, repo / f"inc-{n_inc:03d}.log")
            elif first_full and rng.random() < 0.01:
                n_full += 1
                full_backup(eng, repo / f"full-{n_full:02d}.tar.zst")
        n_inc += 1
        incremental_backup(eng, repo / f"inc-{n_inc:03d}.log")  # everything is backed up

    for round_ in range(4):
        with Engine.open(src, CFG) as eng:
            write(eng, 40)
            current = eng.history
            paths[current] = list(path)
        if round_ == 3:
            break
        # Recover the data dir itself to a random LSN of its path after the first full.
        lsn = rng.randint(first_full, path[-1].last)
        c = choose_path(repo, Target(lsn=lsn))
        assert c.lineage[-1].id == current, c.says
        restore_pitr(c.base, c.logs, Target(lsn=lsn), src, force=True, lineage=c.lineage)
        path = [t for t in path if t.last <= lsn]
        live = _model(path)
        gen.mems = sorted(live.mems)  # the generator continues from the recovered graph
        gen.edges = set(live.edges)

    assert len(paths) == 4
    assert choose_path(repo, Target(lsn=first_full)).lineage[-1].id == current
    out = tmp_path / "out"
    for hid, txns in paths.items():
        end = txns[-1].last
        lsns = {first_full, end, *(rng.randint(first_full, end) for _ in range(6))}
        for lsn in sorted(lsns):
            c = choose_path(repo, Target(lsn=lsn), hid)
            kept = [t for t in txns if t.last <= lsn]
            model = _model(kept)
            res = restore_pitr(c.base, c.logs, Target(lsn=lsn), out, lineage=c.lineage)
            try:
                assert res.reached_lsn == (kept[-1].last if kept else 0), (hid, lsn, c.says)
                _, got_digest, mems, edges = _restored(out)
                assert (mems, edges) == (model.mems, model.edges), (hid, lsn, c.says)
                assert got_digest == model.digest()
            finally:
                shutil.rmtree(out, ignore_errors=True)


def _model(txns: list[Txn]) -> Model:
    m = Model()
    for t in txns:
        m.apply(t.ops, t.ts)
    return m
