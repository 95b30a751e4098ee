"""Replaying records of a log in batches: the pure half (decode, hash) and its result.

``prepare_replay`` needs no lock and no database, so a reader thread can run it while the
applying thread waits on SQLite (which releases the GIL): recovery, apply-log and PITR overlap
the two halves on two cores.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from engram import digest as dg
from engram.errors import CorruptLog
from engram.format.record import Record
from engram.model import MEMORY_OPS, OpType
from engram.tiers.warm import UPSERTS, memory_row

BATCH = 4096
_DONE = object()


@dataclass
class ReplayBatch:
    """Whole transactions of a log, decoded and hashed, ready for ``Engine.append_prepared``."""

    records: list[Record]
    afters: list[Any]
    digest_delta: int
    memories_delta: int
    edges_delta: int


def prepare_replay(records: list[Record]) -> ReplayBatch:
    """Decode the images and sum their digest and count changes. Pure: safe in any thread."""
    afters: list[Any] = []
    delta = mems = edges = 0
    for r in records:
        try:
            after = r.decode_after()
            before = None if r.op == OpType.MARKER else r.decode_before()
        except (msgspec.MsgspecError, ValueError, TypeError) as e:
            # The checksum held, so the record was written this way (a crafted or foreign
            # file, or a bug): refuse it rather than half-apply it.
            raise CorruptLog(
                f"record LSN {r.lsn} ({r.op.name}) cannot be applied: {e}; restore from a "
                "backup (docs/RUNBOOK.md)"
            ) from None
        # A memory upsert goes in as its SQL row, built here rather than under the engine lock.
        afters.append(memory_row(after) if r.op in UPSERTS else after)
        if r.op == OpType.MARKER:
            continue
        delta += dg.item_hash(after) - dg.item_hash(before)
        change = (r.after is not None) - (r.before is not None)
        if r.op in MEMORY_OPS:
            mems += change
        elif r.op in (OpType.CREATE_EDGE, OpType.DELETE_EDGE):
            edges += change
    return ReplayBatch(records, afters, delta, mems, edges)


def put_until(q: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def batches(
    txns: Callable[[threading.Event], Iterable[list[Record]]],
    apply: Callable[[ReplayBatch], None],
    batch: int = BATCH,
) -> None:
    """Run ``txns(stop)`` (whole transactions) in a reader thread, grouped into prepared
    batches of about ``batch`` records, and ``apply`` each in this thread, in order. An error
    on either side stops both and is raised here."""
    q: queue.Queue[Any] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def produce() -> None:
        try:
            pending: list[Record] = []
            for txn in txns(stop):
                if stop.is_set():
                    return
                pending.extend(txn)
                if len(pending) >= batch:
                    put_until(q, prepare_replay(pending), stop)
                    pending = []
            if pending:
                put_until(q, prepare_replay(pending), stop)
            put_until(q, _DONE, stop)
        except BaseException as e:  # handed to the applying thread, which raises it
            put_until(q, e, stop)

    reader = threading.Thread(target=produce, name="engram-replay-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            apply(item)
    finally:
        stop.set()
        reader.join()
