"""The fast tier: a RAM working set under a byte budget (docs/DESIGN.md O4).

It caches memories as they are read and written and keeps the most-activated ones when it has to
evict. Activations are write-back: they are logged (O1), applied here only, and reach the warm
tier at the next checkpoint (or when their entry is evicted), so a hot memory activated a
thousand times between checkpoints costs one SQLite write. A dirty entry is never dropped without
being written to the warm tier first.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable

from engram.model import Memory

_OVERHEAD = 200  # dict slot, struct header, metadata dict: a rough per-entry cost in bytes


def rank_hot(memories: Iterable[Memory], limit: int) -> list[str]:
    """Ids of the ``limit`` most-activated of ``memories``, most activated first."""
    return [m.id for m in heapq.nlargest(limit, memories, key=lambda m: m.activation_count)]


def memory_size(m: Memory) -> int:
    return _OVERHEAD + len(m.id) + len(m.content) + 32 * len(m.metadata)


class FastTier:
    def __init__(self, budget_bytes: int, write_back: Callable[[Iterable[Memory]], None]) -> None:
        self.budget = budget_bytes
        self._write_back = write_back
        self._items: dict[str, Memory] = {}
        self._sizes: dict[str, int] = {}
        self._dirty: set[str] = set()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def get(self, mid: str) -> Memory | None:
        m = self._items.get(mid)
        if m is None:
            self.misses += 1
        else:
            self.hits += 1
        return m

    def put(self, m: Memory, dirty: bool = False) -> None:
        """Cache ``m``; ``dirty`` means the warm tier does not have this version yet."""
        if self.budget <= 0:
            if dirty:
                self._write_back([m])
            return
        size = memory_size(m)
        old = self._sizes.get(m.id)
        if old is not None:
            self.bytes -= old
            del self._items[m.id]  # re-inserted at the end: the newest are evicted last
        self._items[m.id] = m
        self._sizes[m.id] = size
        self.bytes += size
        if dirty:
            self._dirty.add(m.id)
        else:
            self._dirty.discard(m.id)
        if self.bytes > self.budget:
            self._evict()

    def discard(self, mid: str) -> None:
        if mid in self._items:
            del self._items[mid]
            self.bytes -= self._sizes.pop(mid)
            self._dirty.discard(mid)

    def take_dirty(self) -> list[Memory]:
        """The dirty memories, now marked clean: the caller writes them to the warm tier."""
        out = [self._items[i] for i in self._dirty]
        self._dirty.clear()
        return out

    def dirty_snapshot(self) -> list[Memory]:
        """The versions the warm tier does not have yet (they stay dirty)."""
        return [self._items[i] for i in self._dirty]

    def snapshot(self) -> list[Memory]:
        """The cached memories (a list copy: rank it without holding the engine lock)."""
        return list(self._items.values())

    def hot_ids(self, limit: int) -> list[str]:
        """The ``limit`` most-activated cached memories, most activated first."""
        return rank_hot(self._items.values(), limit)

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()
        self._dirty.clear()
        self.bytes = 0

    def _evict(self) -> None:
        # Evict down to 90% of the budget. Candidates are the oldest-cached entries (dict
        # order; a write re-inserts at the end), about twice as many as needed; the least
        # activated of them go. O(k log k) for k evicted, not a sort of the whole cache, since
        # this runs under the engine lock.
        target = int(self.budget * 0.9)
        chosen: list[Memory] = []
        left = self.bytes
        taken: set[str] = set()
        while left > target and len(taken) < len(self._items):
            avg = max(1, self.bytes // max(1, len(self._items)))
            k = min(len(self._items), 2 * ((left - target) // avg) + 16)
            pool = [m for m in itertools.islice(self._items.values(), k) if m.id not in taken]
            if not pool:
                break
            pool.sort(key=lambda m: (m.activation_count, m.last_activated_at))
            for m in pool[: max(1, len(pool) // 2)]:
                if left <= target:
                    break
                chosen.append(m)
                taken.add(m.id)
                left -= self._sizes[m.id]
        # Write back before dropping: if the write fails the entries stay cached and dirty, so
        # the next checkpoint cannot commit an applied_lsn that lacks them.
        flush = [m for m in chosen if m.id in self._dirty]
        if flush:
            self._write_back(flush)
        for m in chosen:
            self.discard(m.id)
