"""The warm tier: the complete graph in SQLite (WAL mode) on local disk (docs/DESIGN.md O4).

One connection writes, inside a long-lived transaction that the engine commits at checkpoints;
``applied_lsn`` and the digest are written in that same transaction, so the file on disk always
says exactly which prefix of the log it contains. Reads made through the writing connection see
its uncommitted changes; other connections (backups, verify) see the last checkpoint.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import random
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from engram.digest import EMPTY, MOD, memory_hash, memory_rows_sum
from engram.errors import CorruptData, DiskFull, EngramError, Unavailable
from engram.format.record import Record
from engram.model import Edge, Memory, OpType, parse_edge_target

SCHEMA_VERSION = 1

# The full-text index over memories.content (an external-content FTS5 table).
FTS_ARGS = "content, content='memories', content_rowid='rowid'"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS memories (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    content TEXT NOT NULL,
    strength REAL NOT NULL,
    metadata TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_activated_at INTEGER NOT NULL,
    activation_count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS edges (
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    kind TEXT NOT NULL,
    weight REAL NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (src, dst, kind)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS edges_by_dst ON edges (dst, src, kind);
CREATE TABLE IF NOT EXISTS cold_stubs (
    id TEXT PRIMARY KEY,
    segment TEXT NOT NULL,
    archived_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cold_stubs_by_segment ON cold_stubs (segment);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- Named restore points: a name means the LSN of its marker record, once and for all (the first
-- marker of that name in the history; later ones are refused when planned).
CREATE TABLE IF NOT EXISTS marks (
    name TEXT PRIMARY KEY,
    lsn INTEGER NOT NULL,
    ts INTEGER NOT NULL
) WITHOUT ROWID;
CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5(
    {FTS_ARGS}
);
-- The full-text index is kept by WarmTier itself, not by triggers: a trigger makes FTS5 flush
-- its pending terms per row, and an index update is needed only when content changes.
DROP TRIGGER IF EXISTS memories_ai;
DROP TRIGGER IF EXISTS memories_ad;
DROP TRIGGER IF EXISTS memories_au;
CREATE TEMP TABLE IF NOT EXISTS stage (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    content TEXT NOT NULL,
    strength REAL NOT NULL,
    metadata TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_activated_at INTEGER NOT NULL,
    activation_count INTEGER NOT NULL,
    fts INTEGER NOT NULL DEFAULT 0
);
"""

_COLS = (
    "id, content, strength, metadata, created_at, updated_at, last_activated_at, activation_count"
)
_UPSERT_MEMORY = f"""
INSERT INTO memories ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET content=excluded.content, strength=excluded.strength,
  metadata=excluded.metadata, created_at=excluded.created_at, updated_at=excluded.updated_at,
  last_activated_at=excluded.last_activated_at, activation_count=excluded.activation_count
"""
_UPDATE_MEMORY = """
UPDATE memories SET content=?, strength=?, metadata=?, created_at=?, updated_at=?,
  last_activated_at=?, activation_count=? WHERE rowid=?
"""
_FTS_INSERT = "INSERT INTO memories_fts(rowid, content) VALUES (?, ?)"
_FTS_DELETE = "INSERT INTO memories_fts(memories_fts, rowid, content) VALUES ('delete', ?, ?)"
# A run of upserts through the staging table: five statements whatever the run's length.
_STAGE_INSERT = f"INSERT INTO temp.stage ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_STAGE_FTS_DELETE = """
INSERT INTO memories_fts(memories_fts, rowid, content)
SELECT 'delete', m.rowid, m.content FROM temp.stage s JOIN memories m ON m.id = s.id
WHERE m.content != s.content ORDER BY m.rowid
"""
_STAGE_MARK = """
UPDATE temp.stage SET fts = 1 WHERE NOT EXISTS
  (SELECT 1 FROM memories m WHERE m.id = stage.id AND m.content = stage.content)
"""
_STAGE_UPSERT = f"""
INSERT INTO memories ({_COLS}) SELECT {_COLS} FROM temp.stage WHERE true ORDER BY seq
ON CONFLICT(id) DO UPDATE SET content=excluded.content, strength=excluded.strength,
  metadata=excluded.metadata, created_at=excluded.created_at, updated_at=excluded.updated_at,
  last_activated_at=excluded.last_activated_at, activation_count=excluded.activation_count
"""
_STAGE_FTS_INSERT = """
INSERT INTO memories_fts(rowid, content)
SELECT m.rowid, m.content FROM temp.stage s JOIN memories m ON m.id = s.id WHERE s.fts = 1
ORDER BY m.rowid
"""
SMALL_RUN = 8

# OR IGNORE: redo is idempotent (O3), and a name keeps its first marker's LSN.
_MARK_INSERT = "INSERT OR IGNORE INTO marks (name, lsn, ts) VALUES (?, ?, ?)"
# The meta key saying every marker up to ``applied_lsn`` is in ``marks``. Without it, the data
# dir predates the table and the engine fills it from its log once (``Engine._fill_marks``).
MARKS_KEPT = "marks_kept"

_UPSERT_EDGE = """
INSERT INTO edges (src, dst, kind, weight, created_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT(src, dst, kind) DO UPDATE SET weight=excluded.weight, created_at=excluded.created_at
"""

_json_enc = msgspec.json.Encoder()
_json_dec = msgspec.json.Decoder(dict)


UPSERTS = frozenset({OpType.CREATE_MEMORY, OpType.UPDATE_MEMORY, OpType.UPDATE_STRENGTH})


def memory_row(m: Memory) -> tuple:
    """The SQL parameters of a memory upsert."""
    return (
        m.id,
        m.content,
        m.strength,
        _json_enc.encode(m.metadata).decode(),
        m.created_at,
        m.updated_at,
        m.last_activated_at,
        m.activation_count,
    )


def row_to_memory(r: tuple) -> Memory:
    return Memory(r[0], r[1], r[2], _json_dec.decode(r[3]), r[4], r[5], r[6], r[7])


def row_to_edge(r: tuple) -> Edge:
    return Edge(r[0], r[1], r[2], r[3], r[4])


def memory_rowids(conn: sqlite3.Connection) -> tuple[int | None, int | None, int]:
    """The lowest and highest rowid of the memories table (None when it is empty) and its
    number of rows, through ``conn`` (any connection to a warm tier database)."""
    lo, hi, count = conn.execute("SELECT min(rowid), max(rowid), count(*) FROM memories").fetchone()
    return lo, hi, count


def memory_rows(
    conn: sqlite3.Connection, lo: int | None = None, hi: int | None = None
) -> sqlite3.Cursor:
    """The memory rows with ``lo <= rowid <= hi`` (every row if either is None), through
    ``conn``, as (id, content, strength, metadata JSON, created_at, updated_at,
    last_activated_at, activation_count): the order ``digest.memory_rows_sum`` and verify's
    row checks read."""
    if lo is None or hi is None:
        return conn.execute(f"SELECT {_COLS} FROM memories")
    return conn.execute(f"SELECT {_COLS} FROM memories WHERE rowid BETWEEN ? AND ?", (lo, hi))


def connect(path: Path, readonly: bool = False, cache_mib: int = 64) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute(f"PRAGMA cache_size=-{cache_mib * 1024}")
    conn.execute("PRAGMA foreign_keys=OFF")
    return conn


# -- SQLite failures as engram errors ----------------------------------------------------------

_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_NOMEM, _SQLITE_IOERR = 5, 6, 7, 10
_SQLITE_CORRUPT, _SQLITE_FULL = 11, 13
# Below this much free space an I/O error while writing is taken for a full disk: SQLite reports
# a write that hit ENOSPC (the WAL index, a journal) as a bare "disk I/O error".
LOW_SPACE = 1 << 20


def disk_is_full(path: Path) -> bool:
    """True if the file system holding ``path`` has (almost) no space or no inodes left for
    this user (root may use the reserved blocks, so its share is counted for root)."""
    d = path
    while not d.is_dir() and d != d.parent:
        d = d.parent
    try:
        st = os.statvfs(d)
    except OSError:
        return False
    root = os.geteuid() == 0
    free = (st.f_bfree if root else st.f_bavail) * st.f_frsize
    inodes = st.f_ffree if root else st.f_favail
    return free < LOW_SPACE or (st.f_files > 0 and inodes == 0)


def disk_full(path: Path) -> DiskFull:
    where = path if path.is_dir() else path.parent
    return DiskFull(f"the disk holding {where} is full; free space and run the command again")


def sqlite_failure(e: sqlite3.Error, path: Path, doing: str) -> EngramError:
    """The engram error for SQLite failing while ``doing`` on the database at ``path``: a full
    disk, a busy database, or else damage (the message names ``engram verify --check-all``)."""
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    if code == _SQLITE_FULL or (code == _SQLITE_IOERR and disk_is_full(path)):
        return disk_full(path)
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return Unavailable(f"{path} is busy ({e}); retry shortly", retry_after=1.0)
    if code == _SQLITE_NOMEM:
        return EngramError(f"SQLite ran out of memory while {doing} ({path}); free memory")
    return CorruptData(
        f"{path}: {doing} failed ({e}); run `engram verify --check-all` on the data dir, "
        "then restore from a backup (docs/RUNBOOK.md)"
    )


_F = TypeVar("_F", bound=Callable[..., Any])


def _reads(doing: str) -> Callable[[_F], _F]:
    """A WarmTier read whose SQLite failures (a malformed page, an unreadable file) become
    engram errors naming the way out, never a raw sqlite3 error (a 500 in the server)."""

    def wrap(fn: _F) -> _F:
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(self: WarmTier, *args: Any, **kw: Any) -> Iterator[Any]:
                try:
                    yield from fn(self, *args, **kw)
                except sqlite3.DatabaseError as e:
                    raise sqlite_failure(e, self.path, doing) from None

            return gen  # type: ignore[return-value]

        @functools.wraps(fn)
        def call(self: WarmTier, *args: Any, **kw: Any) -> Any:
            try:
                return fn(self, *args, **kw)
            except sqlite3.DatabaseError as e:
                raise sqlite_failure(e, self.path, doing) from None

        return call  # type: ignore[return-value]

    return wrap


# -- the full-text index against the rows ------------------------------------------------------

_FTS_SHADOWS = ("data", "idx", "docsize", "config")
# FTS5's own check; rank=1 also compares the index with the content table, row by row.
_FTS_CHECK = "INSERT INTO {0}.memories_fts(memories_fts, rank) VALUES ('integrity-check', 1)"
_FTS_REBUILD = "INSERT INTO memories_fts(memories_fts) VALUES ('rebuild')"
# Failures that say nothing about the index: raised, never reported as damage.
_NOT_DAMAGE = (_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_NOMEM, _SQLITE_FULL)


def index_problem(conn: sqlite3.Connection, path: Path, readonly: bool) -> str | None:
    """What is wrong with the full-text index compared with the memories rows, as SQLite's
    FTS5 integrity-check reports it, or None when it matches them exactly.

    The check is an INSERT, refused on a read-only connection even though it writes nothing.
    With ``readonly`` it runs instead on a copy of the index in the connection's temp schema
    (the shadow tables' rows, byte for byte, over a temp view of main.memories as the content
    table), inside a savepoint that is rolled back: the database file is only read, and the
    temp schema lives in memory or in SQLite's anonymous temp file in the system temp dir. The
    b-tree pages holding the index are PRAGMA integrity_check's (and quick_check's) part, as
    are the ordinary indexes: integrity_check compares each with its table, which is all
    SQLite offers for them; it does not look inside FTS5 (SQLite 3.40)."""
    try:
        if not readonly:
            conn.execute(_FTS_CHECK.format("main"))
            return None
        conn.execute("SAVEPOINT engram_index_check")
        try:
            conn.execute(
                "CREATE TEMP VIEW memories AS SELECT rowid AS rowid, content FROM main.memories"
            )
            conn.execute(f"CREATE VIRTUAL TABLE temp.memories_fts USING fts5({FTS_ARGS})")
            for s in _FTS_SHADOWS:
                conn.execute(f"DELETE FROM temp.memories_fts_{s}")
                conn.execute(
                    f"INSERT INTO temp.memories_fts_{s} SELECT * FROM main.memories_fts_{s}"
                )
            conn.execute(_FTS_CHECK.format("temp"))
        finally:
            conn.execute("ROLLBACK TO engram_index_check")
            conn.execute("RELEASE engram_index_check")
    except sqlite3.DatabaseError as e:
        if (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF in _NOT_DAMAGE:
            raise sqlite_failure(e, path, "checking the full-text index") from None
        return str(e)
    return None


def _index_damaged(what: str) -> CorruptData:
    return CorruptData(
        f"the full-text index is damaged ({what}); run `engram verify --check-all`, then "
        "rebuild it with `engram rebuild-index` on the stopped data dir, or restore from a "
        "backup (docs/RUNBOOK.md)"
    )


def index_damage_message(problem: str, root: str = "the data dir") -> str:
    """The one line naming a full-text index that disagrees with its rows, and the way out."""
    return (
        f"the full-text index memories_fts does not match the memories rows ({problem}), so "
        f"recall can miss matches; the rows themselves are checked by the digest — stop engram "
        f"and run `engram rebuild-index --data-dir {root}` to rebuild it from them"
    )


class WarmTier:
    def __init__(self, path: Path, readonly: bool = False, cache_mib: int = 64) -> None:
        self.path = path
        self.readonly = readonly
        if not readonly:
            if not path.exists():
                try:
                    path.touch(mode=0o600)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise disk_full(path) from None
                    raise
        elif not path.exists():
            raise CorruptData(f"{path} is missing; the data dir is incomplete")
        try:
            self.conn = connect(path, readonly=readonly, cache_mib=cache_mib)
            if not readonly:
                fresh = not self._has_table("meta")
                self.conn.executescript(SCHEMA)
                self.conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                if fresh:  # nothing applied yet, so no marker is missing from ``marks``
                    self.conn.execute("INSERT OR IGNORE INTO meta VALUES (?, '1')", (MARKS_KEPT,))
            self.conn.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.DatabaseError as e:
            if hasattr(self, "conn"):
                self.conn.close()
            # A full disk (the -wal/-shm files cannot be made) is not damage: say which it is.
            err = sqlite_failure(e, path, "opening the warm tier")
            if isinstance(err, CorruptData):
                err = CorruptData(
                    f"{path}: cannot open the warm tier ({e}); restore from a backup "
                    "(docs/RUNBOOK.md)"
                )
            raise err from None
        self.in_txn = False

    # -- transactions --------------------------------------------------------------------

    def begin(self) -> None:
        if not self.in_txn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.in_txn = True

    def commit(self, applied_lsn: int, digest_hex: str, last_ts: int | None = None) -> None:
        """Record the covered LSN and digest in the same transaction as the changes (O4)."""
        self.begin()
        self.set_meta("applied_lsn", str(applied_lsn))
        self.set_meta("digest", digest_hex)
        if last_ts:
            self.set_meta("last_ts", str(last_ts))
        self.conn.execute("COMMIT")
        self.in_txn = False

    def rollback(self) -> None:
        if self.in_txn:
            # SQLite may have rolled back already (a failed COMMIT on a full disk, for one).
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self.in_txn = False

    def close(self) -> None:
        self.rollback()
        self.conn.close()

    # -- meta ----------------------------------------------------------------------------

    @_reads("reading the meta table")
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        r = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return r[0] if r else default

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    @property
    def applied_lsn(self) -> int:
        return int(self.get_meta("applied_lsn", "0") or 0)

    def _has_table(self, name: str) -> bool:
        q = "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?"
        return self.conn.execute(q, (name,)).fetchone() is not None

    # -- restore points ------------------------------------------------------------------

    @property
    def marks_kept(self) -> bool:
        """False for a data dir written before restore points were kept in ``marks``."""
        return self._has_table("marks") and self.get_meta(MARKS_KEPT) is not None

    def put_mark(self, name: str, lsn: int, ts_ns: int) -> None:
        self.conn.execute(_MARK_INSERT, (name, lsn, ts_ns))

    def fill_marks(self, marks: Iterable[tuple[str, int, int]]) -> None:
        """Record the (name, LSN, time) of markers already applied, and that ``marks`` is now
        complete, in one transaction of its own (the data dir's LSN does not move)."""
        self.begin()
        self.conn.executemany(_MARK_INSERT, marks)
        self.set_meta(MARKS_KEPT, "1")
        self.conn.execute("COMMIT")
        self.in_txn = False

    def get_mark(self, name: str) -> tuple[int, int] | None:
        """(LSN, time in ns) of the restore point ``name``, or None."""
        if self.readonly and not self._has_table("marks"):
            return None
        r = self.conn.execute("SELECT lsn, ts FROM marks WHERE name=?", (name,)).fetchone()
        return (int(r[0]), int(r[1])) if r else None

    def marks(self, upto_lsn: int) -> dict[str, tuple[int, int]]:
        """Every restore point at or before ``upto_lsn``: name -> (LSN, time in ns)."""
        if self.readonly and not self._has_table("marks"):
            return {}
        rows = self.conn.execute(
            "SELECT name, lsn, ts FROM marks WHERE lsn <= ? ORDER BY lsn", (upto_lsn,)
        )
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    # -- memories and edges --------------------------------------------------------------

    @_reads("reading a memory")
    def get_memory(self, mid: str) -> Memory | None:
        r = self.conn.execute(f"SELECT {_COLS} FROM memories WHERE id=?", (mid,)).fetchone()
        return row_to_memory(r) if r else None

    @_reads("reading memories")
    def get_memories(self, ids: Iterable[str]) -> dict[str, Memory]:
        ids = list(ids)
        out: dict[str, Memory] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"SELECT {_COLS} FROM memories WHERE id IN ({','.join('?' * len(chunk))})"
            for r in self.conn.execute(q, chunk):
                out[r[0]] = row_to_memory(r)
        return out

    def put_memory(self, m: Memory) -> None:
        """Insert or replace ``m``; the full-text index is touched only if the content changed.
        Idempotent (O3): it looks at the row as it is, not at what the caller expects."""
        self._put_row(memory_row(m))

    def _put_row(self, row: tuple) -> None:
        conn = self.conn
        old = conn.execute("SELECT rowid, content FROM memories WHERE id=?", (row[0],)).fetchone()
        if old is None:
            rowid = conn.execute(_UPSERT_MEMORY, row).lastrowid
            conn.execute(_FTS_INSERT, (rowid, row[1]))
            return
        conn.execute(_UPDATE_MEMORY, (*row[1:], old[0]))
        if old[1] != row[1]:
            conn.execute(_FTS_DELETE, (old[0], old[1]))
            conn.execute(_FTS_INSERT, (old[0], row[1]))

    def put_memories(self, ms: Iterable[Memory]) -> None:
        self._put_rows([memory_row(m) for m in ms])

    def _put_rows(self, rows: list[tuple]) -> None:
        """Upsert rows with distinct ids: one by one when few, else through the staging table."""
        if len(rows) < SMALL_RUN:
            for row in rows:
                self._put_row(row)
            return
        conn = self.conn
        conn.executemany(_STAGE_INSERT, rows)
        conn.execute(_STAGE_FTS_DELETE)
        conn.execute(_STAGE_MARK)
        conn.execute(_STAGE_UPSERT)
        conn.execute(_STAGE_FTS_INSERT)
        conn.execute("DELETE FROM temp.stage")

    def delete_memory(self, mid: str) -> None:
        self.conn.execute(
            "INSERT INTO memories_fts(memories_fts, rowid, content) "
            "SELECT 'delete', rowid, content FROM memories WHERE id=?",
            (mid,),
        )
        self.conn.execute("DELETE FROM memories WHERE id=?", (mid,))

    @_reads("reading an edge")
    def get_edge(self, src: str, dst: str, kind: str) -> Edge | None:
        r = self.conn.execute(
            "SELECT src, dst, kind, weight, created_at FROM edges WHERE src=? AND dst=? AND kind=?",
            (src, dst, kind),
        ).fetchone()
        return row_to_edge(r) if r else None

    def put_edge(self, e: Edge) -> None:
        self.conn.execute(_UPSERT_EDGE, (e.src, e.dst, e.kind, e.weight, e.created_at))

    def delete_edge(self, src: str, dst: str, kind: str) -> None:
        self.conn.execute("DELETE FROM edges WHERE src=? AND dst=? AND kind=?", (src, dst, kind))

    @_reads("reading edges")
    def edges_out(self, mid: str) -> list[Edge]:
        rows = self.conn.execute(
            "SELECT src, dst, kind, weight, created_at FROM edges WHERE src=?", (mid,)
        )
        return [row_to_edge(r) for r in rows]

    @_reads("reading edges")
    def edges_in(self, mid: str) -> list[Edge]:
        rows = self.conn.execute(
            "SELECT src, dst, kind, weight, created_at FROM edges WHERE dst=?", (mid,)
        )
        return [row_to_edge(r) for r in rows]

    def edges_of(self, mid: str) -> list[Edge]:
        out = self.edges_out(mid)
        out.extend(e for e in self.edges_in(mid) if e.src != mid)
        return out

    @_reads("reading edges")
    def edges_out_of(self, ids: list[str]) -> list[Edge]:
        """The out-edges of every memory in ``ids``, in (src, dst, kind) order."""
        out: list[Edge] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = self.conn.execute(
                "SELECT src, dst, kind, weight, created_at FROM edges "
                f"WHERE src IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            out.extend(row_to_edge(r) for r in rows)
        out.sort(key=Edge.key)
        return out

    def search(self, query: str, limit: int) -> list[tuple[str, float]]:
        """Full-text matches as (id, bm25 score, higher is better), best first, ties by id."""
        try:
            rows = self.conn.execute(
                "SELECT m.id, -bm25(memories_fts) FROM memories_fts JOIN memories m "
                "ON m.rowid = memories_fts.rowid WHERE memories_fts MATCH ? "
                "ORDER BY bm25(memories_fts), m.id LIMIT ?",
                (query, limit),
            )
            hits = rows.fetchall()
        except sqlite3.DatabaseError as e:
            if (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF != _SQLITE_CORRUPT:
                raise sqlite_failure(e, self.path, "searching the full-text index") from None
            raise _index_damaged(str(e)) from None
        # bm25 is NULL only when the index's own statistics are damaged.
        if any(not isinstance(score, float) for _, score in hits):
            raise _index_damaged("a match has no bm25 score")
        return hits

    def index_problem(self) -> str | None:
        """What is wrong with the full-text index compared with the rows, or None (module
        ``index_problem``); through this connection, so uncommitted changes are checked too."""
        return index_problem(self.conn, self.path, self.readonly)

    def rebuild_index(self) -> None:
        """Rebuild the full-text index from the memories rows. Inside the open transaction if
        there is one (committed with it at the next checkpoint), else in one of its own."""
        own = not self.in_txn
        try:
            self.begin()
            self.conn.execute(_FTS_REBUILD)
            if own:
                self.conn.execute("COMMIT")
                self.in_txn = False
        except sqlite3.DatabaseError as e:
            if own:
                self.rollback()
            raise sqlite_failure(e, self.path, "rebuilding the full-text index") from None

    @_reads("counting rows")
    def counts(self) -> tuple[int, int, int]:
        m = self.conn.execute("SELECT count(*) FROM memories").fetchone()[0]
        e = self.conn.execute("SELECT count(*) FROM edges").fetchone()[0]
        c = self.conn.execute("SELECT count(*) FROM cold_stubs").fetchone()[0]
        return m, e, c

    @_reads("counting cold stubs")
    def cold_stub_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM cold_stubs").fetchone()[0])

    @_reads("reading memory ids")
    def memory_ids_after(self, last: str, limit: int) -> list[str]:
        """Up to ``limit`` memory ids above ``last``, in id order: one page of a paged scan."""
        rows = self.conn.execute(
            "SELECT id FROM memories WHERE id > ? ORDER BY id LIMIT ?", (last, limit)
        )
        return [r[0] for r in rows]

    @_reads("reading edges")
    def edges_after(self, last: tuple[str, str, str], limit: int) -> list[Edge]:
        """Up to ``limit`` edges whose (src, dst, kind) is above ``last``, in that order: one
        page of a paged scan."""
        rows = self.conn.execute(
            "SELECT src, dst, kind, weight, created_at FROM edges "
            "WHERE (src, dst, kind) > (?, ?, ?) ORDER BY src, dst, kind LIMIT ?",
            (*last, limit),
        )
        return [row_to_edge(r) for r in rows]

    @_reads("sampling memories")
    def sample_contents(self, rng: random.Random, k: int) -> list[tuple[str, str]]:
        """(id, content) of about ``k`` memories picked at random by rowid (gaps left by
        deleted rows make it fewer), in rowid order."""
        top = self.conn.execute("SELECT max(rowid) FROM memories").fetchone()[0] or 0
        if not top:
            return []
        picks = sorted({rng.randint(1, top) for _ in range(k)})
        out: list[tuple[str, str]] = []
        for i in range(0, len(picks), 500):
            chunk = picks[i : i + 500]
            q = f"SELECT id, content FROM memories WHERE rowid IN ({','.join('?' * len(chunk))})"
            out.extend((r[0], r[1]) for r in self.conn.execute(q, chunk))
        return out

    # -- the SQLite WAL during a backup cut ------------------------------------------------

    def hold_wal_checkpoints(self, hold: bool) -> None:
        """Stop (``hold``) or restart SQLite's automatic WAL checkpoints on this connection.
        While they are held, only an explicit checkpoint writes the main database file."""
        self.conn.execute(f"PRAGMA wal_autocheckpoint={0 if hold else 1000}")

    @property
    def wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def checkpoint_wal_passive(self) -> None:
        """Copy what the WAL holds into the main file from a connection of its own; passive,
        so it never waits for this tier's writer (nor makes it wait)."""
        conn = sqlite3.connect(str(self.path), timeout=5)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    # -- read snapshots ------------------------------------------------------------------

    def pin_snapshot(self) -> tuple[int, str]:
        """Start a read transaction and return the (applied LSN, digest) of the state it pins:
        every read through this connection sees that state until it is closed."""
        self.conn.execute("BEGIN")
        return self.applied_lsn, self.get_meta("digest", EMPTY) or EMPTY

    @_reads("reading memories")
    def iter_memories(self, batch: int = 5000) -> Iterator[Memory]:
        last = ""
        while True:
            rows = self.conn.execute(
                f"SELECT {_COLS} FROM memories WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            for r in rows:
                yield row_to_memory(r)
            last = rows[-1][0]

    @_reads("reading memories")
    def digest_sum(
        self, overrides: dict[str, Memory], committed_sum: Callable[[Path], int] | None = None
    ) -> int:
        """Sum (mod 2^256) of the memory hashes of every row, in any order, with ``overrides``
        (newer versions held by the fast tier) taking the place of rows. The rows are read
        through this connection in this process, unless ``committed_sum`` is given and this
        connection has nothing uncommitted: ``committed_sum(path)`` then gives their sum from
        the committed database file (whoever passes it makes sure nothing commits meanwhile)."""
        if committed_sum is None or self.conn.in_transaction:
            total = memory_rows_sum(memory_rows(self.conn), _json_dec.decode)
        else:
            total = committed_sum(self.path)
        for mid, m in overrides.items():
            r = self.conn.execute(f"SELECT {_COLS} FROM memories WHERE id=?", (mid,)).fetchone()
            if r is not None:
                total += memory_hash(m) - memory_rows_sum((r,), _json_dec.decode)
        return total % MOD

    @_reads("reading edges")
    def iter_edges(self, batch: int = 5000) -> Iterator[Edge]:
        last = ("", "", "")
        while True:
            rows = self.conn.execute(
                "SELECT src, dst, kind, weight, created_at FROM edges "
                "WHERE (src, dst, kind) > (?, ?, ?) ORDER BY src, dst, kind LIMIT ?",
                (*last, batch),
            ).fetchall()
            if not rows:
                return
            for r in rows:
                yield row_to_edge(r)
            last = (rows[-1][0], rows[-1][1], rows[-1][2])

    # -- redo ----------------------------------------------------------------------------

    def apply_batch(self, recs: list[Record], afters: list[Any]) -> None:
        """Redo records whose after images are already decoded (``afters[i]`` for ``recs[i]``;
        for memory upserts, their ``memory_row``), runs of memory upserts in a few set-based
        statements; the same effect as redoing each record alone from its after-image (O3)."""
        # A run of upserts keeps each id once, at the place of its first upsert (so new rows
        # get their rowids in log order) and with its last after-image (full images, O3): the
        # same end state as applying each, with one full-text index change per memory.
        run: dict[str, tuple] = {}
        for rec, after in zip(recs, afters, strict=True):
            op = rec.op
            if op in UPSERTS:
                run[after[0]] = after
                continue
            if run:
                self._put_rows(list(run.values()))
                run = {}
            if op == OpType.DELETE_MEMORY:
                self.delete_memory(rec.target)
            elif op == OpType.CREATE_EDGE:
                self.put_edge(after)
            elif op == OpType.DELETE_EDGE:
                self.delete_edge(*parse_edge_target(rec.target))
            elif op == OpType.MARKER:
                self.put_mark(rec.target, rec.lsn, rec.ts_ns)
        if run:
            self._put_rows(list(run.values()))
