"""``engram import`` and ``engram export``: the graph as JSON lines, one op per line.

The ops are exactly those of ``POST /v1/batch``; ``export`` writes every memory as a
``create_memory`` op and then every edge as ``create_edge``, with every field (times and
activation count included), so its output imports as is into the same graph: same logical
digest. An export is one state of the graph, the one after the LSN it reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, BinaryIO

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from engram.cli.common import DEFAULT_DATA_DIR as _DD
from engram.cli.common import (
    CaCert,
    DataDir,
    Json,
    TokenFile,
    backend,
    console,
    emit_json,
    err_console,
    plural,
)
from engram.errors import Conflict, EngramError, Refused, RemoteError, ValidationError
from engram.fsutil import fsync_dir, rename_noreplace
from engram.model import ExportStream

if TYPE_CHECKING:
    from engram.backend import Backend

# A batch is also capped in bytes so that it stays well under the server's body limit.
MAX_BATCH_BYTES = 4 << 20


# -- import ------------------------------------------------------------------------------


@contextmanager
def _progress(total: int | None, show: bool) -> Iterator[Callable[[int], None]]:
    if not show:
        yield lambda n: None
        return
    columns = (
        TextColumn("importing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console()) as bar:
        task = bar.add_task("import", total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def _input(path: Path) -> Iterator[tuple[BinaryIO, int | None]]:
    if str(path) == "-":
        yield sys.stdin.buffer, None
        return
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ValidationError(f"cannot read {path} ({e.strerror})", field="file") from None
    with fh:
        yield fh, os.fstat(fh.fileno()).st_size


class _Importer:
    """Sends ops in atomic batches: a batch is applied whole or not at all, so after a failure
    everything before the failed batch is applied and nothing from its first line on, and a
    fixed file resumes at that line (``--resume-from``).

    With ``skip_existing``, a ``create_memory`` or ``create_edge`` whose target already existed
    when the import started is skipped (and counted) if every field the line gives equals the
    stored one, and is an error naming the line if one differs: a re-run of the same file is a
    no-op for what it already created."""

    def __init__(self, b: Backend, batch_size: int, skip_existing: bool = False) -> None:
        self.b = b
        self.batch_size = batch_size
        self.ops: list[dict[str, Any]] = []
        self.lines: list[int] = []
        self.bytes = 0
        self.applied = 0
        self.batches = 0
        self.skipped = 0
        self.created: list[str] = []  # the first few ids of the memories this import created
        self.n_created = 0
        self.lsn: int | None = None
        self.memories: dict[str, dict[str, Any]] = {}
        self.edges: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.had_memories = b.stats().get("memories", 0) > 0
        if skip_existing and self.had_memories:
            self._load_existing()
        self.skip_existing = skip_existing

    def _load_existing(self) -> None:
        """What the graph holds now, as the ops that would recreate it (one export)."""
        stream = self.b.export()
        try:
            for op in stream:
                if op.get("op") == "create_memory":
                    self.memories[op["id"]] = op
                elif op.get("op") == "create_edge":
                    self.edges[(op["src"], op["dst"], op["kind"])] = op
        finally:
            stream.close()

    def _existing(self, op: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """(what, stored op) when ``op`` creates something that already exists."""
        kind = op.get("op")
        if kind == "create_memory" and isinstance(op.get("id"), str):
            old = self.memories.get(op["id"])
            return None if old is None else (f"memory {op['id']}", old)
        if kind == "create_edge":
            key = (op.get("src"), op.get("dst"), op.get("kind", "related"))
            old = self.edges.get(key)  # type: ignore[arg-type]
            return None if old is None else (f"edge {key[0]} -> {key[1]} ({key[2]})", old)
        return None

    def add(self, op: dict[str, Any], lineno: int, size: int) -> None:
        if self.skip_existing:
            found = self._existing(op)
            if found is not None:
                what, old = found
                differs = sorted(k for k in op if k != "op" and op[k] != old.get(k))
                if differs:
                    raise self.failed(
                        Conflict(
                            f"line {lineno}: {what} already exists with a different {differs[0]}",
                            field=differs[0],
                        ),
                        lineno,
                        "fix or remove that line, then import again",
                    )
                self.skipped += 1
                return
        self.ops.append(op)
        self.lines.append(lineno)
        self.bytes += size
        if len(self.ops) >= self.batch_size or self.bytes >= MAX_BATCH_BYTES:
            self.flush()

    def _send(self, ops: list[dict[str, Any]]) -> None:
        res = self.b.apply(ops)
        self.lsn = res["lsn"]
        self.applied += len(ops)
        self.batches += 1
        for op, r in zip(ops, res.get("results") or [], strict=False):
            if op.get("op") == "create_memory":
                self.n_created += 1
                if len(self.created) < 5 and isinstance(r, dict):
                    self.created.append(str(r.get("id")))

    def flush(self) -> None:
        if not self.ops:
            return
        ops, lines = self.ops, self.lines
        self.ops, self.lines, self.bytes = [], [], 0
        try:
            self._send(ops)
        except EngramError as e:
            first, last = lines[0], lines[-1]
            idx = e.details.get("index")
            if idx is None and len(ops) == 1:
                idx = 0
            if not isinstance(idx, int) or not 0 <= idx < len(ops):
                # Not one op's fault (server unavailable, connection lost, disk full, ...).
                if isinstance(e, RemoteError):
                    msg = f"{e.message}; the batch of {_lines(first, last)} may or may not "
                    msg += "have been applied"
                    todo = "import again with --skip-existing"
                else:
                    msg = f"{e.message}; the batch of {_lines(first, last)} was not applied"
                    todo = "import again"
                raise self.failed(e, first, todo, msg) from None
            msg = e.message.removeprefix(f"op {idx}: ")
            msg = f"line {lines[idx]}: {msg}; nothing of its batch ({_lines(first, last)}) "
            raise self.failed(e, first, "fix it and import again", msg + "was applied") from None

    def failed(
        self, e: EngramError, resume_line: int, todo: str, message: str | None = None
    ) -> EngramError:
        n = self.applied
        done = f"{plural(n, 'op')} before it {'was' if n == 1 else 'were'} applied"
        e.message = (
            f"{message or e.message}; {done} — {todo} from line {resume_line} "
            f"(--resume-from {resume_line})"
        )
        e.args = (e.message,)
        e.details["line"] = resume_line
        e.details["applied"] = self.applied
        return e

    def pending_first(self, lineno: int) -> int:
        """The line a re-run starts from when ``lineno`` is bad: its batch's first line."""
        return self.lines[0] if self.lines else lineno


def _lines(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _parse(raw: bytes, lineno: int) -> dict[str, Any] | None:
    if not raw.strip():
        return None
    try:
        op = json.loads(raw)
    except UnicodeDecodeError:
        raise ValidationError(f"line {lineno}: not UTF-8 text", field="file") from None
    except ValueError as e:
        msg = getattr(e, "msg", str(e))
        raise ValidationError(f"line {lineno}: not valid JSON ({msg})", field="file") from None
    if not isinstance(op, dict):
        raise ValidationError(f"line {lineno}: each line must be a JSON object", field="file")
    return op


def import_(
    file: Annotated[
        Path, typer.Option("--file", "-f", help="JSON-lines file of ops, or - for stdin.")
    ],
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=1,
            max=100_000,
            help="Ops per batch. A batch is applied whole or not at all.",
        ),
    ] = 1000,
    skip_existing: Annotated[
        bool,
        typer.Option(
            "--skip-existing",
            help="Skip a create_memory or create_edge line whose memory or edge already "
            "exists with the same fields (counted); one that exists with different fields is "
            "an error naming the line. Makes a re-run of the same file safe.",
        ),
    ] = False,
    resume_from: Annotated[
        int,
        typer.Option(
            "--resume-from",
            min=1,
            metavar="LINE",
            help="Skip the lines before LINE: the line a failed import said to resume from.",
        ),
    ] = 1,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Apply ops from a JSON-lines file (as written by `export`), in batches applied whole or
    not at all.

    A bad line applies nothing of its batch; the error names the line, says how many ops
    before it were applied, and the line to resume from with --resume-from. Into a graph that
    already held memories, the import says how many memories it created that were not there:
    a memory deleted since an earlier import of the same file comes back, and this is where
    it says so.
    """
    with _input(file) as (fh, total), backend(data_dir, token_file, cacert=cacert) as b:
        imp = _Importer(b, batch_size, skip_existing)
        with _progress(total, sys.stderr.isatty()) as advance:
            for lineno, raw in enumerate(fh, 1):
                advance(len(raw))
                if lineno < resume_from:
                    continue
                try:
                    op = _parse(raw, lineno)
                except ValidationError as e:
                    first = imp.pending_first(lineno)
                    e.message += f"; nothing of its batch ({_lines(first, lineno)}) was applied"
                    raise imp.failed(e, first, "fix it and import again") from None
                if op is not None:
                    imp.add(op, lineno, len(raw))
            imp.flush()
    created = imp.n_created
    out = {
        "ops": imp.applied,
        "batches": imp.batches,
        "lsn": imp.lsn,
        "skipped": imp.skipped,
        "created_memories": created,
    }
    if as_json:
        emit_json(out)
    else:
        lsn = "" if imp.lsn is None else f" (LSN {imp.lsn})"
        skipped = f", skipped {plural(imp.skipped, 'existing line')}" if imp.skipped else ""
        console().print(
            f"imported {plural(imp.applied, 'op')} in {plural(imp.batches, 'batch')}{skipped}{lsn}",
            markup=False,
        )
    if imp.had_memories and created:
        ids = ", ".join(imp.created) + (", ..." if created > len(imp.created) else "")
        err_console().print(
            f"note: {plural(created, 'memory')} did not exist before this import ({ids}); "
            "if one was deleted on purpose since an earlier import, delete it again",
            markup=False,
        )


# -- export ------------------------------------------------------------------------------


def _encode(op: dict[str, Any]) -> bytes:
    return (json.dumps(op, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


# Names that mean this process's own standard output: written to it directly (as ``-``), never
# opened by name (with stdout redirected to a file, /dev/stdout resolves to that file).
_STDOUT_NAMES = ("-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")


def _output_kind(path: Path, force: bool) -> str:
    """How ``export`` writes ``path``: "new" (created complete or not at all, never replacing
    what another process creates meanwhile), "replace" (an existing regular file, with
    ``--force``: replaced atomically; through a symlink, the file it points to), or "stream"
    (a FIFO or character device, after following symlinks: written through, never replaced).
    Anything else is refused with a usage error."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ValidationError(
                f"directory {path.parent} does not exist; create it first", field="output"
            ) from None
        return "new"
    except OSError as e:
        raise ValidationError(f"cannot use {path} ({e.strerror})", field="output") from None
    try:
        st = os.stat(path)
    except OSError:
        raise ValidationError(
            f"{path} is a symlink to nothing; name a new file or remove the link", field="output"
        ) from None
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return "stream"
    if stat.S_ISREG(st.st_mode):
        if not force:
            raise Refused(
                f"{path} already exists; use --force to replace it, or name a new file",
                field="output",
            )
        return "replace"
    what = {
        stat.S_IFDIR: "a directory",
        stat.S_IFSOCK: "a socket",
        stat.S_IFBLK: "a block device",
    }.get(stat.S_IFMT(st.st_mode), "not a regular file")
    raise ValidationError(
        f"{path} is {what}; name a new file, an existing one with --force, a FIFO or - for stdout",
        field="output",
    )


@contextmanager
def _output(path: Path, kind: str) -> Iterator[IO[bytes]]:
    """The export's output, as ``_output_kind`` decided. A file appears complete (temp, fsync,
    rename, fsync of the directory) or not at all: on any failure the temp file is removed."""
    if kind == "stream":
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            raise ValidationError(f"cannot write {path} ({e.strerror})", field="output") from None
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):  # it was replaced meanwhile
            os.close(fd)
            raise ValidationError(
                f"{path} changed while the export started; run it again", field="output"
            )
        with os.fdopen(fd, "wb") as fh:
            yield fh
        return
    target = Path(os.path.realpath(path)) if kind == "replace" else path
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise ValidationError(f"cannot write {path} ({e.strerror})", field="output") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if kind == "replace":
            os.replace(tmp, target)
        else:
            try:
                rename_noreplace(tmp, target)
            except FileExistsError:
                raise Refused(
                    f"{path} already exists (it was created while the export ran); nothing was "
                    "written — name a new file, or use --force to replace it",
                    field="output",
                ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _write(ops: ExportStream, fh: IO[bytes]) -> dict[str, Any]:
    """Write the export's lines; says which state (LSN, digest) they hold."""
    h = hashlib.sha256()
    counts = {"memories": 0, "edges": 0, "ops": 0, "bytes": 0}
    try:
        for op in ops:
            line = _encode(op)
            fh.write(line)
            h.update(line)
            counts["ops"] += 1
            counts["bytes"] += len(line)
            if op.get("op") == "create_memory":
                counts["memories"] += 1
            elif op.get("op") == "create_edge":
                counts["edges"] += 1
    finally:
        ops.close()  # a failed write must not leave the snapshot (or the stream) open
    return {**counts, "lsn": ops.lsn, "digest": ops.digest, "sha256": h.hexdigest()}


def export(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="A new file to create; an existing file only with --force (replaced "
            "atomically); a FIFO or device is written through; - for stdout.",
        ),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing regular file atomically.")
    ] = False,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Write the whole graph as JSON-lines ops that `import` turns back into the same graph."""
    to_stdout = str(output) in _STDOUT_NAMES
    kind = "stdout" if to_stdout else _output_kind(output, force)  # refused before any work
    with backend(data_dir, token_file, cacert=cacert) as b:
        if to_stdout:
            out = _write(b.export(), sys.stdout.buffer)
            sys.stdout.flush()
        else:
            with _output(output, kind) as fh:
                out = _write(b.export(), fh)
    out = {"output": str(output), **out}
    if as_json and not to_stdout:
        emit_json(out)
        return
    text = (
        f"exported {plural(out['memories'], 'memory')} and {plural(out['edges'], 'edge')} "
        f"as of LSN {out['lsn']} to {output} ({plural(out['bytes'], 'byte')}, "
        f"sha256 {out['sha256']})"
    )
    if to_stdout:  # stdout carries the data; the report goes beside it
        err_console().print(json.dumps(out) if as_json else text, markup=False)
    else:
        console().print(text, markup=False)


def register(app: typer.Typer) -> None:
    app.command("import")(import_)
    app.command("export")(export)
