"""engram's HTTP server: ``create_app`` (the ASGI app) and ``serve`` (run it over a data dir)."""

from engram.server.app import serve
from engram.server.routes import create_app

__all__ = ["create_app", "serve"]
