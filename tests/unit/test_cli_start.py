"""The CLI imports what the command it runs needs: a command's module is imported when the
command is looked up, while `engram --help`, typo suggestions and completion still know every
command (cli/main.py ``COMMANDS``)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from engram.cli import main

MODULES = sorted(set(main.COMMANDS.values()))


def modules_loaded(*args: str) -> set[str]:
    """The engram.cli modules and heavy libraries a fresh ``engram ARGS`` process imported."""
    code = (
        "import sys\n"
        "from engram.cli.main import app\n"
        f"try:\n    app({list(args)!r})\nexcept SystemExit:\n    pass\n"
        "import json\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "100"}, timeout=60)
    return set(json.loads(r.stderr.strip().splitlines()[-1]))


def test_commands_lists_exactly_what_the_modules_register() -> None:
    registered: dict[str, str] = {}
    for name in MODULES:
        sub = typer.Typer()
        importlib.import_module(f"engram.cli.{name}").register(sub)
        for cmd in sub.registered_commands:
            assert cmd.name is not None
            registered[cmd.name] = name
    assert registered == main.COMMANDS


def test_a_command_imports_its_own_module_only(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    loaded = modules_loaded("backups", "--repo", str(repo))
    cli = {m.rsplit(".", 1)[1] for m in loaded if m.startswith("engram.cli.")}
    # repo's command uses a helper of backups' module; nothing else of the CLI loads.
    assert cli <= {"main", "common", "repo", "backups"}, cli
    assert "engram.graph" not in loaded and "engram.client" not in loaded


def test_help_lists_every_command_in_order() -> None:
    r = CliRunner().invoke(main.app, ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    shown = [ln.split()[1] for ln in r.output.splitlines()
             if ln.startswith("│ ") and len(ln.split()) > 2 and ln.split()[1].islower()
             and not ln.split()[1].startswith("-")]
    visible = ["completion", *(n for n in main.COMMANDS if n != "start")]
    assert [n for n in shown if n in visible] == visible


def test_every_command_has_its_help(tmp_path: Path) -> None:
    runner = CliRunner()
    for name in main.COMMANDS:
        r = runner.invoke(main.app, [name, "--help"], env={"COLUMNS": "120"})
        assert r.exit_code == 0, (name, r.output)
        assert f"engram {name}" in r.output, (name, r.output)


def test_a_typo_is_answered_with_the_commands_not_loaded_yet() -> None:
    r = CliRunner().invoke(main.app, ["restor"])
    assert r.exit_code == 2
    assert "No such command 'restor'" in r.output and "'restore'" in r.output, r.output


def test_a_table_entry_its_module_does_not_register_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(main.COMMANDS, "no-such-command", "init")
    commands = main.LazyCommands({}, None)
    assert "no-such-command" in commands and "no-such-command" in list(commands)
    with pytest.raises(RuntimeError, match="does not register 'no-such-command'"):
        commands["no-such-command"]
    assert commands.get("init") is not None  # what the module does register was built
    assert commands.get("nothing") is None
