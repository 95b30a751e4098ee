"""``engram serve`` (alias ``engram start``): own the data dir and serve the HTTP API."""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from engram.cli.common import DEFAULT_DATA_DIR as _DD
from engram.cli.common import DataDir, configure_logging, resolve_token
from engram.config import EngineConfig

log = logging.getLogger("engram")
_DEFAULTS = EngineConfig()


class Durability(StrEnum):
    sync = "sync"
    batch = "batch"
    none = "none"


DURABILITY_HELP = (
    "When a write is acknowledged. sync (default): after its log record is fsynced — nothing "
    "acknowledged is ever lost. batch: once written to the log file, fsynced within "
    "milliseconds — survives a crash of engram, a power loss can drop the last few ms. none: "
    "once written; fsynced only at segment rotation, checkpoints and shutdown — a power loss "
    "can drop everything since the last checkpoint."
)


def _setup_logging() -> None:
    # A server's log wants timestamps and engram's INFO lines (listening, recovery progress,
    # ready); --debug has already lowered the level further.
    level = min(logging.getLogger("engram").getEffectiveLevel(), logging.INFO)
    configure_logging(level, "%(asctime)s %(levelname)s %(name)s: %(message)s")


def _http_log_level(access_log: bool) -> str:
    # The HTTP server's own lines: debug with --debug, info when its access log is asked for
    # (access lines are info), else warnings only.
    if logging.getLogger("engram").getEffectiveLevel() <= logging.DEBUG:
        return "debug"
    return "info" if access_log else "warning"


def _check_private(path: Path | None, what: str) -> None:
    if path is not None and path.exists() and path.stat().st_mode & 0o077:
        log.warning("%s %s is readable by other users; chmod 600 it", what, path)


def serve(
    data_dir: DataDir = _DD,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to bind.")] = 8080,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="File holding the bearer token every /v1 request must carry. Without a "
            "token the API is open, so only a loopback --host is allowed (see --insecure).",
            show_default="$ENGRAM_TOKEN",
        ),
    ] = None,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            "--admin-token-file",
            help="File holding the token /v1/admin routes (backup, quiesce, resume, status) "
            "then require instead of the data token; the data token no longer opens them.",
            show_default="$ENGRAM_ADMIN_TOKEN",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert",
            help="PEM certificate chain: serve HTTPS. It must name the address clients use "
            "(for a wildcard --host, 127.0.0.1 or ::1 too: local commands use loopback).",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Allow binding a non-loopback address without a token or without TLS.",
        ),
    ] = False,
    read_timeout: Annotated[
        float,
        typer.Option(
            "--read-timeout",
            help="Seconds a client has to send its request line and headers, and between "
            "pieces of its body; slower connections are closed (more than 0, at most 3600).",
        ),
    ] = 30.0,
    backup_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--backup-dir",
            help="A directory the server may write backups into itself (repeatable). Without "
            "one it writes no backup files: `engram backup` streams the backup to the CLI, "
            "which writes it.",
        ),
    ] = None,
    durability: Annotated[
        Durability, typer.Option("--durability", help=DURABILITY_HELP)
    ] = Durability.sync,
    fast_tier_bytes: Annotated[
        int, typer.Option("--fast-tier-bytes", min=0, help="RAM budget of the fast tier.")
    ] = _DEFAULTS.fast_tier_bytes,
    segment_bytes: Annotated[
        int, typer.Option("--segment-bytes", min=4096, help="Op-log segment size before rotation.")
    ] = _DEFAULTS.segment_bytes,
    checkpoint_interval: Annotated[
        float,
        typer.Option(
            "--checkpoint-interval", min=0.01, help="Seconds between checkpoints of the tiers."
        ),
    ] = _DEFAULTS.checkpoint_interval,
    half_life: Annotated[
        float,
        typer.Option("--half-life", min=0.0, help="Strength half-life in seconds (0: no decay)."),
    ] = _DEFAULTS.half_life_s,
    max_body: Annotated[
        int, typer.Option("--max-body", min=1024, help="Largest request body in bytes (413 above).")
    ] = 16 << 20,
    access_log: Annotated[
        bool,
        typer.Option("--access-log", help="Log one line per request (never its headers)."),
    ] = False,
) -> None:
    """Own the data dir and serve the HTTP API until SIGTERM or Ctrl-C.

    While it runs, other engram commands on the same --data-dir go through it.
    """
    _setup_logging()
    _check_private(token_file, "token file")
    _check_private(admin_token_file, "admin token file")
    _check_private(tls_key, "TLS key")
    token = resolve_token(token_file)
    admin_token = resolve_token(admin_token_file, "ENGRAM_ADMIN_TOKEN")
    config = EngineConfig(
        durability=durability.value,
        segment_bytes=segment_bytes,
        fast_tier_bytes=fast_tier_bytes,
        half_life_s=half_life,
        checkpoint_interval=checkpoint_interval,
    )
    # Imported here: the HTTP stack is only loaded by the command that needs it.
    from engram.server.app import TLS
    from engram.server.app import serve as run_server

    run_server(
        data_dir=data_dir,
        host=host,
        port=port,
        token=token,
        insecure=insecure,
        engine_config=config,
        max_body=max_body,
        admin_token=admin_token,
        tls=TLS.from_options(tls_cert, tls_key),
        read_timeout=read_timeout,
        backup_dirs=backup_dir or [],
        log_level=_http_log_level(access_log),
        access_log=access_log,
    )


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("start", help="Same as `engram serve`.", hidden=True)(serve)
