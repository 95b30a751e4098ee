"""``python -m engram.server``: a thin entry point for tests and benchmarks.

The user-facing command is ``engram serve``; this takes the same core options without the CLI's
dependencies, so a test can start a real server process cheaply.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engram.errors import EngramError, UsageError
from engram.graph import EngineConfig
from engram.oplog.writer import DURABILITY_MODES
from engram.server.app import DEFAULT_MAX_BODY, DEFAULT_READ_TIMEOUT, TLS, serve


def read_token(
    token_file: Path | None, env: str = "ENGRAM_TOKEN", option: str = "--token-file"
) -> str | None:
    """The token from ``token_file`` (stripped), else the variable ``env``, else None."""
    if token_file is None:
        return os.environ.get(env, "").strip() or None
    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read {option} {token_file} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{option} {token_file} is not text") from None
    if not token:
        raise UsageError(f"{option} {token_file} is empty; put a secret in it")
    return token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m engram.server", description="Serve an engram data dir over HTTP."
    )
    p.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("ENGRAM_DATA_DIR", "engram-data"))
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token-file", type=Path, help="the data token (default $ENGRAM_TOKEN)")
    p.add_argument(
        "--admin-token-file",
        type=Path,
        help="the token /v1/admin routes take instead of the data token ($ENGRAM_ADMIN_TOKEN)",
    )
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate chain")
    p.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert")
    p.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT,
        help="seconds a client has to send its headers, and between pieces of its body",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback bind without a token or without TLS",
    )
    p.add_argument(
        "--backup-dir",
        type=Path,
        action="append",
        default=[],
        help="a directory the server may write backups into itself (repeatable)",
    )
    p.add_argument("--durability", choices=DURABILITY_MODES, default="sync")
    p.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="body limit in bytes")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true")
    args = p.parse_args(argv)
    try:
        serve(
            args.data_dir,
            args.host,
            args.port,
            read_token(args.token_file),
            args.insecure,
            EngineConfig(durability=args.durability),
            args.max_body,
            admin_token=read_token(
                args.admin_token_file, "ENGRAM_ADMIN_TOKEN", "--admin-token-file"
            ),
            tls=TLS.from_options(args.tls_cert, args.tls_key),
            read_timeout=args.read_timeout,
            backup_dirs=args.backup_dir,
            log_level=args.log_level,
            access_log=args.access_log,
        )
    except EngramError as e:
        print(f"engram: error: {e.message}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
