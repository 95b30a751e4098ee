"""The layering of docs/ARCHITECTURE.md "Layers" holds: import-linter checks the contracts of
pyproject.toml's [tool.importlinter] (the layers, the server apart from the CLI's adapters, a core
that imports no CLI, HTTP or cloud library), as `make lint` does, and a copy of the package with
one forbidden import of each kind breaks each contract."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing; run `make dev`"
    env = None if pythonpath is None else {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(CONFIG)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_hold() -> None:
    p = lint_imports(ROOT)
    assert p.returncode == 0, f"lint-imports failed:\n{p.stdout}\n{p.stderr}"
    assert "0 broken" in p.stdout, p.stdout


def test_each_contract_breaks_on_a_forbidden_import(tmp_path: Path) -> None:
    """The contracts can fail: a copy of the package in which the model imports typer, the
    engine imports a backup module and the server imports the HTTP client breaks all three."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "src" / "engram", src / "engram", ignore=shutil.ignore_patterns("__pycache__")
    )
    for rel, line in [
        ("model.py", "import typer  # noqa"),
        ("graph.py", "import engram.backup.full  # noqa"),
        ("server/routes.py", "import engram.client  # noqa"),
    ]:
        f = src / "engram" / rel
        f.write_text(f.read_text() + f"\n{line}\n")
    p = lint_imports(tmp_path, pythonpath=src)
    out = p.stdout
    assert p.returncode == 1, f"lint-imports passed a package that breaks it:\n{out}\n{p.stderr}"
    assert "3 broken" in out, out
    assert "engram.model -> typer" in out, out
    assert "engram.graph -> engram.backup.full" in out, out
    assert "engram.server.routes -> engram.client" in out, out
