"""Network helpers shared by the tests (importable by name: pytest's pythonpath has tests/)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listened on a moment ago. Another process may take it
    before the caller binds it; a server that can bind port 0 itself should do that instead."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
