"""The baseline of issue 2: plain SQLite (WAL, synchronous=FULL), one transaction per write,
behind the same HTTP stack as engram (uvicorn + httptools + uvloop, bare ASGI).

    python bench/baseline_server.py --db PATH --port P

``POST /v1/memories {"content": ...}`` inserts one row in its own transaction (BEGIN IMMEDIATE,
INSERT, COMMIT: one WAL fsync per write) and answers 201 ``{"id"}`` after the commit. SQLite
has a single writer, so the writes run on one worker thread while the event loop keeps parsing
requests; the table is plain (no full-text index), which favours the baseline. ``GET /health``
answers 200. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import uvicorn

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


class BaselineApp:
    def __init__(self, db: str) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS memories (id TEXT PRIMARY KEY, content TEXT NOT NULL, "
            "strength REAL NOT NULL, metadata TEXT NOT NULL, created_at INTEGER NOT NULL)"
        )
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")

    def insert(self, mid: str, content: str, strength: float) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        c.execute(
            "INSERT INTO memories VALUES (?, ?, ?, '{}', ?)",
            (mid, content, strength, time.time_ns()),
        )
        c.execute("COMMIT")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await _reply(send, 200, {"status": "live"})
            return
        if scope["method"] != "POST" or scope["path"] != "/v1/memories":
            await _reply(send, 404, {"error": "not_found"})
            return
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = _dec.decode(b"".join(chunks))
        mid = body.get("id") or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self.pool, self.insert, mid, body["content"], float(body.get("strength", 0.5))
        )
        await _reply(send, 201, {"id": mid})


async def _reply(send: Any, status: int, body: Any) -> None:
    data = _enc.encode(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--db", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    uvicorn.run(
        BaselineApp(args.db),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        backlog=2048,
    )


if __name__ == "__main__":
    main()
