"""The data directory: layout, identity and ownership (docs/DESIGN.md "Storage").

``engram.lock`` is held with ``flock`` for as long as a process owns the directory; its content
names the owner (pid, URL when serving) so that the CLI can find a running server. A lock file
left by a dead process is not held, and is simply taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.errors import DataDirError, DataDirLocked, NotInitialized
from engram.format import history as hist
from engram.format.record import FORMAT_VERSION
from engram.fsutil import atomic_write, ensure_private_dir

LOCK = "engram.lock"
IDENTITY = "identity.json"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def identity(self) -> Path:
        return self.root / IDENTITY

    @property
    def oplog(self) -> Path:
        return self.root / "oplog"

    @property
    def warm_dir(self) -> Path:
        return self.root / "warm"

    @property
    def warm_db(self) -> Path:
        return self.root / "warm" / "engram.db"

    @property
    def cold(self) -> Path:
        return self.root / "cold"


@dataclass(frozen=True)
class Identity:
    """``identity.json``. ``lineage``: the data dir's history and its ancestors (the original
    history alone for a data dir that never branched, and for one written before histories).
    ``recovered``: set by restore, restore-pitr and apply-log (``{command, target}``): the data
    dir holds records replayed from elsewhere, whose history may have gone on there, so its
    first write of its own starts a new history (``Engine``)."""

    database_id: str
    created_at: str
    format_version: int
    lineage: hist.Lineage = ()
    recovered: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.lineage:
            object.__setattr__(self, "lineage", (hist.original(self.database_id),))

    @property
    def history(self) -> str:
        return self.lineage[-1].id

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "database_id": self.database_id,
            "created_at": self.created_at,
            "format_version": self.format_version,
            "history": self.history,
            "lineage": hist.lineage_to_json(self.lineage),
        }
        if self.recovered is not None:
            out["recovered"] = self.recovered
        return out


def is_initialized(root: Path) -> bool:
    return (root / IDENTITY).is_file()


def init_data_dir(root: Path, database_id: str | None = None) -> Identity:
    """Create the layout and identity; refuses a non-empty directory that is not engram's."""
    root = Path(root)
    if is_initialized(root):
        return read_identity(root)
    if root.exists() and not root.is_dir():
        raise DataDirError(f"{root} exists and is not a directory; choose another --data-dir")
    if root.is_dir() and not all(_init_leftover(p) for p in root.iterdir()):
        raise DataDirError(
            f"{root} is not empty and holds no engram database; choose an empty or new --data-dir"
        )
    lay = Layout(root)
    for d in (root, lay.oplog, lay.warm_dir, lay.cold):
        ensure_private_dir(d)
    ident = Identity(
        database_id=database_id or str(uuid.uuid4()),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        format_version=FORMAT_VERSION,
    )
    write_identity(root, ident)
    return ident


def write_identity(root: Path, ident: Identity) -> None:
    """Replace ``identity.json`` durably (temp, fsync, rename, fsync of the directory)."""
    atomic_write(
        Layout(Path(root)).identity, (json.dumps(ident.to_json(), indent=2) + "\n").encode()
    )


def _init_leftover(p: Path) -> bool:
    """What an interrupted init_data_dir leaves behind (identity.json is written last)."""
    if p.name == LOCK or p.name.startswith(f".{IDENTITY}.tmp-"):
        return True
    return p.name in ("oplog", "warm", "cold") and p.is_dir() and not any(p.iterdir())


def read_identity(root: Path) -> Identity:
    p = Path(root) / IDENTITY
    try:
        d = json.loads(p.read_text())
        db = str(d["database_id"])
        lineage = hist.lineage_from_json(d.get("lineage"), db)
        recovered = d.get("recovered")
        return Identity(
            db,
            str(d["created_at"]),
            int(d["format_version"]),
            lineage,
            dict(recovered) if isinstance(recovered, dict) else None,
        )
    except FileNotFoundError:
        raise NotInitialized(
            f"{root} is not an engram data dir (no {IDENTITY}); run `engram init --data-dir {root}`"
        ) from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise DataDirError(f"{p} is unreadable ({e}); restore it from a backup") from None


class DirLock:
    """Exclusive ownership of a data dir for the life of this object."""

    def __init__(self, root: Path) -> None:
        self.path = Layout(Path(root)).lock
        self.fd = -1

    def acquire(self, url: str | None = None) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        owner: dict[str, Any] = {}
        locked = False
        for _ in range(50):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                owner = read_owner(self.path.parent) or {}
                if owner.get("pid"):
                    break
                # No owner named: a read_owner() probe holds a shared lock for a moment, or an
                # owner is between flock and writing its pid. Either passes quickly.
                time.sleep(0.01)
        if not locked:
            os.close(fd)
            pid, where = owner.get("pid"), owner.get("url")
            desc = f"pid {pid}" + (f" serving {where}" if where else "")
            raise DataDirLocked(
                f"{self.path.parent} is in use by {desc}; stop it first or work through it",
                pid=pid,
                url=where,
            ) from None
        self.fd = fd
        self.update(url)

    def update(self, url: str | None) -> None:
        info = {"pid": os.getpid(), "url": url, "started_at": time.time()}
        data = json.dumps(info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def read_owner(root: Path) -> dict[str, Any] | None:
    """The owner of ``root`` if a live process holds its lock, else None."""
    path = Layout(Path(root)).lock
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return dict(json.loads(os.pread(fd, 65536, 0) or b"{}"))
            except ValueError:
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
