"""Checking a data dir without changing it (`engram verify`; docs/DESIGN.md "Validation
levels").

Every check runs and every problem is collected with its location (restic's checker), capped per
check so that a badly damaged store still gives a readable report. Nothing is written: SQLite is
opened read-only (``immutable=1`` when no process owns the dir and no WAL is present, so not even
``-wal``/``-shm`` files appear) and log segments are only read. Nothing is recovered either.

Safe on a live data dir: the warm tier is read in one SQLite read transaction, so rows,
``applied_lsn`` and the stored digest are one committed state, and the log is read after that
snapshot is taken, so it always reaches ``applied_lsn`` (the engine commits the warm tier only
after the log is durable, O4). Records past ``applied_lsn`` are simply not checkpointed yet: they
are checked for framing and continuity and replayed into the log-end digest, never counted as
warm-tier problems. A torn tail of the last segment is a warning (recovery cuts it, O5).
"""

from __future__ import annotations

import hashlib
import math
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from engram import digest as dg
from engram.backup import rowcheck
from engram.backup.rowcheck import MAX_LISTED, loc_id
from engram.datadir import DirLock, Layout, read_identity, read_owner
from engram.errors import CorruptData, CorruptLog, DataDirError, EngramError
from engram.format import record as fmt
from engram.model import ID_RE, KIND_RE, Edge, OpType
from engram.oplog.reader import LogFile, list_segments
from engram.procs import at_idle_priority
from engram.tiers.rowsum import split_scan
from engram.tiers.warm import WarmTier, index_damage_message, index_problem

BATCH = 5000
CHECKS = ("identity", "sqlite", "memories", "edges", "cold", "oplog", "digest")
REQUIRED_TABLES = ("memories", "edges", "cold_stubs", "meta")
WARM = "warm/engram.db"
FTS_LOCATION = "warm/engram.db table memories_fts"
HEX64 = re.compile(r"[0-9a-f]{64}")
# Digest-neutral records: markers carry no state; archiving keeps a memory in the logical graph.
_NO_DIGEST = frozenset({OpType.MARKER, OpType.ARCHIVE_MEMORIES, OpType.RESTORE_MEMORIES})
_IMAGE_ERRORS = (msgspec.MsgspecError, TypeError, ValueError, AttributeError)


@dataclass(frozen=True)
class Problem:
    check: str
    location: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "location": self.location, "message": self.message}


@dataclass
class CheckResult:
    """One check's outcome: ``status`` is ok, fail or skipped; ``problems`` counts all found."""

    name: str
    status: str = "ok"
    detail: str = ""
    problems: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "detail": self.detail,
            "problems": self.problems,
            "seconds": round(self.seconds, 6),
        }


@dataclass
class VerifyReport:
    root: Path
    check_all: bool
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    checks: dict[str, CheckResult] = field(
        default_factory=lambda: {n: CheckResult(n) for n in CHECKS}
    )
    database_id: str | None = None
    live: bool = False
    sqlite_check: str = "quick_check"
    memories: int = 0
    edges: int = 0
    cold_stubs: int = 0
    cold_segments: int = 0
    applied_lsn: int | None = None
    log_first_lsn: int | None = None
    log_last_lsn: int | None = None
    segments_checked: int = 0
    records_checked: int = 0
    digest_stored: str | None = None
    digest_recomputed: str | None = None
    log_end_digest: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def durations(self) -> dict[str, float]:
        return {n: c.seconds for n, c in self.checks.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "data_dir": str(self.root),
            "check_all": self.check_all,
            "database_id": self.database_id,
            "live": self.live,
            "sqlite_check": self.sqlite_check,
            "memories": self.memories,
            "edges": self.edges,
            "cold_stubs": self.cold_stubs,
            "cold_segments": self.cold_segments,
            "applied_lsn": self.applied_lsn,
            "log_first_lsn": self.log_first_lsn,
            "log_last_lsn": self.log_last_lsn,
            "segments_checked": self.segments_checked,
            "records_checked": self.records_checked,
            "digest_stored": self.digest_stored,
            "digest_recomputed": self.digest_recomputed,
            "log_end_digest": self.log_end_digest,
            "seconds": round(self.seconds, 6),
            "checks": {n: c.to_dict() for n, c in self.checks.items()},
            "problems": [p.to_dict() for p in self.problems],
            "warnings": [w.to_dict() for w in self.warnings],
        }


def verify_data_dir(root: Path, check_all: bool = False) -> VerifyReport:
    """Check the data dir at ``root``; never raises for damage, never writes."""
    t0 = time.perf_counter()
    v = _Verifier(Path(root), check_all)
    try:
        v.run()
    finally:
        v.close()
        v.finish()
    v.report.seconds = time.perf_counter() - t0
    return v.report


@dataclass
class IndexRebuild:
    """What ``rebuild_index`` did: ``problem`` is what the check found before (None: the index
    matched the rows already)."""

    data_dir: str
    memories: int
    problem: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "memories": self.memories,
            "problem": self.problem,
            "seconds": round(self.seconds, 6),
        }


def rebuild_index(root: Path) -> IndexRebuild:
    """Rebuild the full-text index of the stopped data dir at ``root`` from its memories rows
    (the way out of the index damage ``verify --check-all`` reports), holding the data dir's
    lock meanwhile, so a running server is refused. The rows are not changed, so neither is the
    digest; the index is checked against them afterwards."""
    t0 = time.perf_counter()
    root = Path(root)
    read_identity(root)  # "not an engram data dir" before anything is created
    lock = DirLock(root)
    lock.acquire()
    try:
        warm = WarmTier(Layout(root).warm_db)
        try:
            before = warm.index_problem()
            warm.rebuild_index()
            after = warm.index_problem()
            memories = warm.counts()[0]
        finally:
            warm.close()
    finally:
        lock.release()
    if after is not None:
        raise CorruptData(
            f"{root}: the full-text index still does not match the rows after a rebuild "
            f"({after}); run `engram verify --check-all`, then restore from a backup"
        )
    return IndexRebuild(str(root), memories, before, time.perf_counter() - t0)


def _structure_check(
    conn: sqlite3.Connection, pragma: str, index: tuple[Path, Path] | None
) -> list[tuple[str, str]]:
    """The problems SQLite's ``quick_check`` or ``integrity_check`` reports, then (``index`` =
    (database, data dir), with --check-all) FTS5's check of the full-text index against the
    rows, which integrity_check does not make: as (location, message)."""
    try:
        found = [
            (WARM, f"{pragma}: {msg}") for (msg,) in conn.execute(f"PRAGMA {pragma}") if msg != "ok"
        ]
    except sqlite3.DatabaseError as e:
        found = [(WARM, f"{pragma} failed: {e}")]
    if index is not None:
        db, root = index
        try:
            problem = index_problem(conn, db, readonly=True)
        except EngramError as e:
            found.append((FTS_LOCATION, f"the full-text index check could not run: {e.message}"))
        else:
            if problem is not None:
                found.append((FTS_LOCATION, index_damage_message(problem, str(root))))
    return found


class _Verifier:
    def __init__(self, root: Path, check_all: bool) -> None:
        self.root = root
        self.lay = Layout(root)
        self.report = VerifyReport(root, check_all)
        self.report.sqlite_check = "integrity_check" if check_all else "quick_check"
        self.listed: dict[str, int] = {n: 0 for n in CHECKS}
        self.conn: sqlite3.Connection | None = None
        self.immutable = False
        self.uri = ""
        self._structure: tuple[threading.Thread, list[tuple[str, str]], list[float]] | None = None
        self.tables_ok = False
        self.identity_id: str | None = None
        self.meta: dict[str, str] = {}
        self.applied: int | None = None
        self.stored: dg.Digest | None = None
        self.mem_hash = 0
        self.edge_hash = 0
        self.undecodable = 0
        self.complete: set[str] = set()  # the scans that read every row
        self.digest_seconds = 0.0

    # -- bookkeeping ---------------------------------------------------------------------

    def problem(self, check: str, location: str, message: str) -> None:
        c = self.report.checks[check]
        c.problems += 1
        c.status = "fail"
        if self.listed[check] < MAX_LISTED:
            self.listed[check] += 1
            self.report.problems.append(Problem(check, location, message))

    def unlisted(self, check: str, n: int) -> None:
        """``n`` more problems of ``check`` found elsewhere and not listed there."""
        if n > 0:
            c = self.report.checks[check]
            c.problems += n
            c.status = "fail"

    def warn(self, check: str, location: str, message: str) -> None:
        self.report.warnings.append(Problem(check, location, message))

    def skip(self, check: str, why: str) -> None:
        c = self.report.checks[check]
        if c.status == "ok":
            c.status = "skipped"
        c.detail = why

    def finish(self) -> None:
        for name, c in self.report.checks.items():
            if c.problems > self.listed[name]:
                more = c.problems - self.listed[name]
                self.report.problems.append(
                    Problem(name, "*", f"and {more} more problems of this check not listed")
                )

    def close(self) -> None:
        if self._structure is not None:  # run() stopped early: let the check end
            self._structure[0].join()
            self._structure = None
        if self.conn is not None:
            try:
                self.conn.close()
            except sqlite3.Error:
                pass
            self.conn = None

    def _timed(self, name: str, fn: Any) -> None:
        t, d = time.perf_counter(), self.digest_seconds
        try:
            fn()
        except sqlite3.DatabaseError as e:
            # Damage met mid-scan (malformed page, unreadable file): the check stops, others run.
            self.problem(name, "warm/engram.db", f"reading for the {name} check failed: {e}")
        # Hashing done during this scan is the digest check's time, not this one's.
        hashing = self.digest_seconds - d
        self.report.checks[name].seconds += time.perf_counter() - t - hashing

    # -- the run -------------------------------------------------------------------------

    def run(self) -> None:
        if not self.root.is_dir():
            self.problem("identity", str(self.root), "the data dir does not exist")
            for n in CHECKS[1:]:
                self.skip(n, "no data dir")
            return
        self.report.live = read_owner(self.root) is not None
        self._timed("identity", self.check_identity)
        # The warm snapshot must be taken before the log is read (see the module docstring).
        self._timed("sqlite", self.check_sqlite)
        if self.conn is not None and self.tables_ok:
            self._timed("memories", self.check_memories)
            self._timed("edges", self.check_edges)
            self._timed("cold", self.check_cold)
        else:
            for n in ("memories", "edges", "cold"):
                self.skip(n, "warm tier unreadable")
        self.finish_sqlite()
        self._timed("oplog", self.check_oplog)
        self._timed("digest", self.check_digest)
        self.report.checks["digest"].seconds += self.digest_seconds
        if self.immutable and read_owner(self.root) is not None:
            self.warn(
                "sqlite",
                "engram.lock",
                "a process opened the data dir while verify ran; rerun verify for a "
                "consistent result",
            )

    # -- 1. identity and the warm tier ---------------------------------------------------

    def check_identity(self) -> None:
        try:
            ident = read_identity(self.root)
        except DataDirError as e:
            self.problem("identity", "identity.json", e.message)
            return
        self.identity_id = self.report.database_id = ident.database_id
        if ident.format_version != fmt.FORMAT_VERSION:
            self.problem(
                "identity",
                "identity.json",
                f"format version {ident.format_version} is not the one this engram reads "
                f"({fmt.FORMAT_VERSION}); use a matching engram version",
            )
        self.report.checks["identity"].detail = f"database {ident.database_id}"

    def _connect(self) -> sqlite3.Connection:
        db = self.lay.warm_db
        wal = db.with_name(db.name + "-wal")
        # With no owner and no WAL the file alone is the committed state: read it as immutable,
        # which creates no -wal/-shm files. Otherwise SQLite must read the WAL (read-only).
        self.immutable = not self.report.live and not wal.exists()
        self.uri = uri = f"file:{db}?mode=ro" + ("&immutable=1" if self.immutable else "")
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA cache_size=-65536")
        return conn

    def check_sqlite(self) -> None:
        res = self.report.checks["sqlite"]
        db = self.lay.warm_db
        if not db.is_file():
            self.problem("sqlite", "warm/engram.db", "the warm tier file is missing")
            return
        try:
            self.conn = self._connect()
            # One read transaction for every warm check: rows, applied_lsn and digest agree.
            self.conn.execute("BEGIN")
            names = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as e:
            self.problem("sqlite", "warm/engram.db", f"cannot be opened: {e}")
            self.close()
            return
        missing = [t for t in REQUIRED_TABLES if t not in names]
        for t in missing:
            self.problem("sqlite", f"warm/engram.db table {t}", "the table is missing")
        self.tables_ok = not missing
        if "meta" in names:
            self._read_meta()
        pragma = self.report.sqlite_check
        # The full-text index check reads every row and its index entries: --check-all only.
        index = (db, self.root) if self.report.check_all else None
        if self.report.live or at_idle_priority():  # at idle priority: one core, in turn
            self._structure_found(_structure_check(self.conn, pragma, index))
            res.detail = self._sqlite_detail()
            return
        # Nobody can commit: a second connection checks the file's structure in a thread
        # (SQLite releases the GIL) while the row scans run; finish_sqlite collects it.
        found: list[tuple[str, str]] = []
        took = [0.0]

        def check() -> None:
            t = time.perf_counter()
            try:
                conn = sqlite3.connect(self.uri, uri=True, isolation_level=None)
                try:
                    found.extend(_structure_check(conn, pragma, index))
                finally:
                    conn.close()
            except sqlite3.DatabaseError as e:
                found.append((WARM, f"{pragma} failed: {e}"))
            took[0] = time.perf_counter() - t

        thread = threading.Thread(target=check, name="engram-verify-sqlite")
        thread.start()
        self._structure = (thread, found, took)

    def finish_sqlite(self) -> None:
        """Wait for the structure check started by ``check_sqlite`` and record what it found."""
        if self._structure is None:
            return
        thread, found, took = self._structure
        thread.join()
        self._structure = None
        self._structure_found(found)
        res = self.report.checks["sqlite"]
        res.seconds += took[0]
        res.detail = self._sqlite_detail()

    def _sqlite_detail(self) -> str:
        checked = self.report.sqlite_check
        if self.report.checks["sqlite"].problems:
            return checked
        return f"{checked}: ok" + (", full-text index: ok" if self.report.check_all else "")

    def _structure_found(self, found: list[tuple[str, str]]) -> None:
        for location, message in found:
            self.problem("sqlite", location, message)

    def _read_meta(self) -> None:
        assert self.conn is not None
        try:
            self.meta = {
                str(k): str(v) for k, v in self.conn.execute("SELECT key, value FROM meta")
            }
        except sqlite3.DatabaseError as e:
            self.problem("sqlite", "warm/engram.db table meta", f"unreadable: {e}")
            return
        raw = self.meta.get("applied_lsn", "0")
        try:
            self.applied = int(raw)
            if self.applied < 0:
                raise ValueError
        except ValueError:
            self.problem("sqlite", "meta applied_lsn", f"{raw!r} is not a log position")
            self.applied = None
        self.report.applied_lsn = self.applied
        d = self.meta.get("digest", dg.EMPTY)
        if HEX64.fullmatch(d):
            self.stored = dg.Digest.from_hex(d)
            self.report.digest_stored = d
        else:
            self.problem("digest", "meta digest", f"{d!r} is not a 64-hex-digit digest")
        wid = self.meta.get("database_id")
        if wid is not None and self.identity_id is not None and wid != self.identity_id:
            self.problem(
                "sqlite",
                "meta database_id",
                f"the warm tier belongs to database {wid} but identity.json says "
                f"{self.identity_id}; restore the data dir from a backup",
            )
        if self.identity_id is None and wid is not None:
            self.report.database_id = wid

    def _rows(self, sql: str) -> Iterator[list[Any]]:
        assert self.conn is not None
        cur = self.conn.execute(sql)
        while True:
            rows = cur.fetchmany(BATCH)
            if not rows:
                return
            yield rows

    # -- 3. memories (and their share of the digest) --------------------------------------

    def check_memories(self) -> None:
        self.report.checks["memories"].detail = "read failed"
        conn = self.conn
        assert conn is not None
        if self.report.live:  # one read transaction: rows, applied_lsn and digest agree
            parts = [rowcheck.scan(conn)]
        else:  # nobody can commit: helper processes may scan parts of the same file
            parts = split_scan(
                conn,
                self.uri,
                "engram.backup.rowcheck",
                lambda a, b: rowcheck.scan(conn, a, b),
                rowcheck.decode,
            )
        for part in parts:
            self.report.memories += part.rows
            self.mem_hash += part.hash_sum
            self.undecodable += part.undecodable
            self.digest_seconds += part.hash_seconds / len(parts)
            for location, message in part.listed:
                self.problem("memories", location, message)
            self.unlisted("memories", part.problems - len(part.listed))
        self.complete.add("memories")
        self.report.checks["memories"].detail = f"{self.report.memories} memories"

    # -- 2. edges (and their share of the digest) ------------------------------------------

    def check_edges(self) -> None:
        dangling = 0
        total = 0
        self.report.checks["edges"].detail = "read failed"
        # Archived memories still exist (their stubs stand in for them), so an edge may end there.
        missing = (
            "(NOT EXISTS (SELECT 1 FROM memories m WHERE m.id = e.{0}) AND "
            "NOT EXISTS (SELECT 1 FROM cold_stubs c WHERE c.id = e.{0}))"
        )
        sql = (
            "SELECT e.src, e.dst, e.kind, e.weight, e.created_at, "
            f"{missing.format('src')}, {missing.format('dst')} FROM edges e"
        )
        for rows in self._rows(sql):
            self.report.edges += len(rows)
            edges: list[Edge] = []
            for src, dst, kind, weight, created, no_src, no_dst in rows:
                if no_src or no_dst:
                    dangling += 1
                    ends = [
                        f"{w} {v!r}"
                        for w, v, gone in (("src", src, no_src), ("dst", dst, no_dst))
                        if gone
                    ]
                    self.problem(
                        "edges",
                        f"edge {src}->{dst} ({kind})",
                        " and ".join(ends) + " does not exist",
                    )
                if not isinstance(kind, str) or not KIND_RE.fullmatch(kind):
                    self.problem(
                        "edges", f"edge {src}->{dst} ({kind})", "kind does not follow the kind rule"
                    )
                if (
                    isinstance(weight, bool)
                    or not isinstance(weight, (int, float))
                    or (not math.isfinite(weight))
                ):
                    self.problem(
                        "edges",
                        f"edge {src}->{dst} ({kind})",
                        f"weight {weight!r} is not a finite number",
                    )
                if not isinstance(created, int):
                    self.problem(
                        "edges",
                        f"edge {src}->{dst} ({kind})",
                        f"created_at {created!r} is not a timestamp",
                    )
                edges.append(Edge(src, dst, kind, weight, created))
            t = time.perf_counter()
            for e in edges:
                try:
                    total += dg.edge_hash(e)
                except _IMAGE_ERRORS:
                    self.undecodable += 1
            self.digest_seconds += time.perf_counter() - t
        self.edge_hash = total
        self.complete.add("edges")
        self.report.checks["edges"].detail = f"{self.report.edges} edges" + (
            f", {dangling} dangling" if dangling else ""
        )

    # -- 4. cold stubs ---------------------------------------------------------------------

    def check_cold(self) -> None:
        by_segment: dict[str, tuple[int, str]] = {}
        n = 0
        for rows in self._rows("SELECT id, segment FROM cold_stubs"):
            n += len(rows)
            for sid, seg in rows:
                if not isinstance(sid, str) or not ID_RE.fullmatch(sid):
                    self.problem("cold", loc_id("cold stub", sid), "id does not follow the id rule")
                h = _segment_hash(seg)
                if h is None:
                    self.problem(
                        "cold",
                        loc_id("cold stub", sid),
                        f"segment {seg!r} is not a content-hash segment name",
                    )
                    continue
                count, first = by_segment.get(h, (0, sid))
                by_segment[h] = (count + 1, first)
        for h, (count, first) in sorted(by_segment.items()):
            path = self.lay.cold / f"{h}.seg"
            loc = f"cold/{h}.seg"
            who = f"{count} stub(s) (first: {first}) reference it"
            try:
                with open(path, "rb") as f:
                    actual = hashlib.file_digest(f, "sha256").hexdigest()
            except FileNotFoundError:
                self.problem("cold", loc, f"the segment is missing; {who}")
                continue
            except OSError as e:
                self.problem("cold", loc, f"cannot be read ({e.strerror}); {who}")
                continue
            if actual != h:
                self.problem("cold", loc, f"content sha256 is {actual}, not its name; {who}")
        self.report.cold_stubs = n
        self.report.cold_segments = len(by_segment)
        self.report.checks["cold"].detail = f"{n} stubs, {len(by_segment)} segments"

    # -- 5. the op log (and 6. its digest chain) ---------------------------------------------

    def check_oplog(self) -> None:
        segs = list_segments(self.lay.oplog)
        res = self.report.checks["oplog"]
        applied = self.applied
        if not segs:
            res.detail = "no segments"
            if applied:
                self.warn(
                    "oplog",
                    "oplog/",
                    f"no log segments although the warm tier is at LSN {applied}; records up "
                    "to it cannot be replayed from this data dir (start-up opens a new segment)",
                )
            return
        expected_id = self.identity_id or self.meta.get("database_id")
        # Replay from the segment holding applied_lsn+1 (or from the first with --check-all), so
        # the log is checked to reproduce the stored digest at applied_lsn and its end is known.
        start = 0
        if not self.report.check_all and applied is not None:
            start = max((i for i, (f, _) in enumerate(segs) if f <= applied + 1), default=0)
        chain = _Chain(self, applied, self.stored)
        expect: int | None = None
        last_ts = 0
        log_end: int | None = None
        tail_read = False  # the last segment was read to its end: log_end is the true end
        for i, (first, path) in enumerate(segs):
            name = f"oplog/{path.name}"
            last = i == len(segs) - 1
            try:
                lf = LogFile.open(path)
            except CorruptLog as e:
                # (The writer renames a segment into place whole, so a live log never shows a
                # partial header; a segment can vanish only through pruning.)
                if not path.exists():
                    self.warn("oplog", name, "the segment was removed while verify ran")
                else:
                    self.problem("oplog", name, e.message.removeprefix(f"{path}: "))
                expect = None
                chain.lost()
                continue
            self.report.segments_checked += 1
            h_first = lf.header.get("first_lsn")
            if lf.database_id != expected_id and expected_id is not None:
                self.problem(
                    "oplog",
                    name,
                    f"belongs to database {lf.database_id}, not {expected_id}; move it out of "
                    "oplog/",
                )
                expect = None
                chain.lost()
                continue
            if h_first != first:
                self.problem("oplog", name, f"header says first LSN {h_first}, name says {first}")
            if expect is not None and first != expect:
                what = "missing" if first > expect else "overlapping"
                self.problem(
                    "oplog",
                    name,
                    f"starts at LSN {first} but the previous segment ends at {expect - 1}: "
                    f"records {min(first, expect)}..{max(first, expect) - 1} are {what}",
                )
            chain.segment_start(i >= start, first, lf.header.get("base_digest"), name)
            damaged = False
            first_ts: int | None = None
            try:
                for rec in lf.records(allow_torn_tail=last):
                    if first_ts is None:
                        first_ts = rec.ts_ns
                    self.report.records_checked += 1
                    chain.record(rec, name)
            except CorruptLog as e:
                damaged = True
                msg = e.message.removeprefix(f"{path.name}: ")
                self.problem("oplog", f"{name}@{e.details.get('offset')}", msg)
                chain.lost()
            if lf.first_lsn is not None:
                if lf.first_lsn != first:
                    self.problem("oplog", name, f"first record is LSN {lf.first_lsn}, not {first}")
                if first_ts is not None and first_ts < last_ts:
                    self.problem("oplog", name, "timestamps go backwards from the previous segment")
                last_ts = lf.last_ts
                if self.report.log_first_lsn is None:
                    self.report.log_first_lsn = lf.first_lsn
            if lf.torn is not None:
                self.warn(
                    "oplog",
                    f"{name}@{lf.torn.offset}",
                    f"torn tail ({lf.torn.reason}); start-up cuts it, nothing acknowledged is lost",
                )
            end = lf.last_lsn if lf.last_lsn is not None else first - 1
            expect = None if damaged else end + 1
            if last or not damaged:
                log_end = end if log_end is None else max(log_end, end)
            tail_read = last and not damaged
        self.report.log_last_lsn = log_end
        self.report.log_end_digest = chain.end_digest(log_end)
        if applied is not None:
            if segs[0][0] > applied + 1:
                self.problem(
                    "oplog",
                    f"oplog/{segs[0][1].name}",
                    f"the warm tier is at LSN {applied} but the log starts at {segs[0][0]}: "
                    f"records {applied + 1}..{segs[0][0] - 1} are missing",
                )
            # (Damage in the last segment hides where the log ends: reported above instead.)
            if tail_read and log_end is not None and log_end < applied:
                self.problem(
                    "oplog",
                    "meta applied_lsn",
                    f"applied_lsn {applied} is past the log end {log_end}: the log lost records",
                )
        res.detail = (
            f"{self.report.segments_checked} segments, {self.report.records_checked} records, "
            f"LSN {self.report.log_first_lsn}..{log_end}, applied {applied}"
        )

    # -- 6. the digest -----------------------------------------------------------------------

    def check_digest(self) -> None:
        res = self.report.checks["digest"]
        if not self.tables_ok or self.conn is None:
            self.skip("digest", "warm tier unreadable")
            return
        if not {"memories", "edges"} <= self.complete:
            self.skip("digest", "the warm tier could not be read completely")
            return
        if self.undecodable:
            self.problem(
                "digest",
                "warm/engram.db",
                f"{self.undecodable} rows cannot be hashed (see the memories and edges checks); "
                "the digest cannot be recomputed",
            )
            return
        recomputed = dg.Digest(self.mem_hash + self.edge_hash)
        self.report.digest_recomputed = recomputed.hex
        if self.stored is not None and recomputed != self.stored:
            cold = (
                f" ({self.report.cold_stubs} archived memories live in cold segments)"
                if self.report.cold_stubs
                else ""
            )
            self.problem(
                "digest",
                "meta digest",
                f"stored {self.stored.hex} but the rows give {recomputed.hex}{cold}",
            )
        res.detail = (
            f"stored {_short(self.report.digest_stored)}, recomputed {_short(recomputed.hex)}"
        )
        if self.report.log_end_digest and self.report.log_end_digest != self.report.digest_stored:
            res.detail += f", log end {_short(self.report.log_end_digest)}"


class _Chain:
    """The rolling digest along the log (O7): each segment's ``base_digest`` is the digest at
    its first LSN - 1, and replaying before/after images moves it record by record. At
    ``applied_lsn`` it must equal the warm tier's stored digest; past it, it gives the log-end
    digest. ``rolling`` is None when unknown (not replaying yet, or after damage): the next
    segment's header is then adopted without a comparison."""

    def __init__(self, v: _Verifier, applied: int | None, stored: dg.Digest | None) -> None:
        self.v = v
        self.applied = applied
        self.stored = stored
        self.rolling: dg.Digest | None = None
        self.origin = ""
        self.replaying = False
        self.last_lsn: int | None = None  # the LSN ``rolling`` (or the damage) stands at
        self.lost_at: int | None = None
        # The log-end digest is trustworthy only if no record past applied_lsn went unreplayed.
        self.end_unknown = False

    def lost(self) -> None:
        if self.replaying and self.lost_at is None:
            self.lost_at = self.last_lsn if self.last_lsn is not None else 0
        self.rolling = None

    def segment_start(self, replay: bool, first: int, base: Any, name: str) -> None:
        self.replaying = self.replaying or replay
        if not self.replaying:
            return
        if self.lost_at is not None:
            # Records (lost_at, first - 1] were not replayed: past applied_lsn they are missing
            # from the log-end digest.
            if self.applied is None or first - 1 > max(self.lost_at, self.applied):
                self.end_unknown = True
            self.lost_at = None
        self.last_lsn = first - 1
        if not (isinstance(base, str) and HEX64.fullmatch(base)):
            self.v.problem("digest", name, f"header base_digest {base!r} is not a digest")
            self.lost()
            return
        if self.rolling is None:
            self.rolling = dg.Digest.from_hex(base)
            self.origin = f"the base_digest of {name}"
        elif self.rolling.hex != base:
            self.v.problem(
                "digest",
                name,
                f"header base_digest {base} differs from the digest {self.rolling.hex} the log "
                f"gives at LSN {first - 1}",
            )
        self._at(first - 1, name)

    def record(self, rec: fmt.Record, name: str) -> None:
        if self.rolling is None:
            return
        self.last_lsn = rec.lsn
        if rec.op not in _NO_DIGEST:
            t = time.perf_counter()
            try:
                self.rolling.replace(rec.decode_before(), rec.decode_after())
            except _IMAGE_ERRORS as e:
                self.v.problem("digest", f"{name} LSN {rec.lsn}", f"undecodable image ({e})")
                self.lost()
                return
            finally:
                self.v.digest_seconds += time.perf_counter() - t
        if rec.txn_end:
            self._at(rec.lsn, name)

    def _at(self, lsn: int, name: str) -> None:
        if lsn != self.applied or self.stored is None or self.rolling is None:
            return
        if self.rolling != self.stored:
            self.v.problem(
                "digest",
                f"{name} LSN {lsn}",
                f"replaying the log from {self.origin} gives {self.rolling.hex} at applied_lsn "
                f"{lsn}, but the warm tier stores {self.stored.hex}",
            )
        # From here on the stored digest is the reference (the committed warm state).
        self.rolling = self.stored.copy()
        self.origin = "the stored digest"

    def end_digest(self, log_end: int | None) -> str | None:
        if self.applied is not None and log_end is not None and log_end <= self.applied:
            return self.stored.hex if self.stored is not None else None
        if self.end_unknown or self.rolling is None or self.last_lsn != log_end:
            return None
        return self.rolling.hex


def _segment_hash(seg: object) -> str | None:
    """The content hash a stub names; accepts ``<hex>``, ``<hex>.seg`` and ``cold/<hex>.seg``."""
    if not isinstance(seg, str):
        return None
    s = seg.removeprefix("cold/").removesuffix(".seg")
    return s if HEX64.fullmatch(s) else None


def _short(hexd: str | None) -> str:
    return f"{hexd[:16]}…" if hexd else "-"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def render_text(report: VerifyReport) -> str:
    """A readable summary: one line per check, then each problem and warning as
    ``location: message``."""
    mode = "integrity_check" if report.check_all else "quick_check"
    lines = [f"verify {report.root} ({mode}{', live' if report.live else ''})"]
    for name, c in report.checks.items():
        status = {"ok": "ok", "fail": "FAIL", "skipped": "skip"}[c.status]
        extra = f", {_count(c.problems, 'problem')}" if c.problems else ""
        lines.append(f"  {name:<9} {status:<5} {c.detail}{extra} ({c.seconds:.2f}s)")
    n, w = len(report.problems), len(report.warnings)
    total = sum(c.problems for c in report.checks.values())
    verdict = "OK" if report.ok else "FAIL"
    lines.append(
        f"result: {verdict}: {_count(total, 'problem')}, {_count(w, 'warning')} "
        f"({report.seconds:.2f}s)"
    )
    if n:
        lines.append("problems:")
        lines += [f"  {p.location}: {p.message}" for p in report.problems]
    if w:
        lines.append("warnings:")
        lines += [f"  {p.location}: {p.message}" for p in report.warnings]
    return "\n".join(lines) + "\n"
