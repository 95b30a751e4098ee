"""Target times (issue 8, item 10): a time engram cannot represent is a usage error naming it,
and a local time that a clock change makes ambiguous or non-existent is read by one rule (the
UTC offset in force before the change) and said so.

``read_time`` runs in-process with TZ set around the call (``time.tzset``, restored after); the
command's text and JSON output are checked through ``engram restore-pitr`` in a subprocess with
TZ in its environment. Europe/Berlin in 2025: the clocks went forward at 02:00 on 30 March
(02:00-03:00 does not exist) and back at 03:00 on 26 October (02:00-03:00 occurs twice).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from engram.backup.full import full_backup
from engram.backup.pitr import TIME_MAX_NS, Target, read_time
from engram.errors import UsageError
from engram.graph import Engine, EngineConfig

BERLIN = "Europe/Berlin"
CLI = [sys.executable, "-m", "engram.cli"]


@contextmanager
def tz(name: str) -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def _utc_ns(*args: int) -> int:
    d = dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[misc]
    return int(d.timestamp()) * 1_000_000_000


def _berlin_available() -> bool:
    with tz(BERLIN):
        return time.localtime(_utc_ns(2025, 7, 1) // 10**9).tm_gmtoff == 7200


needs_tzdata = pytest.mark.skipif(not _berlin_available(), reason="no tz database for Berlin")


# -- times engram cannot represent -----------------------------------------------------------------

UNREPRESENTABLE = [
    "0001-01-01 00:00:00",
    "0001-01-01T00:00:00+14:00",
    "0001-01-01T00:00:00-14:00",
    "9999-12-31 23:59:59",
    "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59+14:00",
    "1969-12-31T23:59:59Z",
    "1900-01-01 00:00:00",
    "2262-04-11T23:47:17Z",  # one second past what a signed 64-bit count of ns holds
]


@pytest.mark.parametrize("zone", ["UTC", "ENG-14:00", BERLIN])
@pytest.mark.parametrize("text", UNREPRESENTABLE)
def test_an_unrepresentable_time_is_a_usage_error_naming_it(text: str, zone: str) -> None:
    with tz(zone), pytest.raises(UsageError) as ei:
        read_time(text)
    assert repr(text) in ei.value.message and "cannot be represented" in ei.value.message
    assert "1970-01-01T00:00:00" in ei.value.message and "\n" not in ei.value.message
    assert ei.value.exit_code == 2


def test_the_ends_of_the_range_are_accepted() -> None:
    assert read_time("1970-01-01T00:00:00Z") == (0, None)
    ns, _ = read_time("2262-04-11T23:47:16.854775Z")
    assert ns == 9_223_372_036_854_775_000 <= TIME_MAX_NS
    with tz("ENG-14:00"):  # UTC+14: local 1970-01-01 14:00 is the epoch
        assert read_time("1970-01-01 14:00:00") == (0, None)


@pytest.mark.parametrize("text", ["0001-01-01 00:00:00", "0001-01-01T00:00:00+14:00"])
def test_the_cli_refuses_an_unrepresentable_time_with_exit_2(text: str, tmp_path: Path) -> None:
    p = subprocess.run(
        [*CLI, "restore-pitr", f"--base-backup={tmp_path / 'none.tar.zst'}",
         f"--target-time={text}", f"--output={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=60, env=os.environ | {"TZ": BERLIN},
    )
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be represented" in lines[0] and text in lines[0]
    assert "unexpected" not in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


# -- clock changes ---------------------------------------------------------------------------------


@needs_tzdata
def test_an_ordinary_local_time_has_no_note() -> None:
    with tz(BERLIN):
        assert read_time("2025-06-01 12:00:00") == (_utc_ns(2025, 6, 1, 10), None)
        assert read_time("2025-12-01 12:00:00") == (_utc_ns(2025, 12, 1, 11), None)


@needs_tzdata
def test_an_ambiguous_local_time_is_its_first_occurrence() -> None:
    with tz(BERLIN):
        ns, note = read_time("2025-10-26 02:30:00")
    # 02:30 CEST (UTC+02:00) comes an hour before 02:30 CET.
    assert ns == _utc_ns(2025, 10, 26, 0, 30)
    assert note is not None and "occurs twice" in note and "first occurrence" in note
    assert "+02:00" in note and "2025-10-26T00:30:00" in note


@needs_tzdata
def test_a_non_existent_local_time_lands_after_the_gap() -> None:
    with tz(BERLIN):
        ns, note = read_time("2025-03-30 02:30:00")
    # Read with the offset before the change (CET, UTC+01:00): 01:30Z, i.e. 03:30 CEST.
    assert ns == _utc_ns(2025, 3, 30, 1, 30)
    assert note is not None and "does not exist" in note and "before the change" in note
    assert "+01:00" in note and "2025-03-30T01:30:00" in note and "03:30:00" in note


@needs_tzdata
def test_an_explicit_offset_needs_no_rule() -> None:
    with tz(BERLIN):
        for text in ("2025-10-26T02:30:00+01:00", "2025-03-30T02:30:00Z"):
            assert read_time(text)[1] is None
        assert read_time("2025-10-26T02:30:00+01:00")[0] == _utc_ns(2025, 10, 26, 1, 30)
        target = Target.from_options("2025-10-26 02:30:00", None, None, required=True)
    assert target.note is not None and target.time_ns == _utc_ns(2025, 10, 26, 0, 30)


def _last_sunday_1utc(year: int, month: int) -> int:
    """01:00 UTC on the last Sunday of ``month``: when the EU's clocks change."""
    d = dt.date(year, month + 1, 1) - dt.timedelta(days=1)
    d -= dt.timedelta(days=(d.weekday() - 6) % 7)
    return _utc_ns(d.year, d.month, d.day, 1)


YEAR = 2099  # records are written with timestamps in this year (after any real clock)
SPRING = _last_sunday_1utc(YEAR, 3)  # 02:00 CET -> 03:00 CEST
AUTUMN = _last_sunday_1utc(YEAR, 10)  # 03:00 CEST -> 02:00 CET
HOUR = 3600 * 10**9


@dataclass
class World:
    base: Path
    oplog: Path
    lsns: dict[int, int]  # record time -> its LSN


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A base backup taken now, then records whose timestamps straddle both of YEAR's clock
    changes (the engine's clock never goes back, so raising its last timestamp makes the next
    writes carry that time)."""
    root = tmp_path_factory.mktemp("tt")
    eng = Engine.open(root / "src", EngineConfig(checkpoint_interval=3600))
    lsns: dict[int, int] = {}
    try:
        eng.apply([{"op": "create_memory", "id": "m", "content": "x"}])
        full_backup(eng, root / "full.tar.zst")
        for i, ts in enumerate((SPRING - HOUR, SPRING + HOUR, AUTUMN - HOUR, AUTUMN)):
            eng.last_ts = ts
            res = eng.apply([{"op": "create_memory", "id": f"t{i}", "content": "y"}])
            assert eng.last_ts == ts
            lsns[ts] = res.lsn
    finally:
        eng.close()
    return World(root / "full.tar.zst", root / "src" / "oplog", lsns)


def _pitr(w: World, out: Path, when: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "restore-pitr", f"--base-backup={w.base}", f"--operation-log={w.oplog}",
         f"--target-time={when}", f"--output={out}", *extra],
        capture_output=True, text=True, timeout=120, env=os.environ | {"TZ": BERLIN},
    )


CASES = [
    # a wall time in the spring gap: read at UTC+01:00, so it lands after the gap and the
    # record an hour after the change (SPRING + 1 h = 04:00 CEST) is not reached
    (f"{YEAR}-03-{dt.datetime.fromtimestamp(SPRING // 10**9, dt.UTC).day} 02:30:00",
     SPRING + HOUR // 2, SPRING - HOUR, "does not exist"),
    # a wall time that occurs twice in autumn: its first occurrence (UTC+02:00), 00:30Z, is
    # after AUTUMN - 1 h and before AUTUMN (the second occurrence would include AUTUMN)
    (f"{YEAR}-10-{dt.datetime.fromtimestamp(AUTUMN // 10**9, dt.UTC).day} 02:30:00",
     AUTUMN - HOUR // 2, AUTUMN - HOUR, "occurs twice"),
]


@needs_tzdata
@pytest.mark.parametrize(("when", "utc", "last", "words"), CASES, ids=["gap", "twice"])
def test_the_command_says_how_it_read_the_time(
    world: World, tmp_path: Path, when: str, utc: int, last: int, words: str
) -> None:
    with tz(BERLIN):
        assert read_time(when)[0] == utc
    p = _pitr(world, tmp_path / "text", when)
    assert p.returncode == 0, (p.stdout, p.stderr)
    notes = [line for line in p.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and words in notes[0], p.stdout
    assert f"to LSN {world.lsns[last]} " in p.stdout
    q = _pitr(world, tmp_path / "json", when, "--json")
    assert q.returncode == 0, (q.stdout, q.stderr)
    res = json.loads(q.stdout)
    assert words in res["target_note"] and res["reached_lsn"] == world.lsns[last]


@needs_tzdata
def test_an_ordinary_time_has_no_note_in_the_output(world: World, tmp_path: Path) -> None:
    p = _pitr(world, tmp_path / "o", f"{YEAR}-07-01 12:00:00", "--json")
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert json.loads(p.stdout)["target_note"] is None
