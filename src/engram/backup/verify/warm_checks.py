"""The warm tier's checks (`engram verify`'s checks 1-4 and 6): identity, SQLite's structure and
the full-text index, the memory and edge rows with their share of the digest, cold stubs, and
the digest recomputed from the rows against the stored one.

Every check reads one SQLite read transaction, so rows, ``applied_lsn`` and the stored digest
are one committed state. Nothing is written: SQLite is opened read-only (``immutable=1`` when no
process owns the dir and no WAL is present, so not even ``-wal``/``-shm`` files appear).

When no process owns the data dir nobody can commit, so other connections see the same file:
with ``Resources.scan_workers`` above 1, helper processes scan parts of the memory rows
(``rowscan.split_scan``) and SQLite's structure check runs in a thread beside the scans (SQLite
releases the GIL). With one, or on a live data dir, everything runs in turn on this connection.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engram import digest as dg
from engram.backup import rowcheck
from engram.backup.rowcheck import loc_id
from engram.backup.rowscan import split_scan
from engram.backup.verify.log_chain import HEX64, IMAGE_ERRORS
from engram.backup.verify.report import Findings, short
from engram.datadir import Layout, read_identity
from engram.errors import DataDirError, EngramError
from engram.format import record as fmt
from engram.model import ID_RE, Edge
from engram.procs import Resources
from engram.tiers.warm import index_damage_message, index_problem

BATCH = rowcheck.BATCH
REQUIRED_TABLES = ("memories", "edges", "cold_stubs", "meta")
WARM = "warm/engram.db"
FTS_LOCATION = "warm/engram.db table memories_fts"


def _structure_check(
    conn: sqlite3.Connection,
    pragma: str,
    index: tuple[Path, Path] | None,
    index_found: list[str] | None = None,
) -> list[tuple[str, str]]:
    """The problems SQLite's ``quick_check`` or ``integrity_check`` reports, then (``index`` =
    (database, data dir), with --check-all) FTS5's check of the full-text index against the
    rows, which integrity_check does not make: as (location, message). What FTS5 said of an
    index that disagrees with the rows is also appended to ``index_found``."""
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
                if index_found is not None:
                    index_found.append(problem)
    return found


class WarmChecks:
    """The warm tier's checks of the data dir at ``root``, in the order ``verify_data_dir``
    runs them; findings go to ``found``."""

    def __init__(self, found: Findings, root: Path, resources: Resources) -> None:
        self.found = found
        self.report = found.report
        self.root = root
        self.lay = Layout(root)
        self.resources = resources
        self.conn: sqlite3.Connection | None = None
        self.immutable = False
        self.uri = ""
        self._structure: tuple[threading.Thread, list[tuple[str, str]], list[float]] | None = None
        self._index_found: list[str] = []  # what FTS5 said of a damaged index
        self.tables_ok = False
        self.identity_id: str | None = None
        self.meta: dict[str, str] = {}
        self.applied: int | None = None
        self.stored: dg.Digest | None = None
        self.mem_hash = 0
        self.edge_hash = 0
        self.undecodable = 0
        self.complete: set[str] = set()  # the scans that read every row

    @property
    def database_id(self) -> str | None:
        """The database the log must belong to: identity.json's, else the warm tier's."""
        return self.identity_id or self.meta.get("database_id")

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

    # -- 1. identity and the warm tier ---------------------------------------------------

    def check_identity(self) -> None:
        try:
            ident = read_identity(self.root)
        except DataDirError as e:
            self.found.problem("identity", "identity.json", e.message)
            return
        self.identity_id = self.report.database_id = ident.database_id
        if ident.format_version != fmt.FORMAT_VERSION:
            self.found.problem(
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
            self.found.problem("sqlite", "warm/engram.db", "the warm tier file is missing")
            return
        try:
            self.conn = self._connect()
            # One read transaction for every warm check: rows, applied_lsn and digest agree.
            self.conn.execute("BEGIN")
            names = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as e:
            self.found.problem("sqlite", "warm/engram.db", f"cannot be opened: {e}")
            self.close()
            return
        missing = [t for t in REQUIRED_TABLES if t not in names]
        for t in missing:
            self.found.problem("sqlite", f"warm/engram.db table {t}", "the table is missing")
        self.tables_ok = not missing
        if "meta" in names:
            self._read_meta()
        pragma = self.report.sqlite_check
        # The full-text index check reads every row and its index entries: --check-all only.
        index = (db, self.root) if self.report.check_all else None
        if self.report.live or self.resources.scan_workers < 2:  # in turn, on this connection
            self._structure_found(_structure_check(self.conn, pragma, index, self._index_found))
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
                    found.extend(_structure_check(conn, pragma, index, self._index_found))
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
            self.found.problem("sqlite", location, message)
        if self._index_found:
            self.report.index_problem = self._index_found[0]

    def _read_meta(self) -> None:
        assert self.conn is not None
        try:
            self.meta = {
                str(k): str(v) for k, v in self.conn.execute("SELECT key, value FROM meta")
            }
        except sqlite3.DatabaseError as e:
            self.found.problem("sqlite", "warm/engram.db table meta", f"unreadable: {e}")
            return
        raw = self.meta.get("applied_lsn", "0")
        try:
            self.applied = int(raw)
            if self.applied < 0:
                raise ValueError
        except ValueError:
            self.found.problem("sqlite", "meta applied_lsn", f"{raw!r} is not a log position")
            self.applied = None
        self.report.applied_lsn = self.applied
        d = self.meta.get("digest", dg.EMPTY)
        if HEX64.fullmatch(d):
            self.stored = dg.Digest.from_hex(d)
            self.report.digest_stored = d
        else:
            self.found.problem("digest", "meta digest", f"{d!r} is not a 64-hex-digit digest")
        wid = self.meta.get("database_id")
        if wid is not None and self.identity_id is not None and wid != self.identity_id:
            self.found.problem(
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
                rowcheck.MODULE,
                lambda a, b: rowcheck.scan(conn, a, b),
                rowcheck.decode,
                self.resources.scan_workers,
            )
        for part in parts:
            self.report.memories += part.rows
            self.mem_hash += part.hash_sum
            self.undecodable += part.undecodable
            self.found.digest_seconds += part.hash_seconds / len(parts)
            for location, message in part.listed:
                self.found.problem("memories", location, message)
            self.found.unlisted("memories", part.problems - len(part.listed))
        self.complete.add("memories")
        self.report.checks["memories"].detail = f"{self.report.memories} memories"

    # -- 2. edges (and their share of the digest) ------------------------------------------

    def check_edges(self) -> None:
        dangling = 0
        total = 0
        self.report.checks["edges"].detail = "read failed"

        def problem(location: str, message: str) -> None:
            self.found.problem("edges", location, message)

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
            if rowcheck.edge_rows_pass(rows):  # then only hashed (rowcheck's docstring)
                t = time.perf_counter()
                try:
                    total += dg.edge_rows_sum(rows)
                    self.found.digest_seconds += time.perf_counter() - t
                    continue
                except IMAGE_ERRORS:
                    pass
            edges: list[Edge] = []
            for r in rows:
                edge, dangles = rowcheck.check_edge_row(r, problem)
                dangling += dangles
                edges.append(edge)
            t = time.perf_counter()
            for e in edges:
                try:
                    total += dg.edge_hash(e)
                except IMAGE_ERRORS:
                    self.undecodable += 1
            self.found.digest_seconds += time.perf_counter() - t
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
                    self.found.problem(
                        "cold", loc_id("cold stub", sid), "id does not follow the id rule"
                    )
                h = _segment_hash(seg)
                if h is None:
                    self.found.problem(
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
                self.found.problem("cold", loc, f"the segment is missing; {who}")
                continue
            except OSError as e:
                self.found.problem("cold", loc, f"cannot be read ({e.strerror}); {who}")
                continue
            if actual != h:
                self.found.problem("cold", loc, f"content sha256 is {actual}, not its name; {who}")
        self.report.cold_stubs = n
        self.report.cold_segments = len(by_segment)
        self.report.checks["cold"].detail = f"{n} stubs, {len(by_segment)} segments"

    # -- 6. the digest -----------------------------------------------------------------------

    def check_digest(self) -> None:
        res = self.report.checks["digest"]
        if not self.tables_ok or self.conn is None:
            self.found.skip("digest", "warm tier unreadable")
            return
        if not {"memories", "edges"} <= self.complete:
            self.found.skip("digest", "the warm tier could not be read completely")
            return
        if self.undecodable:
            self.found.problem(
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
            self.found.problem(
                "digest",
                "meta digest",
                f"stored {self.stored.hex} but the rows give {recomputed.hex}{cold}",
            )
        res.detail = (
            f"stored {short(self.report.digest_stored)}, recomputed {short(recomputed.hex)}"
        )
        end = self.report.log_end_digest
        if end and end != self.report.digest_stored:
            res.detail += f", log end {short(end)}"


def _segment_hash(seg: object) -> str | None:
    """The content hash a stub names; accepts ``<hex>``, ``<hex>.seg`` and ``cold/<hex>.seg``."""
    if not isinstance(seg, str):
        return None
    s = seg.removeprefix("cold/").removesuffix(".seg")
    return s if HEX64.fullmatch(s) else None
