"""Starting engram's own helper processes (``python -m engram.…``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import engram


def module_argv(module: str, *args: str) -> list[str]:
    """The command line running ``module`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def module_env() -> dict[str, str]:
    """This process's environment, with the directory this engram package was imported from
    first on PYTHONPATH: a helper runs this very code, installed or not."""
    env = dict(os.environ)
    root = str(Path(engram.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
