"""One way in for the CLI: the data dir itself, or the server that owns it.

``open_backend(data_dir)`` looks at ``engram.lock``: a live server named there is used over HTTP
(``RemoteBackend``); a free directory is opened in-process (``LocalBackend``) and closed, with a
checkpoint, at the end. Both expose the same methods with the same results and errors, so a
command never knows which one it talks to.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engram import query as queries  # a Backend method takes a `query` argument
from engram.backup.request import BackupRequest
from engram.datadir import LOCK, read_owner
from engram.errors import BackupError, DataDirError, DataDirLocked, Refused
from engram.graph import Engine, EngineConfig
from engram.model import ExportStream
from engram.storage import Ref, as_ref

if TYPE_CHECKING:  # the HTTP client loads only when a server owns the data dir
    from engram.client import EngramClient

Progress = Callable[[int, int], None]


class Backend(Protocol):
    """What a command can ask of a database, wherever it lives."""

    where: str
    remote: bool  # True: a running server holds the data dir (and shares this machine)

    def apply(self, ops: list[dict[str, Any]]) -> dict[str, Any]: ...

    def memory(self, mid: str) -> dict[str, Any]: ...

    def neighbors(self, mid: str, direction: str, depth: int) -> list[dict[str, Any]]: ...

    def recall(self, query: str, limit: int) -> list[dict[str, Any]]: ...

    def stats(self) -> dict[str, Any]: ...

    def export(self) -> ExportStream: ...

    def mark(self, name: str) -> dict[str, Any]: ...

    def backup(
        self, req: BackupRequest, progress: Progress | None = None, output: Ref | None = None
    ) -> dict[str, Any]:
        """Take ``req`` into the new file ``req.output`` — or into ``output``, the object of a
        store that ``req.output`` names (an ``s3://`` URL, opened by the caller) — written by
        this process's user."""
        ...

    def quiesce(self, timeout_s: float) -> dict[str, Any]: ...

    def resume(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...


def _no_server(root: Path, what: str) -> Refused:
    return Refused(f"no engram server is running on {root}; {what} acts on a running server")


class LocalBackend:
    """The data dir opened in this process (it holds the lock until closed)."""

    remote = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.where = str(engine.root)

    def backup(
        self, req: BackupRequest, progress: Progress | None = None, output: Ref | None = None
    ) -> dict[str, Any]:
        # Imported here: only backup commands pay for the backup modules. Nobody else writes
        # to a data dir this process holds: a full backup uses every core unless asked.
        from engram.backup.run import run_backup

        return run_backup(self.engine, req, progress, default_priority="normal", output=output)

    def quiesce(self, timeout_s: float) -> dict[str, Any]:
        raise _no_server(self.engine.root, "quiesce")

    def resume(self) -> dict[str, Any]:
        raise _no_server(self.engine.root, "resume")

    def status(self) -> dict[str, Any]:
        return self.engine.status() | {"server": None}

    def apply(self, ops: list[dict[str, Any]]) -> dict[str, Any]:
        res = self.engine.apply(ops)
        return {"lsn": res.lsn, "results": res.results}

    def memory(self, mid: str) -> dict[str, Any]:
        return queries.memory(self.engine, mid)

    def neighbors(self, mid: str, direction: str, depth: int) -> list[dict[str, Any]]:
        return queries.neighbors(self.engine, mid, direction, depth)

    def recall(self, query: str, limit: int) -> list[dict[str, Any]]:
        return queries.recall(self.engine, query, limit)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def export(self) -> ExportStream:
        return queries.export(self.engine)

    def mark(self, name: str) -> dict[str, Any]:
        res = self.engine.apply([{"op": "mark", "name": name}])
        return {"name": res.results[0]["name"], "lsn": res.lsn}


class RemoteBackend:
    """The server that owns the data dir, over HTTP."""

    def __init__(self, client: EngramClient) -> None:
        self.client = client
        self.where = client.url

    def apply(self, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return self.client.batch(ops)

    def memory(self, mid: str) -> dict[str, Any]:
        return self.client.get_memory(mid)

    def neighbors(self, mid: str, direction: str, depth: int) -> list[dict[str, Any]]:
        return list(self.client.neighbors(mid, direction, depth)["neighbors"])

    def recall(self, query: str, limit: int) -> list[dict[str, Any]]:
        return list(self.client.recall(query, limit)["results"])

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    def export(self) -> ExportStream:
        return self.client.export()

    def mark(self, name: str) -> dict[str, Any]:
        return self.client.mark(name)

    remote = True

    def backup(
        self, req: BackupRequest, progress: Progress | None = None, output: Ref | None = None
    ) -> dict[str, Any]:
        # The server makes the cut and streams the backup; this process writes the file (or
        # the object of ``output``'s store), with the rights of whoever runs the command (the
        # server never writes where a client says).
        from engram.backup.incremental import chain_for, nothing_to_continue
        from engram.backup.output import BackupOutput

        req = req.validate()
        if req.output is None:
            raise ValueError("a backup through a server is written here: it needs an output")
        ref = output if output is not None else as_ref(Path(req.output).absolute())
        stream = req.streamed()  # priority None: the server's default (low)
        with BackupOutput(ref) as out:
            if req.kind == "incremental":
                # "Never a gap" is about this directory (store), which only this side can
                # see: the server is told where the range must start at the latest.
                after = chain_for(ref.store, self.client.status())
                if after is not None:
                    stream = replace(stream, start_by_lsn=after.to_lsn + 1, parent=after.name)
                elif req.since_s is None and req.since_lsn is None:
                    raise nothing_to_continue(ref.store.describe())
            sink = out.open()
            res = self.client.backup(**stream.to_mapping(), sink=sink, progress=progress)
            sink.sync_close()
            got = (sink.size, sink.sha.hexdigest())
            if (res.get("size"), res.get("sha256")) != got:
                raise BackupError(
                    f"the backup received from {self.client.url} ({got[0]} bytes, sha256 "
                    f"{got[1][:12]}…) is not what the server sent ({res.get('size')} bytes, "
                    f"sha256 {str(res.get('sha256'))[:12]}…); nothing was written at {out.path}"
                )
            catalog = res.pop("catalog", None) or {}
            res |= {"path": out.path, "sidecar": str(out.sidecar)}
            out.publish(got[1], res | catalog)
        return res

    def quiesce(self, timeout_s: float) -> dict[str, Any]:
        return self.client.quiesce(timeout_s)

    def resume(self) -> dict[str, Any]:
        return self.client.resume()

    def status(self) -> dict[str, Any]:
        return self.client.status()


def _owner(root: Path) -> dict[str, Any] | None:
    if root.exists() and not root.is_dir():
        raise DataDirError(f"{root} exists and is not a directory; choose another --data-dir")
    owner: dict[str, Any] | None = None
    for _ in range(50):
        try:
            owner = read_owner(root)
        except OSError as e:
            raise DataDirError(
                f"cannot read {root / LOCK} ({e.strerror}); check permissions"
            ) from None
        # An owner with no pid yet is between taking the lock and writing its name: it passes.
        if owner is None or owner.get("pid"):
            return owner
        time.sleep(0.01)
    return owner


def _busy(root: Path, pid: Any) -> DataDirLocked:
    who = f"another engram process (pid {pid})" if pid else "another engram process"
    return DataDirLocked(
        f"{root} is in use by {who} that is not serving; wait for it to finish and retry",
        pid=pid if isinstance(pid, int) else None,
    )


@contextmanager
def open_backend(
    data_dir: str | Path,
    token: str | None = None,
    *,
    create: bool = False,
    config: EngineConfig | None = None,
    admin_token: str | None = None,
    cacert: str | Path | None = None,
) -> Iterator[Backend]:
    """The backend for ``data_dir``: its server if one owns it, else the directory itself.

    ``create`` (``engram init``, ``engram serve``) lays out a missing or empty directory;
    without it, a directory that is not an engram data dir is refused ("not an engram data
    dir; run `engram init`") and nothing is created, so a write to a mistyped --data-dir never
    starts a second, empty database. Through a server, ``token`` goes with every request and
    ``admin_token`` (when given) instead of it with admin ones; an https server's certificate
    is verified against ``cacert`` or, without it, the system's trusted CAs.
    """
    root = Path(data_dir)
    owner = _owner(root)
    engine: Engine | None = None
    url: str | None = None
    if owner is not None:
        url = owner.get("url")
        if not url:
            raise _busy(root, owner.get("pid"))
    else:
        try:
            engine = Engine.open(root, config, create=create)
        except DataDirLocked as e:
            # A server took the directory between our look at the lock and our open.
            if not e.url:
                raise _busy(root, e.pid) from None
            url = e.url
    if engine is not None:
        try:
            yield LocalBackend(engine)
        finally:
            engine.close()
        return
    assert url is not None
    from engram.client import EngramClient

    with EngramClient(url, token, admin_token=admin_token, cacert=cacert) as client:
        yield RemoteBackend(client)
