"""Logs that must not be applied are refused, with nothing changed (issue 3, items 5 and 6;
DESIGN "Apply / PITR"): a log of another database (both ids named), a gap (the missing LSN range
named), a damaged incremental (file and offset named; a wrong sidecar), a target outside the
covered range (the range named), and a data dir held by a running engram (its pid named).

Through ``engram.backup.pitr.apply_log``, ``restore_pitr`` and the CLI ``engram apply-log``. In
every refused case the data dir keeps its digest, its LSN and the exact files of ``oplog/``, and a
refused restore-pitr leaves no output dir and no staging dir.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engram.backup.full import full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.pitr import Target, apply_log, restore_pitr
from engram.cli.main import app
from engram.errors import (
    BadArchive,
    CorruptLog,
    EngramError,
    ForeignLog,
    LogGap,
    RestoreError,
    UsageError,
)
from engram.format import record as fmt
from engram.graph import Engine, EngineConfig
from engram.model import ns_to_iso

CFG = EngineConfig(checkpoint_interval=3600)
runner = CliRunner()


# -- the world: database A (a data dir at the base, a base backup, incrementals), database B -------


@dataclass
class World:
    root: Path
    template: Path  # A's data dir as it was at the base backup (LSN S); copied per test
    db_a: str
    db_b: str
    base: Path  # full backup of A at S
    base_ts: int
    s: int  # the base's snapshot LSN
    inc1: Path  # S+1 .. l1
    l1: int
    l1_ts: int  # timestamp of LSN l1
    inc2: Path  # l1+1 .. l2
    l2: int
    last_ts: int  # timestamp of LSN l2
    gap_from_base: Path  # S+3 .. l1: records S+1..S+2 missing after the base
    gap_after_inc1: Path  # l1+3 .. l2: records l1+1..l1+2 missing after inc1
    foreign: Path  # an incremental of database B


def _ops(e: Engine, prefix: str, n: int) -> None:
    for i in range(n):
        e.apply([{"op": "create_memory", "id": f"{prefix}{i}", "content": f"{prefix} {i}"}])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("logs")
    repo, gaps, other = root / "repo", root / "gaps", root / "other"
    for d in (repo, gaps, other):
        d.mkdir()
    a = Engine.open(root / "a", CFG)
    try:
        _ops(a, "m", 6)
        a.apply([{"op": "create_edge", "src": "m0", "dst": "m1"}])
        full_backup(a, repo / "base.tar.zst")
        s, base_ts, db_a = a.last_lsn, a.last_ts, a.database_id
    finally:
        a.close()
    shutil.copytree(root / "a", root / "template")
    a = Engine.open(root / "a", CFG)
    try:
        _ops(a, "p", 6)
        a.apply([{"op": "mark", "name": "after-p"}])
        incremental_backup(a, repo / "inc1.log")
        l1, l1_ts = a.last_lsn, a.last_ts
        _ops(a, "q", 6)
        a.apply([{"op": "update_memory", "id": "m2", "content": "changed"}])
        incremental_backup(a, repo / "inc2.log")
        l2, last_ts = a.last_lsn, a.last_ts
        incremental_backup(a, gaps / "from-base.log", since_lsn=s + 3)
        incremental_backup(a, gaps / "after-inc1.log", since_lsn=l1 + 3)
    finally:
        a.close()
    b = Engine.open(root / "b", CFG)
    try:
        _ops(b, "m", s + 8)  # same ids and LSN range as A: only the database id differs
        incremental_backup(b, other / "b.log", since_lsn=s + 1)
        db_b = b.database_id
    finally:
        b.close()
    assert db_a != db_b
    w = World(root, root / "template", db_a, db_b, repo / "base.tar.zst", base_ts, s,
              repo / "inc1.log", l1, l1_ts, repo / "inc2.log", l2, last_ts, gaps / "from-base.log",
              gaps / "after-inc1.log", other / "b.log")
    h = _header(w.gap_from_base)
    assert (h["from_lsn"], h["to_lsn"]) == (s + 3, l2)
    assert _header(w.gap_after_inc1)["from_lsn"] == l1 + 3
    return w


def _header(p: Path) -> dict[str, Any]:
    return fmt.decode_file_header(p.read_bytes(), str(p))[1]


@pytest.fixture
def dd(world: World, tmp_path: Path) -> Path:
    """A fresh copy of A's data dir at the base LSN."""
    d = tmp_path / "dd"
    shutil.copytree(world.template, d)
    return d


# -- "nothing changed" ---------------------------------------------------------------------------


def fingerprint(d: Path) -> dict[str, Any]:
    """LSN, digest (read-only open: changes nothing) and every oplog file's size and hash."""
    e = Engine.open(d, CFG, create=False, readonly=True)
    try:
        lsn, digest = e.last_lsn, e.digest.hex
    finally:
        e.close()
    oplog = {
        p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted((d / "oplog").iterdir())
    }
    return {"lsn": lsn, "digest": digest, "oplog": oplog}


def apply_refused(d: Path, logs: list[Path], target: Target, exc: type[EngramError],
                  *needles: str) -> EngramError:
    before = fingerprint(d)
    with pytest.raises(exc) as ei:
        apply_log(d, logs, target)
    for n in needles:
        assert n in ei.value.message, (n, ei.value.message)
    assert "\n" not in ei.value.message
    assert fingerprint(d) == before, "a refused apply-log changed the data dir"
    return ei.value


def pitr_refused(world: World, tmp_path: Path, logs: list[Path], target: Target,
                 exc: type[EngramError], *needles: str) -> EngramError:
    out = tmp_path / "pitr" / "out"
    out.parent.mkdir(parents=True)
    with pytest.raises(exc) as ei:
        restore_pitr(world.base, logs, target, out)
    for n in needles:
        assert n in ei.value.message, (n, ei.value.message)
    assert not out.exists()
    assert list(out.parent.iterdir()) == [], "restore-pitr left a staging dir behind"
    return ei.value


def cli_apply(d: Path, *args: str, code: int) -> str:
    res = runner.invoke(app, ["apply-log", f"--data-dir={d}", *args])
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_baseline_logs_apply(world: World, dd: Path, tmp_path: Path) -> None:
    """The refusals below are of these logs' damaged or foreign siblings: these apply."""
    res = apply_log(dd, [world.inc1, world.inc2], Target())
    assert res.to_lsn == world.l2
    p = restore_pitr(world.base, [world.inc1, world.inc2], Target(lsn=world.l2), tmp_path / "o")
    assert p.reached_lsn == world.l2
    assert fingerprint(dd)["digest"] == p.digest


# -- a log of another database --------------------------------------------------------------------


def test_foreign_log_refused_by_apply_log(world: World, dd: Path) -> None:
    apply_refused(dd, [world.foreign], Target(), ForeignLog, world.db_a, world.db_b, "b.log")


def test_foreign_log_among_own_logs_refused(world: World, dd: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in (world.inc1, world.inc2, world.foreign):
        shutil.copy(p, mixed / p.name)
    apply_refused(dd, [mixed], Target(), ForeignLog, world.db_a, world.db_b)


def test_foreign_segment_refused(world: World, dd: Path) -> None:
    """Another database's own oplog/ dir, as `apply-log --log=oplog/` takes it."""
    apply_refused(dd, [world.root / "b" / "oplog"], Target(), ForeignLog, world.db_a, world.db_b)


def test_foreign_log_refused_by_restore_pitr(world: World, tmp_path: Path) -> None:
    pitr_refused(world, tmp_path, [world.foreign], Target(lsn=world.s + 1), ForeignLog,
                 world.db_a, world.db_b)


def test_foreign_log_refused_by_cli(world: World, dd: Path) -> None:
    before = fingerprint(dd)
    line = cli_apply(dd, f"--log={world.foreign}", code=1)
    assert world.db_a in line and world.db_b in line
    assert fingerprint(dd) == before


# -- a gap -------------------------------------------------------------------------------------


def test_gap_after_data_dir_refused(world: World, dd: Path) -> None:
    s = world.s
    e = apply_refused(dd, [world.gap_from_base], Target(), LogGap, f"{s + 1}..{s + 2}")
    assert e.details.get("missing_from") in (None, s + 1)


def test_gap_between_incrementals_refused(world: World, dd: Path) -> None:
    """The first log is fine, the second leaves a hole: nothing of the first is applied."""
    l1 = world.l1
    apply_refused(dd, [world.inc1, world.gap_after_inc1], Target(), LogGap, f"{l1 + 1}..{l1 + 2}")


def test_gap_before_the_target_refused(world: World, dd: Path) -> None:
    """A target past the hole (by LSN, by time, or the end of the logs) is refused before
    anything of the first log is applied."""
    l1 = world.l1
    for target in (Target(lsn=world.l2), Target(time_ns=world.last_ts), Target()):
        apply_refused(dd, [world.inc1, world.gap_after_inc1], target, LogGap,
                      f"{l1 + 1}..{l1 + 2}")


def test_gap_past_the_target_does_not_block_mid_log(world: World, dd: Path,
                                                    tmp_path: Path) -> None:
    """The boundary of the refusal: records up to the target are all there, so the hole
    after them does not matter (commit b8f81f1)."""
    res = apply_log(dd, [world.inc1, world.gap_after_inc1], Target(lsn=world.l1 - 1))
    assert res.to_lsn == world.l1 - 1
    p = restore_pitr(world.base, [world.inc1, world.gap_after_inc1], Target(lsn=world.l1 - 1),
                     tmp_path / "out")
    assert p.reached_lsn == world.l1 - 1


@pytest.mark.parametrize("by", ["lsn", "time"])
def test_gap_right_after_the_target_does_not_block_apply_log(world: World, dd: Path,
                                                             by: str) -> None:
    """An LSN target at the last record before a hole is covered. A time target there is not:
    the first missing record may carry the same timestamp (ts = max(now, last)), so nothing
    proves the hole holds no op at or before T — that one is refused, with nothing applied."""
    before = fingerprint(dd)
    if by == "lsn":
        res = apply_log(dd, [world.inc1, world.gap_after_inc1], Target(lsn=world.l1))
        assert res.to_lsn == world.l1
        return
    with pytest.raises(LogGap):
        apply_log(dd, [world.inc1, world.gap_after_inc1], Target(time_ns=world.l1_ts))
    assert fingerprint(dd) == before


def test_gap_right_after_the_target_does_not_block_restore_pitr(world: World,
                                                                tmp_path: Path) -> None:
    p = restore_pitr(world.base, [world.inc1, world.gap_after_inc1], Target(lsn=world.l1),
                     tmp_path / "out")
    assert p.reached_lsn == world.l1


def test_gap_refused_by_restore_pitr(world: World, tmp_path: Path) -> None:
    s = world.s
    pitr_refused(world, tmp_path, [world.gap_from_base], Target(lsn=world.l2), LogGap,
                 f"{s + 1}..{s + 2}")
    l1 = world.l1
    pitr_refused(world, tmp_path / "2", [world.inc1, world.gap_after_inc1],
                 Target(lsn=world.l2), LogGap, f"{l1 + 1}..{l1 + 2}")


def test_gap_refused_by_cli(world: World, dd: Path) -> None:
    before = fingerprint(dd)
    line = cli_apply(dd, f"--log={world.gap_from_base}", code=1)
    assert f"{world.s + 1}..{world.s + 2}" in line
    assert fingerprint(dd) == before


# -- a damaged incremental ---------------------------------------------------------------------


def record_offsets(p: Path) -> list[int]:
    data = p.read_bytes()
    off = fmt.decode_file_header(data, str(p))[2]
    out = []
    while off < len(data):
        out.append(off)
        blen, _ = fmt.unpack_frame(data, off)
        off += fmt.FRAME_SIZE + blen
    assert off == len(data)
    return out


def damaged_copy(src: Path, dest_dir: Path, pos: int, mask: int = 0x04,
                 sidecar: bool | bytes = False) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    p = dest_dir / src.name
    b = bytearray(src.read_bytes())
    b[pos] ^= mask
    p.write_bytes(bytes(b))
    side = src.with_name(src.name + ".sha256")
    if sidecar is True:
        shutil.copy(side, p.with_name(p.name + ".sha256"))  # the original's: now wrong
    elif sidecar is not False:
        p.with_name(p.name + ".sha256").write_bytes(sidecar)
    return p


# (record index, position inside the record) to damage: the frame's length, its CRC, the body's
# LSN, the target id, the after-image, and the last byte of the last record.
DAMAGE = [(1, 0), (1, 5), (2, 8), (2, 40), (3, -1), (-1, -1)]


def _damage_point(p: Path, rec: int, within: int) -> tuple[int, int]:
    offs = record_offsets(p)
    start = offs[rec]
    end = offs[rec + 1] if rec + 1 < len(offs) and rec != -1 else p.stat().st_size
    pos = start + within if within >= 0 else end + within
    return start, pos


@pytest.mark.parametrize(("rec", "within"), DAMAGE)
def test_damaged_incremental_refused_naming_file_and_offset(
    world: World, dd: Path, tmp_path: Path, rec: int, within: int
) -> None:
    start, pos = _damage_point(world.inc1, rec, within)
    bad = damaged_copy(world.inc1, tmp_path / "bad", pos)
    e = apply_refused(dd, [bad], Target(), CorruptLog, bad.name, f"offset {start}")
    assert isinstance(e, CorruptLog) and e.offset == start
    assert e.segment is not None and Path(e.segment).name == bad.name


def test_damaged_second_incremental_refused_nothing_applied(
    world: World, dd: Path, tmp_path: Path
) -> None:
    start, pos = _damage_point(world.inc2, 2, 20)
    bad = damaged_copy(world.inc2, tmp_path / "bad", pos)
    apply_refused(dd, [world.inc1, bad], Target(), CorruptLog, bad.name, f"offset {start}")


def test_damaged_header_refused(world: World, dd: Path, tmp_path: Path) -> None:
    bad = damaged_copy(world.inc1, tmp_path / "bad", 30)  # inside the header's JSON
    e = apply_refused(dd, [bad], Target(), CorruptLog, bad.name, "header")
    assert isinstance(e, CorruptLog) and e.offset == 0


def test_truncated_incremental_refused(world: World, dd: Path, tmp_path: Path) -> None:
    """An incremental is a finished file: a cut-off end is damage, not a torn tail to trim."""
    offs = record_offsets(world.inc1)
    for cut in (offs[-1] + 3, offs[-1] + 10, world.inc1.stat().st_size - 1):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        p = d / world.inc1.name
        p.write_bytes(world.inc1.read_bytes()[:cut])
        apply_refused(dd, [p], Target(), CorruptLog, p.name, f"offset {offs[-1]}")


def test_damaged_incremental_refused_by_restore_pitr(world: World, tmp_path: Path) -> None:
    start, pos = _damage_point(world.inc2, 1, 30)
    bad = damaged_copy(world.inc2, tmp_path / "bad", pos)
    pitr_refused(world, tmp_path, [world.inc1, bad], Target(lsn=world.l2), CorruptLog,
                 bad.name, f"offset {start}")


def test_damaged_incremental_refused_by_cli(world: World, dd: Path, tmp_path: Path) -> None:
    start, pos = _damage_point(world.inc1, 2, 12)
    bad = damaged_copy(world.inc1, tmp_path / "bad", pos)
    before = fingerprint(dd)
    line = cli_apply(dd, f"--log={bad}", code=1)
    assert bad.name in line and f"offset {start}" in line
    assert fingerprint(dd) == before


def test_damaged_incremental_with_its_sidecar_refused(world: World, dd: Path,
                                                      tmp_path: Path) -> None:
    _, pos = _damage_point(world.inc1, 2, 30)
    bad = damaged_copy(world.inc1, tmp_path / "bad", pos, sidecar=True)
    apply_refused(dd, [bad], Target(), BadArchive, "checksum mismatch", bad.name)


@pytest.mark.parametrize(
    "sidecar",
    [b"0" * 64 + b"\n", b"not a digest\n", b"", b"abc\n"],
    ids=["wrong-hash", "words", "empty", "short"],
)
def test_wrong_or_malformed_sidecar_refused(world: World, dd: Path, tmp_path: Path,
                                            sidecar: bytes) -> None:
    d = tmp_path / "s"
    d.mkdir()
    p = d / world.inc1.name
    shutil.copy(world.inc1, p)
    p.with_name(p.name + ".sha256").write_bytes(sidecar)
    apply_refused(dd, [p], Target(), BadArchive, f"{p.name}.sha256")
    pitr_refused(world, tmp_path, [p], Target(lsn=world.l1), BadArchive, f"{p.name}.sha256")


def test_not_a_log_refused(world: World, dd: Path, tmp_path: Path) -> None:
    d = tmp_path / "junk"
    d.mkdir()
    (d / "junk.log").write_bytes(b"this is not an engram log at all\n" * 10)
    apply_refused(dd, [d / "junk.log"], Target(), CorruptLog, "junk.log")


# -- a target outside the covered range ------------------------------------------------------------


def _covered(world: World) -> str:
    return f"{world.s}..{world.l2}"


def _targets(world: World) -> dict[str, tuple[Target, str]]:
    return {
        "lsn-before-base": (Target(lsn=world.s - 1), "outside the covered range"),
        "lsn-after-last": (Target(lsn=world.l2 + 1), "outside the covered range"),
        "lsn-far-after": (Target(lsn=world.l2 + 10_000), "outside the covered range"),
        "time-before-base": (Target(time_ns=world.base_ts - 60 * 10**9), "before the base"),
        "time-after-last": (Target(time_ns=world.last_ts + 3600 * 10**9), "after the last record"),
        "unknown-name": (Target(name="no-such-mark"), "no-such-mark"),
    }


TARGETS = ["lsn-before-base", "lsn-after-last", "lsn-far-after", "time-before-base",
           "time-after-last", "unknown-name"]


@pytest.mark.parametrize("which", TARGETS)
def test_target_outside_range_refused_by_apply_log(world: World, dd: Path, which: str) -> None:
    target, words = _targets(world)[which]
    apply_refused(dd, [world.inc1, world.inc2], target, UsageError, words, _covered(world))


@pytest.mark.parametrize("which", TARGETS)
def test_target_outside_range_refused_by_restore_pitr(world: World, tmp_path: Path,
                                                      which: str) -> None:
    target, words = _targets(world)[which]
    pitr_refused(world, tmp_path, [world.inc1, world.inc2], target, UsageError, words,
                 _covered(world))


def test_time_range_named(world: World, dd: Path) -> None:
    target, _ = _targets(world)["time-after-last"]
    apply_refused(dd, [world.inc1, world.inc2], target, UsageError,
                  ns_to_iso(world.base_ts), ns_to_iso(world.last_ts))


def test_target_outside_range_refused_by_cli(world: World, dd: Path) -> None:
    before = fingerprint(dd)
    line = cli_apply(dd, f"--log={world.inc1}", f"--log={world.inc2}",
                     f"--target-lsn={world.l2 + 5}", code=2)
    assert _covered(world) in line
    assert fingerprint(dd) == before


# -- a data dir held by a running engram ---------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from engram.graph import Engine, EngineConfig
    e = Engine.open(sys.argv[1], EngineConfig(checkpoint_interval=3600), create=False)
    print("ready", flush=True)
    sys.stdin.read()  # hold the data dir until the test closes our stdin
    e.close()
    """
)


@pytest.fixture
def held(dd: Path) -> Iterator[tuple[Path, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(dd)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
        yield dd, proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_held_data_dir_refused_by_apply_log(world: World, held: tuple[Path, int]) -> None:
    d, pid = held
    apply_refused(d, [world.inc1], Target(), RestoreError, f"pid {pid}", "running")


def test_held_data_dir_refused_by_cli(world: World, held: tuple[Path, int]) -> None:
    d, pid = held
    before = fingerprint(d)
    line = cli_apply(d, f"--log={world.inc1}", code=1)
    assert f"pid {pid}" in line
    assert fingerprint(d) == before


def test_held_data_dir_refused_as_restore_pitr_output(world: World, held: tuple[Path, int],
                                                      tmp_path: Path) -> None:
    d, pid = held
    before = fingerprint(d)
    with pytest.raises(RestoreError) as ei:
        restore_pitr(world.base, [world.inc1], Target(lsn=world.l1), d, force=True)
    assert f"pid {pid}" in ei.value.message
    assert fingerprint(d) == before
    assert [p.name for p in d.parent.iterdir() if p.name.startswith(".dd.")] == []
    assert [p.name for p in d.parent.iterdir() if ".before-restore-" in p.name] == []


# -- a log of another history of the same database -------------------------------------------------


def _diverge(d: Path, n: int = 3) -> None:
    """Write ``n`` records to ``d`` that the logs do not have: same database, same LSNs as the
    logs' first records, other content (a restored copy someone wrote to, or a new timeline
    after a point-in-time recovery)."""
    e = Engine.open(d, CFG, create=False)
    try:
        for i in range(n):
            e.apply([{"op": "create_memory", "id": f"z{i}", "content": "another history"}])
    finally:
        e.close()


_DIVERGED = (
    "BUG pitr.py apply_sources()/scan_logs(): records up to the data dir's LSN are skipped as "
    "'already applied' without checking they are the same records, and the rest are appended: "
    "nothing compares the first replayed record's timestamp with the data dir's last one, nor "
    "the digest reached with the incremental header's digest. A log of a diverged history "
    "(same database id) is applied, the state is a mix of both histories, and the data dir no "
    "longer opens ('timestamp of LSN S+4 goes backwards')"
)


def test_log_of_diverged_history_refused_by_apply_log(world: World, dd: Path) -> None:
    _diverge(dd)
    apply_refused(dd, [world.inc1, world.inc2], Target(), EngramError)
    Engine.open(dd, CFG, create=False).close()


def test_log_of_diverged_history_refused_by_restore_pitr(world: World, dd: Path,
                                                         tmp_path: Path) -> None:
    _diverge(dd)
    e = Engine.open(dd, CFG, create=False)
    try:
        full_backup(e, tmp_path / "diverged.tar.zst")
    finally:
        e.close()
    out = tmp_path / "out"
    with pytest.raises(EngramError):
        restore_pitr(tmp_path / "diverged.tar.zst", [world.inc1, world.inc2],
                     Target(lsn=world.l2), out)
    assert not out.exists()
