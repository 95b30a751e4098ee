"""What every command shares: the common options, the token, the backend, the output."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engram.errors import UsageError, ValidationError

if TYPE_CHECKING:  # the engine, the HTTP client and rich load when a command uses them
    from rich.console import Console

    from engram.backend import Backend

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="ENGRAM_DATA_DIR",
        help="The engram data directory.",
        show_default="./engram-data",
    ),
]
TokenFile = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="File holding the API token, used when a server owns the data dir.",
        show_default="$ENGRAM_TOKEN",
    ),
]
AdminTokenFile = Annotated[
    Path | None,
    typer.Option(
        "--admin-token-file",
        help="File holding the server's admin token (when it has one); else the data token "
        "is sent.",
        show_default="$ENGRAM_ADMIN_TOKEN",
    ),
]
CaCert = Annotated[
    Path | None,
    typer.Option(
        "--cacert",
        envvar="ENGRAM_CACERT",
        help="PEM file of the CA that signed an HTTPS server's certificate (a private CA); "
        "default: the system's trusted CAs.",
        show_default="$ENGRAM_CACERT",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]

DEFAULT_DATA_DIR = Path("engram-data")


def resolve_token(token_file: Path | None, env: str = "ENGRAM_TOKEN") -> str | None:
    """The token from ``token_file`` (content stripped), else the variable ``env``, else None."""
    if token_file is None:
        return os.environ.get(env, "").strip() or None
    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read token file {token_file} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"token file {token_file} is not text") from None
    if not token:
        raise UsageError(f"token file {token_file} is empty; put the token in it")
    return token


@contextmanager
def backend(
    data_dir: Path,
    token_file: Path | None,
    *,
    create: bool = False,
    admin_token_file: Path | None = None,
    cacert: Path | None = None,
) -> Iterator[Backend]:
    """The data dir or its server; ``create`` (init only) lays out a new data dir, every other
    command refuses a directory that is not one. The admin token (``admin_token_file`` or
    ENGRAM_ADMIN_TOKEN) goes with admin requests only; ``cacert`` (or ENGRAM_CACERT, for
    commands without the option) verifies an HTTPS server."""
    from engram.backend import open_backend

    if cacert is None and os.environ.get("ENGRAM_CACERT"):
        cacert = Path(os.environ["ENGRAM_CACERT"])
    with open_backend(
        data_dir,
        resolve_token(token_file),
        create=create,
        admin_token=resolve_token(admin_token_file, "ENGRAM_ADMIN_TOKEN"),
        cacert=cacert,
    ) as b:
        yield b


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: int, fmt: str = "%(levelname)s: %(message)s") -> None:
    """engram's log lines go to stderr at ``level``; idempotent, and other loggers are left
    alone (an embedding program or test harness keeps its own configuration)."""
    log = logging.getLogger("engram")
    handler = next((h for h in log.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        log.addHandler(handler)
    handler.setFormatter(logging.Formatter(fmt))
    log.setLevel(level)


@functools.cache
def _console_class() -> type[Console]:
    """A rich console that lets a closed pipe surface as BrokenPipeError (rich would exit 1
    itself); the CLI's top level decides what it means (cli/main.py). Made on first use, so
    that a command printing JSON does not load rich."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError()

    return _Console


def console() -> Console:
    # Made per call so it writes to whatever sys.stdout is now (tests swap it).
    return _console_class()(highlight=False, soft_wrap=True)


def err_console() -> Console:
    return _console_class()(stderr=True, highlight=False)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def parse_json_object(text: str | None, field: str) -> dict[str, Any] | None:
    """A JSON object given on the command line, or a usage error naming the option."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValidationError(f"--{field} is not valid JSON ({e})", field=field) from None
    if not isinstance(value, dict):
        raise ValidationError(f"--{field} must be a JSON object", field=field)
    return value


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, option: str) -> float:
    """Seconds in ``90``, ``10s``, ``5m``, ``1h30m``, ``2d``; a usage error naming the option."""
    t = text.strip().lower()
    try:
        value = float(t)
    except ValueError:
        value = -1.0
    if value < 0:
        pos, value = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNIT_S[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise UsageError(f"{option} {text!r} is not a duration; use e.g. 90, 10s, 5m, 1h30m")
    if not value > 0:
        raise UsageError(f"{option} must be positive")
    return value


@contextmanager
def progress_bar(label: str, unit: str = "bytes") -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal; yields the callback or None."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    amount = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    speed = TransferSpeedColumn() if unit == "bytes" else TextColumn("")
    cols = (TextColumn(label), BarColumn(), amount, speed, TimeRemainingColumn())
    with Progress(*cols, console=err_console(), transient=True) as p:
        task = p.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            p.update(task, completed=done, total=total or None)

        yield update


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word`` agreeing in number: "1 edge", "0 edges", "2 memories", "3 batches".
    ``many`` gives an irregular plural."""
    if n == 1:
        return f"{n} {word}"
    if many is None:
        if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
            many = word[:-1] + "ies"
        elif word.endswith(("s", "x", "ch", "sh")):
            many = word + "es"
        else:
            many = word + "s"
    return f"{n} {many}"


def lsn_range(first: int, last: int, what: str = "record") -> str:
    """Records ``first``..``last`` said right: "no records" when the range is empty,
    "1 record (LSN 5)", "3 records (LSN 5..7)"; never a backwards range like "LSN 5..4"."""
    n = last - first + 1
    if n <= 0:
        return f"no {plural(2, what).split(' ', 1)[1]}"
    if n == 1:
        return f"1 {what} (LSN {first})"
    return f"{plural(n, what)} (LSN {first}..{last})"
