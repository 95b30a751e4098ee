"""A restore's digest check that finishes after the data dir is ready (docs/DESIGN.md O7,
docs/FORMAT.md "Pending verification").

A restore of a backup that passed validation (level 3 or more: a restore test, verify
--check-all and the digest recomputed from every row, on the very bytes now restored) checks
every byte's hash and lands on the snapshot LSN with the manifest's digest, then leaves two
checks for later: the digest recomputed from the rows and FTS5's check of the full-text index
against them. It records them durably in the data dir (``verify-pending.json``, the marker)
before the data dir is placed.

Whoever opens the data dir next as a server runs them (``at_open`` with ``run=True``): before
the engine is handed to anyone, so before its first write, a read transaction is begun on a
connection of its own; in SQLite's WAL mode it sees exactly the committed rows of that moment
however long the check takes, while the server serves. The check then runs in a thread: the
rows' digest must equal the digest stored with them, and (when the pinned LSN is the marker's)
the manifest's; the index must match the rows. Passed: the marker is removed. Failed: the
engine refuses writes (``VerificationFailed``, 503 ``verification_failed``), the log says so at
ERROR, and status and ``/health/ready`` report it. A one-shot command (``run=False``) only says
that the check is pending and how to finish it; ``engram verify --check-all`` passing on the
stopped data dir finishes it too (``complete_by_verify``).

A data dir written to before the check ran (a one-shot command's write, ``apply-log``) is
checked at the LSN it is opened at, against the digest stored with that state: what the check
proves is that the rows served hash to the digest the log's chain leads to, at the LSN they are
served from. A row damaged at the marker's LSN and not rewritten since still fails it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engram import digest as dg
from engram.errors import CorruptData, EngramError
from engram.fsutil import atomic_write, fsync_dir
from engram.tiers.warm import WarmTier, index_problem

log = logging.getLogger("engram")

MARKER = "verify-pending.json"
FORMAT_VERSION = 1
# States of a data dir's pending check: not running (a one-shot command), running, failed.
# Passed is not a state: the marker is gone and the engine holds no Verification.
PENDING, VERIFYING, FAILED = "pending", "verifying", "failed"


class VerificationFailed(CorruptData):
    """The restored data does not match its backup's digest; writes are refused."""

    # The data cannot be trusted as restored: 503, never a client error; retrying will not help.
    code = "verification_failed"


@dataclass(frozen=True)
class Marker:
    """What a restore left to check: the data dir at ``lsn`` must hash to ``digest`` (the
    backup's manifest), restored from ``backup`` (its name, and the sha256 of its bytes)
    whose validation passed at ``validation_level`` (``validated_at``, UTC)."""

    lsn: int
    digest: str
    backup: str
    backup_sha256: str
    validation_level: int
    validated_at: str
    restored_at: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def marker_path(root: Path) -> Path:
    return Path(root) / MARKER


def _checksum(fields: dict[str, Any]) -> str:
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canon).hexdigest()


def write_marker(root: Path, m: Marker) -> None:
    """Create the marker in ``root`` durably (temp, fsync, rename, directory fsync)."""
    fields = {"format_version": FORMAT_VERSION, **m.to_json()}
    body = fields | {"checksum": _checksum(fields)}
    atomic_write(marker_path(root), json.dumps(body, indent=1, sort_keys=True).encode() + b"\n")


class DamagedMarker(CorruptData):
    """The pending-verification marker cannot be read."""


def read_marker(root: Path) -> Marker | None:
    """The marker of ``root``, None when there is none; DamagedMarker when it is there but
    unreadable, not a marker, of another version or fails its checksum."""
    p = marker_path(root)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DamagedMarker(f"{p} cannot be read ({e.strerror})") from None
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            raise ValueError("not a version 1 marker")
        stored = d.pop("checksum", None)
        if stored != _checksum(d):
            raise ValueError("its checksum does not match its content")
        d.pop("format_version")
        m = Marker(**d)
        if not isinstance(m.lsn, int) or not isinstance(m.digest, str) or len(m.digest) != 64:
            raise ValueError("bad lsn or digest")
        int(m.digest, 16)
    except (ValueError, TypeError) as e:
        raise DamagedMarker(f"{p} is damaged ({e})") from None
    return m


def clear_marker(root: Path) -> None:
    """Remove the marker durably (the check passed)."""
    p = marker_path(root)
    try:
        os.unlink(p)
    except FileNotFoundError:
        return
    fsync_dir(p.parent)


def pending_note(root: Path) -> str:
    """The one line a one-shot command prints on a data dir whose check is pending."""
    return (
        f"the digest check of restored data dir {root} is pending (its restore left it for "
        f"later: {MARKER}); start `engram serve` on it, which checks while it serves, or run "
        f"`engram verify --check-all --data-dir {root}` on it stopped"
    )


def rows_digest(warm: WarmTier) -> dg.Digest:
    """The digest recomputed from every memory and edge row read through ``warm``."""
    total = warm.digest_sum({})
    for e in warm.iter_edges():
        total += dg.edge_hash(e)
    return dg.Digest(total)


class Verification:
    """The pending check of an open data dir (``at_open``), and what it found."""

    def __init__(self, root: Path, marker: Marker | None, why_unknown: str | None) -> None:
        self.root = root
        self.marker = marker
        self.why_unknown = why_unknown  # the marker was damaged: checked against stored digest
        self.state = PENDING
        self.reason: str | None = None
        self.lsn: int | None = None
        self.started = time.time()
        self.seconds: float | None = None
        self._thread: threading.Thread | None = None
        self._reader: WarmTier | None = None
        self._stop = threading.Event()
        self.done = threading.Event()

    # -- what the engine asks ----------------------------------------------------------

    def check_writable(self) -> None:
        if self.state == FAILED:
            raise VerificationFailed(self.reason)

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "lsn": self.lsn if self.lsn is not None else (self.marker and self.marker.lsn),
            "backup": self.marker.backup if self.marker else None,
            "reason": self.reason,
            "seconds": self.seconds,
        }

    # -- the check ---------------------------------------------------------------------

    def start(self, warm_db: Path) -> None:
        """Pin the committed state now (the caller guarantees no write has committed since
        the data dir was opened), then check it in a thread."""
        reader = WarmTier(warm_db, readonly=True, cache_mib=16)
        try:
            lsn, stored = reader.pin_snapshot()
        except BaseException:
            reader.close()
            raise
        self._reader, self.lsn, self.state = reader, lsn, VERIFYING
        m = self.marker
        if m is not None and lsn == m.lsn and stored != m.digest:
            self._finish(
                f"the data dir's digest at LSN {lsn} is {stored[:16]}…, its backup "
                f"{m.backup} says {m.digest[:16]}…"
            )
            return
        self._thread = threading.Thread(
            target=self._run, args=(stored,), name="engram-verify", daemon=True
        )
        self._thread.start()

    def _run(self, stored: str) -> None:
        assert self._reader is not None
        problem: str | None
        try:
            got = rows_digest(self._reader)
            if self._stop.is_set():
                return
            if got.hex != stored:
                problem = (
                    f"the digest recomputed from the rows at LSN {self.lsn} is {got.hex[:16]}…, "
                    f"the data dir says {stored[:16]}…"
                )
            else:
                index = index_problem(self._reader.conn, self._reader.path, readonly=True)
                problem = None if index is None else f"the full-text index: {index}"
        except EngramError as e:
            problem = e.message
        except Exception as e:  # a sqlite3 error on a damaged page: the data is not as restored
            problem = f"reading the rows failed ({e})"
        if not self._stop.is_set():
            self._finish(problem)

    def _finish(self, problem: str | None) -> None:
        self.seconds = round(time.time() - self.started, 3)
        self._release()
        if problem is None:
            try:
                clear_marker(self.root)
            except OSError as e:  # the next start checks again; nothing is wrong with the data
                log.warning("the check passed but %s could not be removed (%s)", MARKER, e)
            log.info(
                "restored data verified at LSN %s in %.1f s: the digest recomputed from every "
                "row and the full-text index match",
                self.lsn,
                self.seconds,
            )
            self.state, self.reason = "verified", None
        else:
            backup = self.marker.backup if self.marker else "its backup"
            self.reason = (
                f"the restored data dir does not match {backup} ({problem}); writes are "
                "refused — stop engram and restore another backup (docs/RUNBOOK.md)"
            )
            self.state = FAILED
            log.error("VERIFICATION FAILED: %s", self.reason)
        self.done.set()

    def _release(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def stop(self) -> None:
        """Stop a check still running (the engine closes); the marker stays for next time."""
        self._stop.set()
        t = self._thread
        if t is not None and t.is_alive():
            # SQLite's interrupt ends the scan's current statement at once.
            reader = self._reader
            if reader is not None:
                reader.conn.interrupt()
            t.join()
        self._release()


def at_open(root: Path, warm_db: Path, run: bool) -> Verification | None:
    """The pending check of the data dir ``root`` being opened, if its restore left one:
    started (``run``: a server, before its first write) or only reported (a one-shot
    command, which logs ``pending_note``). None when nothing is pending."""
    try:
        marker, why = read_marker(root), None
    except DamagedMarker as e:
        if not marker_path(root).exists():
            return None
        marker, why = None, e.message
        log.warning("%s; the check runs against the digest the data dir stores", why)
    if marker is None and why is None:
        return None
    v = Verification(root, marker, why)
    if run:
        v.start(warm_db)
        log.info("verifying the restored data at LSN %s while serving", v.lsn)
    else:
        log.warning("%s", pending_note(root))
    return v


def complete_by_verify(root: Path, lsn: int | None, digest: str | None) -> str | None:
    """After ``engram verify --check-all`` passed on the stopped data dir ``root`` (at ``lsn``,
    whose rows hash to ``digest``): remove the marker, and say so; None when there was none.
    At the marker's own LSN the digest must also be the backup's."""
    try:
        m = read_marker(root)
    except DamagedMarker:
        m = None
    if m is None and not marker_path(root).exists():
        return None
    if m is not None and lsn == m.lsn and digest != m.digest:
        return None
    clear_marker(root)
    return f"the pending digest check of this restored data dir is done ({MARKER} removed)"
