"""Valid random op batches for the backup and PITR tests: creates, updates, activations,
deletes, links and unlinks (and, when asked, named restore points), tracking which memories and
edges exist as the planner's overlay sees them (batches are atomic)."""

from __future__ import annotations

import random
from typing import Any

KINDS = ("related", "causes", "part-of")
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


class OpGen:
    def __init__(self, rng: random.Random, marks: float = 0.0) -> None:
        self.rng = rng
        self.mark_chance = marks  # the share of ops that are named restore points
        self.mems: list[str] = []
        self.edges: set[tuple[str, str, str]] = set()
        self.n = 0
        self.marks = 0

    def _text(self) -> str:
        return " ".join(self.rng.choices(WORDS, k=self.rng.randint(1, 6)))

    def op(self) -> dict[str, Any]:
        r = self.rng
        kinds = ["create"] * 4
        if self.mems:
            kinds += ["update"] * 2 + ["activate"] * 3 + ["delete"] + ["link"] * 3
        if self.edges:
            kinds += ["unlink"]
        if self.mark_chance and r.random() < self.mark_chance:
            self.marks += 1
            return {"op": "mark", "name": f"point-{self.marks}"}
        k = r.choice(kinds)
        if k == "create":
            self.n += 1
            mid = f"m{self.n}"
            self.mems.append(mid)
            op: dict[str, Any] = {"op": "create_memory", "id": mid, "content": self._text()}
            if r.random() < 0.5:
                op["strength"] = round(r.random(), 6)
            if r.random() < 0.4:
                op["metadata"] = {"n": self.n, "tags": r.sample(WORDS, 2), "ok": r.random() < 0.5}
            return op
        if k == "update":
            op = {"op": "update_memory", "id": r.choice(self.mems)}
            if r.random() < 0.7:
                op["content"] = self._text()
            if r.random() < 0.5:
                op["strength"] = round(r.random(), 6)
            if r.random() < 0.3:
                op["metadata"] = {"v": r.randint(0, 1000)}
            return op
        if k == "activate":
            op = {"op": "activate", "id": r.choice(self.mems)}
            if r.random() < 0.5:
                op["boost"] = round(r.random() * 0.3, 6)
            return op
        if k == "delete":
            mid = r.choice(self.mems)
            self.mems.remove(mid)
            self.edges = {e for e in self.edges if mid not in (e[0], e[1])}
            return {"op": "delete_memory", "id": mid}
        if k == "link":
            src, dst, kind = r.choice(self.mems), r.choice(self.mems), r.choice(KINDS)
            self.edges.add((src, dst, kind))
            op = {"op": "create_edge", "src": src, "dst": dst, "kind": kind}
            if r.random() < 0.8:
                op["weight"] = round(r.uniform(-1, 2), 6)
            return op
        src, dst, kind = r.choice(sorted(self.edges))
        self.edges.discard((src, dst, kind))
        return {"op": "delete_edge", "src": src, "dst": dst, "kind": kind}

    def batch(self, sizes: tuple[int, ...] = (1, 1, 1, 2, 3, 5)) -> list[dict[str, Any]]:
        return [self.op() for _ in range(self.rng.choice(sizes))]
