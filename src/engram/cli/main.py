"""The ``engram`` command: the typer app, its command modules, and how failures are reported.

Every failure ends as ONE line on stderr, ``error: <message>``, and a stable exit code: 0 ok,
1 failure, 2 usage (bad options, invalid values), 130 interrupted. ``--debug`` (accepted
anywhere before ``--``) prints the traceback as well and turns on debug logging.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from engram.cli import backups, init, ops, reads, repo, serve, transfer, writes
from engram.cli.common import configure_logging
from engram.errors import EngramError

# Command modules, each with ``register(app)``; add new command groups here.
COMMAND_MODULES = (init, writes, reads, transfer, backups, repo, ops, serve)

EXIT_INTERRUPTED = 130

# Recent typer vendors click (typer._click); older ones use click itself. Find the classes through
# a public one so that this works with both.
_MRO = {c.__name__: c for c in typer.BadParameter.__mro__}
ClickException: type[Exception] = _MRO["ClickException"]
ClickUsageError: type[Exception] = _MRO["UsageError"]


class _Interrupted(Exception):
    """Carries Ctrl-C past typer, which would otherwise turn it into a silent exit 130."""


def _take_debug(args: list[str]) -> tuple[bool, list[str]]:
    if "--" in args:
        cut = args.index("--")
        head, tail = args[:cut], args[cut:]
    else:
        head, tail = args, []
    debug = "--debug" in head
    return debug, [a for a in head if a != "--debug"] + tail


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _fail(message: str, code: int, exc: BaseException | None, debug: bool) -> int:
    if debug and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    typer.echo(f"error: {_one_line(message)}", err=True)
    return code


def _usage_message(e: Any) -> str:
    msg = str(e.format_message())
    ctx = getattr(e, "ctx", None)
    if isinstance(e, ClickUsageError) and ctx is not None:
        msg += f" (see `{ctx.command_path} --help`)"
    return msg


class EngramGroup(TyperGroup):
    """Runs a command and reports its failure as one line with a stable exit code."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        debug, argv = _take_debug(list(sys.argv[1:] if args is None else args))
        configure_logging(logging.DEBUG if debug else logging.WARNING)
        code = self._run(argv, prog_name or "engram", complete_var, debug, extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(
        self,
        argv: list[str],
        prog_name: str,
        complete_var: str | None,
        debug: bool,
        extra: dict[str, Any],
    ) -> int:
        try:
            rv = super().main(
                args=argv,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
            return rv if isinstance(rv, int) else 0
        except EngramError as e:
            return _fail(e.message, e.exit_code, e, debug)
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                # The help has been printed already (typer renders it while building e).
                msg = str(e.format_message()).strip()  # type: ignore[attr-defined]
                if msg:
                    typer.echo(msg, err=True)
                return int(e.exit_code)  # type: ignore[attr-defined]
            code = int(e.exit_code)  # type: ignore[attr-defined]
            return _fail(_usage_message(e), code, None, debug)  # no traceback: bad input
        except typer.Abort as e:
            return _fail("aborted", 1, e, debug)
        except (_Interrupted, KeyboardInterrupt) as e:
            return _fail("interrupted", EXIT_INTERRUPTED, e, debug)
        except Exception as e:
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            return _fail(f"unexpected {what} (rerun with --debug for the traceback)", 1, e, debug)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted() from e


app = typer.Typer(
    name="engram",
    cls=EngramGroup,
    help="engram: a graph database for memory graphs whose backups cannot be silently broken.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Show tracebacks and debug logs (accepted anywhere on the line)."
        ),
    ] = False,
) -> None:
    """engram: a graph database for memory graphs whose backups cannot be silently broken."""


for _module in COMMAND_MODULES:
    _module.register(app)


def run() -> None:
    """Console entry point (``engram``)."""
    # Everything engram creates (data, exports, temp files) is private to its owner.
    os.umask(0o077)
    app()
