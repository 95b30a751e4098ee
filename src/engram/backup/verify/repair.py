"""The way out of the full-text index damage ``verify --check-all`` reports: rebuild the index
from the memories rows of a stopped data dir."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.datadir import DirLock, Layout, read_identity
from engram.errors import CorruptData
from engram.tiers.warm import WarmTier


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
