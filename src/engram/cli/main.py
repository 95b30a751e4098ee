"""The ``engram`` command: the typer app, its command modules, and how failures are reported.

Every failure ends as ONE line on stderr, ``error: <message>``, and a stable exit code (README
"CLI" has the table): 0 ok, 1 failure, 2 usage (bad options, invalid values), 3 refused because
of the current state (``errors.Refused``), 130 interrupted. ``--debug`` (accepted anywhere
before ``--``) prints the traceback as well and turns on debug logging.

A reader of stdout that goes away (``engram backup … | head -1``) is not a failure: what a
command prints comes after its work is done and recorded, so the command ends quietly with
exit 0 and nothing on stderr.
"""

from __future__ import annotations

import importlib
import logging
import os
import select
import sys
import traceback
from collections.abc import Iterator, MutableMapping, Sequence
from enum import StrEnum
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from engram import __version__
from engram.cli.common import configure_logging
from engram.errors import EngramError

# Every command, in the order `engram --help` lists them, and the module of engram.cli whose
# ``register(app)`` defines it. A module is imported only when one of its commands is looked up
# (run, or its help shown), so a command pays for its own imports alone; `engram --help` looks
# up every command. Add a new command here and in its module's ``register``.
COMMANDS: dict[str, str] = {
    "init": "init",
    **dict.fromkeys(("put", "link", "unlink", "delete", "activate", "mark"), "writes"),
    **dict.fromkeys(("query", "neighbors", "recall", "stats"), "reads"),
    **dict.fromkeys(("import", "export"), "transfer"),
    **dict.fromkeys(
        ("backup", "restore", "apply-log", "restore-pitr", "validate-backup"), "backups"
    ),
    "backups": "repo",
    **dict.fromkeys(("push", "pull", "sync"), "offsite"),
    "history": "history",
    **dict.fromkeys(
        ("quiesce", "resume", "status", "verify", "rebuild-index", "benchmark", "test"), "ops"
    ),
    **dict.fromkeys(("serve", "start"), "serve"),
}

EXIT_INTERRUPTED = 130

# Recent typer vendors click (typer._click); older ones use click itself. Find the classes through
# a public one so that this works with both.
_MRO = {c.__name__: c for c in typer.BadParameter.__mro__}
ClickException: type[Exception] = _MRO["ClickException"]
ClickUsageError: type[Exception] = _MRO["UsageError"]


class _Interrupted(Exception):
    """Carries Ctrl-C past typer, which would otherwise turn it into a silent exit 130."""


class _PipeClosed(Exception):
    """Carries a BrokenPipeError past click, which would otherwise turn it into a silent exit 1."""


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


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (so a BrokenPipeError came from
    it, not from a helper process's pipe or a connection)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _stdout_closed() -> int:
    """stdout's reader went away: nothing more can be printed there, and Python's final flush of
    it at exit must not fail again (it would print a traceback)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 0


def _usage_message(e: Any) -> str:
    msg = str(e.format_message())
    ctx = getattr(e, "ctx", None)
    if isinstance(e, ClickUsageError) and ctx is not None:
        msg += f" (see `{ctx.command_path} --help`)"
    return msg


class LazyCommands(MutableMapping[str, Any]):
    """A group's commands by name: the ones built already, and those of ``COMMANDS``, built
    when first looked up by importing their module. Listing the names (help's order, command
    suggestions, completion of names) imports nothing."""

    def __init__(self, built: MutableMapping[str, Any], rich_markup_mode: Any) -> None:
        self._built = dict(built)
        self._markup = rich_markup_mode

    def _load(self, name: str) -> None:
        module = importlib.import_module(f"engram.cli.{COMMANDS[name]}")
        sub = typer.Typer(rich_markup_mode=self._markup)
        module.register(sub)
        for n, cmd in typer.main.get_group(sub).commands.items():
            self._built.setdefault(n, cmd)
        if name not in self._built:
            raise RuntimeError(f"engram.cli.{COMMANDS[name]} does not register {name!r}")

    def __getitem__(self, name: str) -> Any:
        if name not in self._built and name in COMMANDS:
            self._load(name)
        return self._built[name]

    def __setitem__(self, name: str, cmd: Any) -> None:
        self._built[name] = cmd

    def __delitem__(self, name: str) -> None:
        del self._built[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._built
        yield from (n for n in COMMANDS if n not in self._built)

    def __len__(self) -> int:
        return len(self._built.keys() | COMMANDS.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._built or name in COMMANDS


class EngramGroup(TyperGroup):
    """Runs a command and reports its failure as one line with a stable exit code; builds a
    command only when it is looked up (``LazyCommands``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(self.commands, getattr(self, "rich_markup_mode", None))

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if os.environ.get("_ENGRAM_COMPLETE"):
            # A completion request from the script `engram completion` prints: typer's shell
            # classes answer it (bash, zsh), inside click's main below.
            from typer._completion_classes import completion_init

            completion_init()
        debug, argv = _take_debug(list(sys.argv[1:] if args is None else args))
        configure_logging(logging.DEBUG if debug else logging.WARNING)
        try:
            code = self._run(argv, prog_name or "engram", complete_var, debug, extra)
        except BrokenPipeError:  # from the last flush of a report, after _run's handlers
            code = _stdout_closed()
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
        except _PipeClosed as e:
            if _stdout_gone():
                return _stdout_closed()
            cause = e.__cause__ or e
            return _fail(f"unexpected BrokenPipeError: {cause}", 1, cause, debug)
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
        except BrokenPipeError as e:
            raise _PipeClosed() from e


app = typer.Typer(
    name="engram",
    cls=EngramGroup,
    help="engram: a graph database for memory graphs whose backups cannot be silently broken.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"engram {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Show tracebacks and debug logs (accepted anywhere on the line)."
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print engram's version and exit.", is_eager=True, callback=_version
        ),
    ] = False,
) -> None:
    """engram: a graph database for memory graphs whose backups cannot be silently broken."""


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"


def completion(
    shell: Annotated[Shell, typer.Argument(help="The shell.")],
) -> None:
    """Print the shell completion script for bash or zsh. Load it with
    `eval "$(engram completion bash)"` (in ~/.bashrc), or `engram completion zsh > ~/.zfunc/_engram`
    with ~/.zfunc in fpath."""
    from typer._completion_shared import get_completion_script

    sys.stdout.write(
        get_completion_script(
            prog_name="engram", complete_var="_ENGRAM_COMPLETE", shell=shell.value
        )
    )
    sys.stdout.flush()


app.command("completion")(completion)


def run() -> None:
    """Console entry point (``engram``)."""
    # Everything engram creates (data, exports, temp files) is private to its owner.
    os.umask(0o077)
    app()
