"""One backup request, one set of rules (issue 9, item 1).

Every rule of ``BackupRequest.validate``, table-driven: the same broken request refused by the
CLI (`engram backup`: exit 2, one line naming the option) and by the HTTP route
(`POST /v1/admin/backup`: 400 naming the field), with one wording — the CLI's message is the
route's with each field spelled as its option. The rules only the route or a config file can
break (types, unknown keys, the streamed fields, the server's --backup-dir), a scheduler's
mapping, and what a valid request becomes.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from engram.backup.request import (
    FIELD_NAMES,
    MAX_LSN,
    OPTION_NAMES,
    BackupRequest,
)
from engram.cli.main import app
from engram.errors import Refused, UsageError, ValidationError
from engram.graph import Engine, EngineConfig
from engram.server import create_app

runner = CliRunner()
TEN_YEARS_AND_A_DAY = 10 * 365.25 * 86400 + 86400.0

# (what the rule is, the request's fields, the field the error names, a piece of its wording)
# Every request here can be said on the command line as well as in an HTTP body.
RULES: list[tuple[str, dict[str, Any], str, str]] = [
    ("priority is low or normal",
     {"kind": "full", "output": "f.tar.zst", "priority": "idle"}, "priority",
     "priority must be low or normal, got 'idle'"),
    ("priority is for full backups",
     {"kind": "incremental", "output": "i.log", "since_lsn": 1, "priority": "low"}, "priority",
     "priority applies to full backups only"),
    ("cpu share is for full backups",
     {"kind": "incremental", "output": "i.log", "since_lsn": 1, "cpu_share": 0.5}, "cpu_share",
     "cpu_share applies to full backups only"),
    ("cpu share at most 1",
     {"kind": "full", "output": "f.tar.zst", "cpu_share": 2.0}, "cpu_share",
     "cpu_share must be a number from 0.05 to 1 (a fraction of one core), got 2.0"),
    ("cpu share at least 0.05",
     {"kind": "full", "output": "f.tar.zst", "cpu_share": 0.01}, "cpu_share",
     "from 0.05 to 1"),
    ("cpu share is for priority low",
     {"kind": "full", "output": "f.tar.zst", "priority": "normal", "cpu_share": 0.5}, "cpu_share",
     "cpu_share applies to priority low only"),
    ("since is for incrementals",
     {"kind": "full", "output": "f.tar.zst", "since_s": 60.0}, "since_s",
     "since_s applies to incremental backups only"),
    ("since LSN is for incrementals",
     {"kind": "full", "output": "f.tar.zst", "since_lsn": 3}, "since_lsn",
     "since_lsn applies to incremental backups only"),
    ("since or since LSN, not both",
     {"kind": "incremental", "output": "i.log", "since_s": 60.0, "since_lsn": 3}, "since_lsn",
     "give since_s or since_lsn, not both"),
    ("since at most ten years",
     {"kind": "incremental", "output": "i.log", "since_s": TEN_YEARS_AND_A_DAY}, "since_s",
     "since_s must be more than 0 and at most"),
    ("since LSN from 1",
     {"kind": "incremental", "output": "i.log", "since_lsn": 0}, "since_lsn",
     "since_lsn must be an LSN from 1 to 2^63-1, got 0"),
    ("since LSN below 2^63",
     {"kind": "incremental", "output": "i.log", "since_lsn": MAX_LSN + 1}, "since_lsn",
     "since_lsn must be an LSN"),
    ("a full backup's name gives its compression",
     {"kind": "full", "output": "f.zip"}, "output",
     "output must end in .tar.zst (recommended) or .tar.gz for a full backup, got 'f.zip'"),
    ("an incremental is not an archive",
     {"kind": "incremental", "output": "i.tar.gz", "since_lsn": 1}, "output",
     "output names a full backup archive ('i.tar.gz'); an incremental is a .log file"),
]


def _spell(message: str, names: dict[str, str] | Any) -> str:
    """``message`` with every field name spelled as ``names`` says."""
    pattern = r"\b(" + "|".join(sorted(FIELD_NAMES, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda m: names.get(m.group(1), m.group(1)), message)


def _cli_args(fields: dict[str, Any]) -> list[str]:
    args = [f"--{fields['kind']}", f"--output={fields['output']}"]
    for name, option in OPTION_NAMES.items():
        if name not in ("kind", "output") and name in fields:
            args.append(f"{option}={fields[name]}")
    return args


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "data", EngineConfig(checkpoint_interval=3600)) as e:
        e.apply([{"op": "create_memory", "id": "m", "content": "hello"}])
        yield e


def _post(eng: Engine, body: Any, backup_dirs: tuple[Path, ...]) -> httpx.Response:
    async def go() -> httpx.Response:
        asgi = create_app(eng, None, 1 << 20)
        asgi.backup_dirs = backup_dirs
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/admin/backup", json=body)

    return asyncio.run(go())


@pytest.mark.parametrize(("rule", "fields", "field", "wording"), RULES, ids=[r[0] for r in RULES])
def test_one_rule_one_message_for_the_cli_and_the_route(
    rule: str, fields: dict[str, Any], field: str, wording: str, engine: Engine, tmp_path: Path
) -> None:
    bk = tmp_path / "bk"
    bk.mkdir()
    fields = fields | {"output": str(bk / fields["output"])}
    # The rule itself, in the route's names.
    with pytest.raises(ValidationError) as ei:
        BackupRequest(**fields).validate(FIELD_NAMES)
    assert ei.value.field == field and wording in ei.value.message, ei.value.message
    message = ei.value.message
    # The HTTP route: 400, the field named, that message.
    r = _post(engine, fields, (bk,))
    assert r.status_code == 400, r.text
    assert r.json() == {"error": "invalid", "message": message, "field": field}
    # The CLI: exit 2, one line, the same message with the options' names.
    res = runner.invoke(app, ["backup", *_cli_args(fields), f"--data-dir={tmp_path / 'none'}"])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    assert res.stderr.strip().splitlines() == [f"error: {_spell(message, OPTION_NAMES)}"]
    assert OPTION_NAMES[field] in res.stderr
    assert list(bk.iterdir()) == [] and not (tmp_path / "none").exists()


# -- what only the route (or a config file) can say -------------------------------------------

ROUTE_ONLY: list[tuple[dict[str, Any], str, str]] = [
    ({"kind": "snapshot"}, "kind", "kind must be full or incremental, got 'snapshot'"),
    ({}, "kind", "kind must be full or incremental"),
    ({"kind": "full", "extra": 1}, "extra", "unknown field 'extra' for backup"),
    ({"kind": "full", "compression": "lz4"}, "compression", "compression must be zstd or gzip"),
    ({"kind": "incremental", "since_lsn": 1, "compression": "gzip"}, "compression",
     "compression applies to full backups only"),
    ({"kind": "full", "parent": "a.log"}, "parent", "parent applies to incremental backups only"),
    ({"kind": "full", "start_by_lsn": 5}, "start_by_lsn", "applies to incremental backups only"),
    ({"kind": "incremental"}, "since_s", "a streamed incremental needs since_s, since_lsn or"),
    ({"kind": "incremental", "since_lsn": 1, "parent": "a/b"}, "parent", "a file name of 1 to"),
    ({"kind": "incremental", "since_lsn": 1, "parent": ".."}, "parent", "a file name of 1 to"),
    ({"kind": "incremental", "start_by_lsn": 1.5}, "start_by_lsn", "must be an LSN"),
    ({"kind": "incremental", "since_lsn": True}, "since_lsn", "must be an LSN"),
    ({"kind": "incremental", "since_s": "60"}, "since_s", "since_s must be more than 0"),
    ({"kind": "incremental", "since_s": 0}, "since_s", "since_s must be more than 0"),
    ({"kind": "full", "cpu_share": "0.5"}, "cpu_share", "from 0.05 to 1"),
    ({"kind": "full", "cpu_share": True}, "cpu_share", "from 0.05 to 1"),
    ({"kind": "full", "cpu_share": 10**400}, "cpu_share", "from 0.05 to 1"),
    ({"kind": "full", "priority": 1}, "priority", "priority must be low or normal, got 1"),
    ({"kind": "full", "priority": ["low"]}, "priority", "priority must be low or normal"),
]


@pytest.mark.parametrize(("body", "field", "wording"), ROUTE_ONLY)
def test_what_only_a_mapping_can_say(
    body: dict[str, Any], field: str, wording: str, engine: Engine
) -> None:
    with pytest.raises(ValidationError) as ei:
        BackupRequest.from_mapping(body)
    assert ei.value.field == field and wording in ei.value.message, ei.value.message
    assert "\n" not in ei.value.message
    r = _post(engine, body, ())
    assert r.status_code == 400 and r.json()["field"] == field, r.text
    assert r.json()["message"] == ei.value.message


def test_the_server_output_rules(engine: Engine, tmp_path: Path) -> None:
    bk = tmp_path / "bk"
    (bk / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (bk / "escape").symlink_to(outside)
    (bk / "taken.tar.zst.sha256").write_text("x\n")
    cases = [
        ((), {"kind": "full", "output": str(bk / "a.tar.zst")}, "writes no backup files"),
        ((bk,), {"kind": "full", "output": 5}, "output must be a path, got 5"),
        ((bk,), {"kind": "full", "output": "a.tar.zst"}, "absolute"),
        ((bk,), {"kind": "full", "output": f"{bk}/sub/../a.tar.zst"}, "'..'"),
        ((bk,), {"kind": "full", "output": str(bk) + "/"}, "end in a file name"),
        ((bk,), {"kind": "full", "output": str(outside / "a.tar.zst")}, "inside a backup dir"),
        ((bk,), {"kind": "full", "output": str(bk / "escape" / "a.tar.zst")}, "inside a backup"),
        ((bk,), {"kind": "full", "output": str(bk / "no" / "a.tar.zst")}, "does not exist"),
        ((bk,), {"kind": "full", "output": str(bk / "taken.tar.zst")}, "already exists"),
        ((bk,), {"kind": "full", "output": str(bk / "a.tar.zst"), "compression": "gzip"},
         "compression applies to a streamed backup only"),
        ((bk,), {"kind": "incremental", "output": str(bk / "i.log"), "start_by_lsn": 3},
         "start_by_lsn applies to a streamed backup only"),
    ]
    for dirs, body, wording in cases:
        # An existing name is refused because of state (Refused, 409); the rest are bad requests.
        expected = Refused if wording == "already exists" else ValidationError
        with pytest.raises(expected) as ei:
            BackupRequest.from_mapping(body, backup_dirs=dirs)
        assert wording in ei.value.message, (body, ei.value.message)
        r = _post(engine, body, dirs)
        status = 409 if expected is Refused else 400
        assert r.status_code == status and r.json()["message"] == ei.value.message, r.text
    assert sorted(p.name for p in bk.iterdir()) == ["escape", "sub", "taken.tar.zst.sha256"]
    ok = BackupRequest.from_mapping(
        {"kind": "full", "output": str(bk / "sub" / "n.tar.zst")}, backup_dirs=(bk,)
    )
    assert ok.output == str((bk / "sub" / "n.tar.zst").resolve())


# -- a valid request ----------------------------------------------------------------------------


def test_a_valid_request_is_normalised() -> None:
    req = BackupRequest("full", cpu_share=1).validate()
    assert (req.priority, req.cpu_share) == ("low", 1.0)  # a share implies low
    assert isinstance(req.cpu_share, float)
    assert BackupRequest("full").validate().priority_or("normal") == "normal"
    assert BackupRequest("full", priority="low").validate().priority_or("normal") == "low"
    assert BackupRequest("incremental", since_s=5).validate().priority_or("low") is None
    assert BackupRequest("incremental", since_s=5).validate().since_s == 5.0
    streamed = BackupRequest("full", "/b/x.tar.gz", priority="low").validate().streamed()
    assert (streamed.output, streamed.compression) == (None, "gzip")
    assert BackupRequest("incremental", "/b/i.log").validate().streamed().compression is None


def test_a_scheduler_builds_requests_from_its_config() -> None:
    """A config file's table is a mapping: the same rules, the same field names, and a request
    written out reads back the same."""
    table = {"kind": "full", "output": "/var/backups/engram/nightly.tar.zst", "cpu_share": 0.5}
    req = BackupRequest.from_mapping(table)
    assert req == BackupRequest("full", table["output"], priority="low", cpu_share=0.5)
    assert BackupRequest.from_mapping(req.to_mapping()) == req
    inc = {"kind": "incremental", "output": "/var/backups/engram/i.log", "since_s": 300}
    assert BackupRequest.from_mapping(inc).since_s == 300.0
    names = {f: f"backup.nightly.{f}" for f in FIELD_NAMES}
    with pytest.raises(ValidationError, match=r"^backup\.nightly\.priority must be low or normal"):
        BackupRequest.from_mapping(table | {"priority": "fast"}, names)


def test_python_callers_read_plain_words_and_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError) as ei:
        BackupRequest("full", cpu_share=math.nan).validate()
    assert ei.value.exit_code == 2 and ei.value.http_status == 400
    assert ei.value.message.startswith("cpu share must be a number from 0.05 to 1")
    with pytest.raises(ValidationError, match="^since LSN must be an LSN"):
        BackupRequest("incremental", since_lsn=-1).validate()
