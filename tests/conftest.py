"""Session fixtures shared by every test directory: the S3 servers of the object store tests
(tests/s3servers.py), each started once per session when a test first asks for it and stopped
at the end; a failing test that used one gets the tail of its log in the report. The AWS
variables are set for the whole test process (fake credentials, no profile or endpoint, no
instance metadata), so boto3 reaches nothing but these servers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from s3servers import AWS_ENV, AWS_UNSET, MotoServer, S3Server, SeaweedServer

_started: dict[str, S3Server] = {}  # by the name of the fixture that started it


@pytest.fixture(scope="session", autouse=True)
def _aws_env() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    for k, v in AWS_ENV.items():
        mp.setenv(k, v)
    for k in AWS_UNSET:
        mp.delenv(k, raising=False)
    yield
    mp.undo()


def _server(fixture: str, kind: type[S3Server], tmp: pytest.TempPathFactory) -> Iterator[S3Server]:
    srv = kind(Path(tmp.mktemp(kind.name)))
    _started[fixture] = srv
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    yield from _server("moto_s3", MotoServer, tmp_path_factory)


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    yield from _server("seaweed_s3", SeaweedServer, tmp_path_factory)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for fixture, srv in _started.items():
            if fixture in getattr(item, "fixturenames", ()) or srv.name in item.nodeid:
                report.sections.append((f"{srv.name} log ({srv.log})", srv.tail()))
