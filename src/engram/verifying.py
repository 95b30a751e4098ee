"""A restore's digest check that finishes after the data dir is ready (docs/DESIGN.md O7,
docs/FORMAT.md "Pending verification").

A restore of a backup that passed validation (level 3 or more: a restore test, verify
--check-all and the digest recomputed from every row, on the very bytes now restored) checks
every byte's hash and lands on the snapshot LSN with the manifest's digest, then leaves two
checks for later: the digest recomputed from the rows and FTS5's check of the full-text index
against them. It records them durably in the data dir (``verify-pending.json``, the marker)
before the data dir is placed.

Whoever opens the data dir next as a server runs them (``at_open`` with ``run=True``) in a
helper process (``python -m engram.verifying WARM_DB``), so that the row scan, Python holding a
GIL for seconds to minutes, holds the helper's GIL and not the server's. Before the engine is
handed to anyone, so before its first write, the helper opens the warm tier read-only and begins
a read transaction; in SQLite's WAL mode it sees exactly the committed rows of that moment
however long the check takes, while the server serves. The helper reports "pinned" (the LSN and
the digest stored there) on its stdout, and only then does ``start`` return; it then lowers
itself to idle CPU priority (``procs.lower_priority``: it uses spare CPU only) and checks: the
rows' digest must equal the digest stored with them, and (when the pinned LSN is the marker's)
the manifest's; the index must match the rows. A thread of the server waits on the helper's
pipe, holding no GIL meanwhile. Passed: the marker is removed. Failed — a mismatch, or a helper
that could not start or ended without a result (the check did not run; the data is not known
good): the engine refuses writes (``VerificationFailed``, 503 ``verification_failed``), the log
says so at ERROR, status and ``/health/ready`` report it, and the marker stays for the next
start. Refusing writes is the safe side of a check that could not run: a write taken then would
land on rows nobody checked, and the next start's check could no longer compare them with the
backup's digest. A one-shot command (``run=False``) only says that the check is pending and how
to finish it; ``engram verify --check-all`` passing on the stopped data dir finishes it too
(``complete_by_verify``).

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
import selectors
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from engram import digest as dg
from engram.errors import CorruptData, EngramError
from engram.fsutil import atomic_write, fsync_dir
from engram.procs import lower_priority, module_argv, module_env
from engram.tiers.warm import WarmTier, index_problem

log = logging.getLogger("engram")

MARKER = "verify-pending.json"
FORMAT_VERSION = 1
# States of a data dir's pending check: not running (a one-shot command), running, failed.
# Passed is not a state: the marker is gone and the engine holds no Verification.
PENDING, VERIFYING, FAILED = "pending", "verifying", "failed"


HELPER = "engram.verifying"  # the check's helper process (``helper_main``, the end of this file)
# How long ``start`` waits for the helper to pin its snapshot: a new interpreter importing
# engram and opening the database, at normal priority. Past it the helper is taken as hung.
PIN_TIMEOUT = 120.0


class CheckNotStarted(EngramError):
    """The digest check of a restored data dir could not start."""

    def __init__(self, why: str) -> None:
        super().__init__(
            f"the digest check of the restored data dir could not start ({why}); restart "
            "engram to check again"
        )
        self.why = why


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
        self.pid: int | None = None  # the helper's, while it runs
        self._proc: subprocess.Popen[bytes] | None = None
        self._errors: IO[bytes] | None = None  # the helper's stderr
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._mu = threading.Lock()
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

    def start(self, warm_db: Path, command: Sequence[str] | None = None) -> None:
        """Start the helper on ``warm_db`` and return once it has pinned the committed state
        (the caller guarantees no write commits before this returns); a thread then waits for
        its result. CheckNotStarted when the helper cannot start or ends before pinning.
        ``command``: the helper's command line (default ``python -m engram.verifying
        WARM_DB``); whatever runs must speak ``helper_main``'s protocol."""
        argv = list(command) if command is not None else module_argv(HELPER, str(warm_db))
        self._errors = tempfile.TemporaryFile()  # a file, not a pipe: it never fills and blocks
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,  # its end closing tells the helper to exit
                stdout=subprocess.PIPE,
                stderr=self._errors,
                env=module_env(),
            )
        except OSError as e:
            self._release()
            raise CheckNotStarted(
                f"its helper process could not start: {e.strerror or e}"
            ) from None
        self.pid = self._proc.pid
        msg = self._read(PIN_TIMEOUT)
        if msg is None or not isinstance(msg.get("pinned"), int):
            why = (msg or {}).get("error") or self._ended()
            self._kill()
            raise CheckNotStarted(f"its helper process did not pin the data to check: {why}")
        lsn, stored = msg["pinned"], str(msg.get("digest"))
        self.lsn, self.state = lsn, VERIFYING
        m = self.marker
        if m is not None and lsn == m.lsn and stored != m.digest:
            self._kill()
            self._finish(
                f"the data dir's digest at LSN {lsn} is {stored[:16]}…, its backup "
                f"{m.backup} says {m.digest[:16]}…"
            )
            return
        self._thread = threading.Thread(target=self._wait, name="engram-verify", daemon=True)
        self._thread.start()

    def _read(self, timeout: float | None) -> dict[str, Any] | None:
        """The helper's next message (one JSON object a line), None at its end, after
        ``timeout`` seconds without one, or when the line is not a message."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        if timeout is not None:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                if not sel.select(timeout):
                    return None
        line = proc.stdout.readline()  # blocks in the kernel, holding no GIL
        try:
            msg = json.loads(line)
        except ValueError:
            return None
        return msg if isinstance(msg, dict) else None

    def _ended(self) -> str:
        """How the helper ended (or that it is still running, hung): its exit status and the
        last line it wrote to stderr."""
        proc, errors = self._proc, self._errors
        if proc is None:
            return "stopped"
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return f"no answer from pid {proc.pid}"
        said = ""
        try:
            if errors is not None:
                errors.seek(0)
                lines = errors.read().decode(errors="replace").strip().splitlines()
                said = f": {lines[-1]}" if lines else ""
        except (OSError, ValueError):  # closed by a stop meanwhile
            pass
        how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        return f"pid {proc.pid} ended, {how}{said}"

    def _wait(self) -> None:
        msg = self._read(None)
        if self._stop.is_set():
            return
        if msg is not None and "problem" in msg:
            self._finish(msg["problem"])
        else:
            self._finish(f"its helper process ended without a result ({self._ended()})", ran=False)

    def _finish(self, problem: str | None, ran: bool = True) -> None:
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
            if ran:
                backup = self.marker.backup if self.marker else "its backup"
                self.reason = (
                    f"the restored data dir does not match {backup} ({problem}); writes are "
                    "refused — stop engram and restore another backup (docs/RUNBOOK.md)"
                )
            else:
                self.reason = (
                    f"the digest check of the restored data dir did not run ({problem}); "
                    f"writes are refused until it passes — restart engram to check again "
                    f"({MARKER} is kept)"
                )
            self.state = FAILED
            log.error("VERIFICATION FAILED: %s", self.reason)
        self.done.set()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._release()

    def _release(self) -> None:
        with self._mu:  # the waiting thread's finish and the engine's stop may meet here
            proc, self._proc = self._proc, None
            errors, self._errors = self._errors, None
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()
            proc.wait()  # it has answered or been killed: it is ending
        if errors is not None:
            errors.close()
        self.pid = None

    def fail_to_start(self, e: CheckNotStarted) -> None:
        """The check could not start: a failed check that says so (``_finish``)."""
        self._finish(e.why, ran=False)

    def stop(self) -> None:
        """End a check still running (the engine closes); the marker stays for next time."""
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # its pipe then ends, and the waiting thread with it
        t = self._thread
        if t is not None and t.is_alive():
            t.join()
        self._release()


def at_open(
    root: Path, warm_db: Path, run: bool, command: Sequence[str] | None = None
) -> Verification | None:
    """The pending check of the data dir ``root`` being opened, if its restore left one:
    started (``run``: a server, before its first write; ``command`` as for ``start``) or only
    reported (a one-shot command, which logs ``pending_note``). None when nothing is pending.
    A check that cannot start is a failed one: writes are refused, the marker stays."""
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
        try:
            v.start(warm_db, command)
        except CheckNotStarted as e:
            v.fail_to_start(e)
        else:
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


# -- the helper process ------------------------------------------------------------------


def check_rows(reader: WarmTier, lsn: int, stored: str) -> str | None:
    """What is wrong with the state pinned by ``reader`` (at ``lsn``, whose stored digest is
    ``stored``): the rows' digest or the full-text index; None when both match."""
    try:
        got = rows_digest(reader)
        if got.hex != stored:
            return (
                f"the digest recomputed from the rows at LSN {lsn} is {got.hex[:16]}…, "
                f"the data dir says {stored[:16]}…"
            )
        index = index_problem(reader.conn, reader.path, readonly=True)
        return None if index is None else f"the full-text index: {index}"
    except EngramError as e:
        return e.message
    except sqlite3.Error as e:  # a damaged page: the data is not as restored
        return f"reading the rows failed ({e})"


def _exit_when_told() -> None:
    """End this process when its stdin ends: the server closed it, or died."""
    sys.stdin.buffer.read()
    os._exit(0)


def helper_main(argv: list[str], after_pin: Callable[[], None] | None = None) -> int:
    """The helper side of ``Verification.start``: ``WARM_DB`` in; on stdout one JSON object a
    line: ``{"pinned": LSN, "digest": HEX}`` (or ``{"error": WHY}``) once the read snapshot is
    pinned, then ``{"problem": WHY or null}`` when checked. ``after_pin`` runs between the
    two (a test's fault)."""
    out = sys.stdout

    def say(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        reader = WarmTier(Path(argv[0]), readonly=True, cache_mib=16)
    except EngramError as e:
        say({"error": e.message})
        return 1
    try:
        try:
            lsn, stored = reader.pin_snapshot()
        except sqlite3.Error as e:
            say({"error": f"reading {argv[0]} failed ({e})"})
            return 1
        say({"pinned": lsn, "digest": stored})
        lower_priority()  # pinned at normal priority, so the server's start never waits on it
        threading.Thread(target=_exit_when_told, daemon=True).start()
        if after_pin is not None:
            after_pin()
        say({"problem": check_rows(reader, lsn, stored)})
    finally:
        reader.close()
    return 0


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:]))
