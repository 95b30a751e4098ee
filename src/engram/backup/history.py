"""The tree of histories of a repository (docs/DESIGN.md "Histories").

Every backup carries its history's lineage (manifest, log header, catalog entry). Before a
backup's catalog entry is created, each history of that lineage but the original one (whose id
is the database id) is published as ``histories/<id>.json`` with the store's create, never
replacing one (ids are unique, so an existing file already says the same). The files make the
tree readable without opening any backup: ``engram history`` prints it, and ``restore-pitr
--repo`` follows the newest history (or the one ``--history`` names) along its path back to the
original one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram.errors import UsageError
from engram.format import history as hist
from engram.storage import BackupStore, as_store

PREFIX = "histories/"


def publish_lineage(store: BackupStore, database_id: str, lineage: Any) -> None:
    """Create the history file of each history of ``lineage`` (as a catalog entry or header
    carries it) that ``store`` lacks; the original history needs none (its id is the database
    id, which every backup names). ValueError when ``lineage`` is malformed."""
    for h in hist.lineage_from_json(lineage, database_id)[1:]:
        name = hist.history_file_name(h.id)
        if store.exists(name):
            continue
        try:
            store.create(name, hist.encode_history_file(h, database_id))
        except FileExistsError:  # another backup published it meanwhile: the same content
            pass


@dataclass
class HistoryTree:
    """The histories of a repository by id, with the database each belongs to."""

    histories: dict[str, hist.History] = field(default_factory=dict)
    databases: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # history files that cannot be read

    def add_original(self, database_id: str) -> None:
        """A database's original history, implied by any backup of it."""
        if database_id not in self.histories:
            self.histories[database_id] = hist.original(database_id)
            self.databases[database_id] = database_id

    def lineage(self, history_id: str) -> hist.Lineage:
        """The path from the original history to ``history_id``; UsageError naming the history
        whose file is missing."""
        out: list[hist.History] = []
        at: str | None = history_id
        while at is not None:
            h = self.histories.get(at)
            if h is None:
                raise UsageError(
                    f"history {at} is not in the repository (no histories/{at}.json); "
                    "copy that file from where the backups were taken, or choose another "
                    "--history"
                )
            out.append(h)
            at = h.parent
            if len(out) > len(self.histories):
                raise UsageError(f"the history files of {history_id} form a loop; repair them")
        return tuple(reversed(out))

    def newest(self, ids: Iterable[str] | None = None) -> hist.History:
        """The history that began last (of ``ids``, default all): what a recovery is continued
        by (PostgreSQL's ``recovery_target_timeline = latest``)."""
        pool = [self.histories[i] for i in (ids or self.histories) if i in self.histories]
        if not pool:
            raise UsageError("the repository holds no backups, hence no history")
        return max(pool, key=lambda h: (h.branch_time_ns, h.branch_lsn, h.id))

    def children(self, history_id: str) -> list[hist.History]:
        return sorted(
            (h for h in self.histories.values() if h.parent == history_id),
            key=lambda h: (h.branch_time_ns, h.id),
        )


def read_tree(repo: Path | BackupStore, database_ids: Iterable[str] = ()) -> HistoryTree:
    """The history files of ``repo`` (a directory or a store), plus the original history of
    each of ``database_ids``. A damaged file is reported in ``problems`` and left out."""
    store = as_store(repo)
    tree = HistoryTree()
    for db in database_ids:
        tree.add_original(db)
    for name in store.list(PREFIX):
        if not name.endswith(".json"):
            continue
        try:
            h, db = hist.decode_history_file(store.read(name))
        except (OSError, ValueError) as e:
            tree.problems.append(f"{name}: unreadable ({e}); not used")
            continue
        if name != hist.history_file_name(h.id):
            tree.problems.append(f"{name}: it describes history {h.id}; not used")
            continue
        tree.histories[h.id] = h
        tree.databases[h.id] = db
        if h.parent is None:
            continue
        tree.add_original(db)
    return tree


def tree_report(repo: Path | BackupStore, entries: Iterable[Any]) -> dict[str, Any]:
    """The tree as ``engram history --json`` prints it: every history (id, parent, branch LSN
    and time, why it began, the backups on it) original ones first, children after their
    parent, and the newest history. ``entries``: the repository's catalog entries (anything
    with ``history``, ``database_id``, ``name``, ``kind``, ``from_lsn``, ``to_lsn``,
    ``status``)."""
    from engram.model import ns_to_iso

    entries = list(entries)
    tree = read_tree(repo, {e.database_id for e in entries})
    on: dict[str, list[dict[str, Any]]] = {}
    for e in sorted(entries, key=lambda e: (e.to_lsn, e.name)):
        if e.history not in tree.histories:
            tree.problems.append(
                f"{e.name}: its history {e.history} has no file in histories/; it is left out"
            )
            continue
        on.setdefault(e.history, []).append(
            {
                "name": e.name,
                "kind": e.kind,
                "from_lsn": e.from_lsn,
                "to_lsn": e.to_lsn,
                "validation": e.status,
            }
        )
    rows: list[dict[str, Any]] = []

    def walk(h: hist.History, depth: int) -> None:
        rows.append(
            {
                "id": h.id,
                "database_id": tree.databases.get(h.id, h.id),
                "parent": h.parent,
                "branch_lsn": h.branch_lsn,
                "branch_time": ns_to_iso(h.branch_time_ns) if h.branch_time_ns else None,
                "began": {"command": h.command, "target": h.target},
                "depth": depth,
                "backups": on.get(h.id, []),
            }
        )
        for c in tree.children(h.id):
            walk(c, depth + 1)

    roots = sorted((h for h in tree.histories.values() if h.parent is None), key=lambda h: h.id)
    for r in roots:
        walk(r, 0)
    orphans = [
        h
        for h in tree.histories.values()
        if h.parent is not None and h.parent not in tree.histories
    ]
    for h in orphans:
        tree.problems.append(f"history {h.id}: its parent {h.parent} has no file in histories/")
        walk(h, 0)
    newest = tree.newest().id if tree.histories else None
    return {"histories": rows, "newest": newest, "problems": tree.problems}
