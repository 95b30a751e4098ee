"""Fixtures that run real engram server processes on 127.0.0.1 (see serverproc.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serverproc import SMALL_BODY, TEST_TOKEN, ServerProcess


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``start_server(data_dir=None, wait="ready", **ServerProcess options)``; all are stopped
    (SIGTERM, then SIGKILL) when the test ends."""
    started: list[ServerProcess] = []

    def start(data_dir: Path | None = None, wait: str | None = "ready", **kw: Any) -> ServerProcess:
        srv = ServerProcess(data_dir or tmp_path / f"data{len(started)}", **kw)
        started.append(srv)
        return srv.start(wait=wait)

    yield start
    for srv in started:
        try:
            srv.stop(timeout=15)
        except Exception:
            srv.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for a module's route tests: token auth on, a small body limit."""
    srv = ServerProcess(
        tmp_path_factory.mktemp("srv") / "data", token=TEST_TOKEN, max_body=SMALL_BODY
    ).start()
    try:
        yield srv
    finally:
        try:
            srv.stop(timeout=15)
        except Exception:
            srv.kill()
