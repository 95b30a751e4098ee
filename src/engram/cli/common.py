"""What every command shares: the common options, the token, the backend, the output."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engram.errors import UsageError, ValidationError

if TYPE_CHECKING:  # the engine, the HTTP client and rich load when a command uses them
    from rich.console import Console

    from engram.backend import Backend
    from engram.storage import BackupStore, Ref

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


def size_text(n: int) -> str:
    """A size in bytes as a person reads it: "712 B", "1.2 KiB", "44.0 MiB", "1.5 GiB"."""
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if f < 1024 or unit == "GiB":
            return f"{f:.1f} {unit}" if unit != "B" else f"{n} B"
        f /= 1024
    return f"{n} B"


def lsn_range(first: int, last: int, what: str = "record") -> str:
    """Records ``first``..``last`` said right: "no records" when the range is empty,
    "1 record (LSN 5)", "3 records (LSN 5..7)"; never a backwards range like "LSN 5..4"."""
    n = last - first + 1
    if n <= 0:
        return f"no {plural(2, what).split(' ', 1)[1]}"
    if n == 1:
        return f"1 {what} (LSN {first})"
    return f"{plural(n, what)} (LSN {first}..{last})"


# -- s3:// paths ---------------------------------------------------------------------------------
#
# Wherever a command takes a backup or a repository, an s3://BUCKET/PREFIX/ URL works too. The
# options saying how to reach the store are one set, added to a command by ``s3_options`` and
# handed to it as one ``S3Options`` value; ``backup_location`` and ``repository_location`` turn
# what the user typed into a path or into the store (``engram.cloud``, which loads boto3 only
# then).

_S3_HELP = "S3 (for s3:// paths)"


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    path_style: bool | None = None  # None: as the AWS config says
    storage_class: str | None = None
    retry_for_s: float = 600.0

    def open_args(self) -> dict[str, Any]:
        from engram.storage.retry import Backoff

        return {
            "endpoint_url": self.endpoint_url,
            "path_style": self.path_style,
            "storage_class": self.storage_class,
            "backoff": Backoff(budget=self.retry_for_s),
        }


def _s3_params(writes: bool) -> list[inspect.Parameter]:
    def opt(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
        )

    params = [
        opt(
            "s3_endpoint_url",
            Annotated[
                str | None,
                typer.Option(
                    "--endpoint-url",
                    help="The S3 endpoint of s3:// paths (MinIO, SeaweedFS, R2, …); default "
                    "AWS_ENDPOINT_URL or the AWS config's endpoint_url, else AWS. Region and "
                    "credentials come from the usual AWS chain.",
                    rich_help_panel=_S3_HELP,
                    show_default=False,
                ),
            ],
            None,
        ),
        opt(
            "s3_path_style",
            Annotated[
                bool,
                typer.Option(
                    "--s3-path-style",
                    help="Address s3:// paths as http://HOST/BUCKET/KEY (what most "
                    "self-hosted servers want); default as the AWS config says.",
                    rich_help_panel=_S3_HELP,
                ),
            ],
            False,
        ),
        opt(
            "s3_retry_for",
            Annotated[
                str,
                typer.Option(
                    "--s3-retry-for",
                    help="How long to keep retrying an S3 request that fails with a "
                    "transient error (5xx, 429, a dropped connection), e.g. 30s, 10m.",
                    rich_help_panel=_S3_HELP,
                ),
            ],
            "10m",
        ),
    ]
    if writes:
        params.append(
            opt(
                "s3_storage_class",
                Annotated[
                    str | None,
                    typer.Option(
                        "--storage-class",
                        help="The S3 storage class of the objects written to an s3:// path "
                        "(STANDARD, STANDARD_IA, …); default the bucket's.",
                        rich_help_panel=_S3_HELP,
                        show_default=False,
                    ),
                ],
                None,
            )
        )
    return params


def s3_options(*, writes: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the S3 options (``--endpoint-url``, ``--s3-path-style``,
    ``--s3-retry-for``, and ``--storage-class`` when it ``writes``) and pass them to it as one
    ``s3: S3Options`` argument: one set of options, declared here only."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "s3"]
        extra = _s3_params(writes)

        @functools.wraps(fn)
        def command(*args: Any, **kw: Any) -> Any:
            s3 = S3Options(
                endpoint_url=kw.pop("s3_endpoint_url", None),
                path_style=True if kw.pop("s3_path_style", False) else None,
                storage_class=kw.pop("s3_storage_class", None),
                retry_for_s=parse_duration(kw.pop("s3_retry_for", "10m"), "--s3-retry-for"),
            )
            return fn(*args, s3=s3, **kw)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def is_url(text: str | Path) -> bool:
    return str(text).startswith("s3://")


def object_ref(url: str, s3: S3Options) -> Ref:
    """The object of the s3:// URL ``url`` (``s3://BUCKET/PREFIX/NAME``)."""
    from engram.cloud import open_ref

    return open_ref(url, **s3.open_args())


def backup_location(text: str, s3: S3Options) -> Path | Ref:
    """A backup named on the command line: a path, or the object of an s3:// URL."""
    return object_ref(text, s3) if is_url(text) else Path(text)


def repository_location(text: str, s3: S3Options) -> Path | BackupStore:
    """A repository named on the command line: a directory, or the store of an s3:// URL
    (``s3://BUCKET/PREFIX/``; the trailing ``/`` may be left out)."""
    if not is_url(text):
        return Path(text)
    from engram.cloud import open_store

    return open_store(text, **s3.open_args())


def log_location(text: str, s3: S3Options) -> Path | Ref | BackupStore:
    """Logs to replay: a file or directory, a log at an s3:// URL, or every log of an s3://
    prefix (a URL ending in ``/``)."""
    if not is_url(text):
        return Path(text)
    return repository_location(text, s3) if text.endswith("/") else backup_location(text, s3)
