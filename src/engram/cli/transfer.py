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
from typing import IO, Annotated, Any, BinaryIO

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from engram.backend import Backend
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
)
from engram.errors import EngramError, Refused, RemoteError, ValidationError
from engram.fsutil import fsync_dir, rename_noreplace
from engram.model import ExportStream

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
    """Sends ops in atomic batches and keeps the promise of the error messages: everything
    before a bad line is applied, nothing from it on, so a fixed file resumes at that line."""

    def __init__(self, b: Backend, batch_size: int) -> None:
        self.b = b
        self.batch_size = batch_size
        self.ops: list[dict[str, Any]] = []
        self.lines: list[int] = []
        self.bytes = 0
        self.applied = 0
        self.batches = 0
        self.lsn: int | None = None

    def add(self, op: dict[str, Any], lineno: int, size: int) -> None:
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

    def flush(self) -> None:
        if not self.ops:
            return
        ops, lines = self.ops, self.lines
        self.ops, self.lines, self.bytes = [], [], 0
        try:
            self._send(ops)
        except EngramError as e:
            idx = e.details.get("index")
            if idx is None and len(ops) == 1:
                idx = 0
            if not isinstance(idx, int) or not 0 <= idx < len(ops):
                # Not one op's fault (server unavailable, connection lost, ...).
                msg = f"{e.message} (batch from line {lines[0]})"
                if isinstance(e, RemoteError):
                    msg += "; that batch may or may not have been applied"
                raise self.failed(e, msg, lines[0], fix=False) from None
            if idx > 0:
                self._send(ops[:idx])  # the ops before the bad one are good on their own
            msg = e.message.removeprefix(f"op {idx}: ")
            raise self.failed(e, f"line {lines[idx]}: {msg}", lines[idx]) from None

    def failed(
        self, e: EngramError, message: str, resume_line: int, fix: bool = True
    ) -> EngramError:
        n = self.applied
        todo = "fix it and import again" if fix else "import again"
        done = "1 op before it was applied" if n == 1 else f"{n} ops before it were applied"
        e.message = f"{message}; {done} — {todo} from line {resume_line}"
        e.args = (e.message,)
        e.details["line"] = resume_line
        e.details["applied"] = self.applied
        return e


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
        int, typer.Option("--batch-size", min=1, max=100_000, help="Ops per atomic batch.")
    ] = 1000,
    data_dir: DataDir = _DD,
    token_file: TokenFile = None,
    cacert: CaCert = None,
    as_json: Json = False,
) -> None:
    """Apply ops from a JSON-lines file (as written by `export`), in atomic batches."""
    with _input(file) as (fh, total), backend(data_dir, token_file, cacert=cacert) as b:
        imp = _Importer(b, batch_size)
        with _progress(total, sys.stderr.isatty()) as advance:
            for lineno, raw in enumerate(fh, 1):
                advance(len(raw))
                try:
                    op = _parse(raw, lineno)
                except ValidationError as e:
                    imp.flush()
                    raise imp.failed(e, e.message, lineno) from None
                if op is not None:
                    imp.add(op, lineno, len(raw))
            imp.flush()
    out = {"ops": imp.applied, "batches": imp.batches, "lsn": imp.lsn}
    if as_json:
        emit_json(out)
    else:
        lsn = "" if imp.lsn is None else f" (lsn {imp.lsn})"
        console().print(f"imported {imp.applied} ops in {imp.batches} batches{lsn}", markup=False)


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
        f"exported {out['memories']} memories and {out['edges']} edges as of LSN {out['lsn']} "
        f"to {output} ({out['bytes']} bytes, sha256 {out['sha256']})"
    )
    if to_stdout:  # stdout carries the data; the report goes beside it
        err_console().print(json.dumps(out) if as_json else text, markup=False)
    else:
        console().print(text, markup=False)


def register(app: typer.Typer) -> None:
    app.command("import")(import_)
    app.command("export")(export)
