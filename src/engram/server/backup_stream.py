"""A backup streamed to the client that writes it (docs/FORMAT.md "Backup stream").

The server makes the cut and writes the archive (or the incremental) into a ``StreamSink``:
its bytes go out as DATA frames of the HTTP response, sent from the backup's thread through the
event loop, one frame at a time, each send waiting for uvicorn's flow control. A client that
reads slowly therefore slows the backup down (and, at priority "low", the worker behind its
pipe), and the cut stays held meanwhile. A client that goes away (``http.disconnect``) sets
``gone``: the next write fails, a worker is killed at once, and the cut is released.

The status line (200) goes out before the backup starts, so every outcome after it is a frame:
RESULT, or ERROR with the engram error's code and message. The server never names, creates or
removes a file for a streamed backup.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from engram.backup.full import BackupResult
from engram.errors import BackupError, EngramError
from engram.format import stream as bs

log = logging.getLogger("engram.server")

FLUSH_AT = 256 << 10  # bytes gathered before a DATA frame goes out
PROGRESS_EVERY = 0.25  # seconds between PROGRESS frames
Send = Callable[[dict[str, Any]], Any]
Receive = Callable[[], Any]


class ClientGone(BackupError):
    """The client went away; the backup was abandoned and nothing of it was kept."""


class StreamSink:
    """An ``archive.Sink`` whose bytes become DATA frames of the response (any thread may
    write; frames go out in the order they were made)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Send) -> None:
        self.loop = loop
        self._send_msg = send
        self.sha = hashlib.sha256()
        self.size = 0
        self.gone = threading.Event()
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._last_progress = 0.0

    def send(self, frame: bytes) -> None:
        """Send one frame and wait until uvicorn took it (backpressure); ClientGone once the
        client has gone away."""
        with self._lock:
            if self.gone.is_set():
                raise ClientGone()
            msg = {"type": "http.response.body", "body": frame, "more_body": True}
            asyncio.run_coroutine_threadsafe(self._send_msg(msg), self.loop).result()
            if self.gone.is_set():
                raise ClientGone()

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.size += len(data)
        self._buf += data
        if len(self._buf) >= FLUSH_AT:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            for f in bs.data_frames(data):
                self.send(f)

    def sync_close(self) -> None:
        self.flush()

    def close(self) -> None:
        self._buf = bytearray()

    def progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY:
            self._last_progress = now
            self.send(bs.json_frame(bs.PROGRESS, {"done": done, "total": total}))


Job = Callable[[StreamSink], BackupResult]


class BackupStream:
    """The answer of ``POST /v1/admin/backup`` without ``output``: ``respond`` runs ``job``
    (the backup into a StreamSink) in a thread and streams what it writes."""

    def __init__(self, job: Job, what: str) -> None:
        self.job = job
        self.what = what  # "full" or "incremental", for the log

    async def respond(self, send: Send, receive: Receive) -> None:
        loop = asyncio.get_running_loop()
        sink = StreamSink(loop, send)
        headers = [(b"content-type", bs.CONTENT_TYPE), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": bs.preamble(), "more_body": True})
        watcher = asyncio.ensure_future(_watch(receive, sink.gone))
        try:
            last = await loop.run_in_executor(None, self._run, sink)
        finally:
            watcher.cancel()
        if not sink.gone.is_set():
            await send({"type": "http.response.body", "body": last, "more_body": False})

    def _run(self, sink: StreamSink) -> bytes:
        """The backup, in a pool thread: its last frame (RESULT or ERROR)."""
        try:
            res = self.job(sink)
            return bs.json_frame(bs.RESULT, res.stream_result())
        except EngramError as e:
            if sink.gone.is_set():
                log.info("a streamed %s backup was abandoned: its client went away", self.what)
            return bs.json_frame(bs.ERROR, e.to_dict())
        except OSError as e:
            err = BackupError(
                f"the server failed while reading for the backup ({e.strerror or e}); "
                "check its disk and its log, then retry"
            )
            log.warning("a streamed %s backup failed: %s", self.what, e)
            return bs.json_frame(bs.ERROR, err.to_dict())
        except Exception:
            log.exception("a streamed %s backup failed", self.what)
            internal = EngramError(
                "unexpected server error during the backup; it is in the server log"
            )
            return bs.json_frame(bs.ERROR, internal.to_dict())


async def _watch(receive: Receive, gone: threading.Event) -> None:
    """Set ``gone`` when the client disconnects (the request body was read already, so the
    next message is the disconnect)."""
    while True:
        msg = await receive()
        if msg.get("type") == "http.disconnect":
            gone.set()
            return
