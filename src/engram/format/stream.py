"""The backup stream: how a server sends a backup to the client that writes it
(docs/FORMAT.md "Backup stream"). Codecs only, no I/O.

    stream = magic "ENGRAMBS" | u16 version (1) | frame*
    frame  = u8 type | u32 payload length | payload

Frames: DATA (the next bytes of the archive or incremental, in order), PROGRESS (JSON
``{"done", "total"}``), RESULT (JSON: what the server wrote and how; the last frame of a
backup that succeeded) and ERROR (JSON ``{"error", "message", ...}``: an engram error's code
and message; the last frame of one that failed). A stream that ends without a RESULT or an
ERROR frame was cut off, whatever it held: the reader never takes it for a backup.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

MAGIC = b"ENGRAMBS"
VERSION = 1
CONTENT_TYPE = b"application/vnd.engram.backup-stream"
DATA, PROGRESS, RESULT, ERROR = 1, 2, 3, 4
TYPES = (DATA, PROGRESS, RESULT, ERROR)
MAX_DATA = 1 << 20  # a writer splits larger writes; a reader refuses larger frames
MAX_JSON = 1 << 20
_PREAMBLE = struct.Struct("<8sH")
_FRAME = struct.Struct("<BI")


class StreamError(ValueError):
    """The stream is not a valid backup stream (the message says how)."""


def preamble() -> bytes:
    return _PREAMBLE.pack(MAGIC, VERSION)


def frame(kind: int, payload: bytes | memoryview) -> bytes:
    return _FRAME.pack(kind, len(payload)) + bytes(payload)


def data_frames(data: bytes | memoryview) -> Iterator[bytes]:
    """``data`` as DATA frames of at most MAX_DATA bytes each."""
    mv = memoryview(data)
    for i in range(0, len(mv), MAX_DATA):
        yield frame(DATA, mv[i : i + MAX_DATA])


def json_frame(kind: int, obj: Any) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":"), allow_nan=False).encode())


class Decoder:
    """Turns the stream's bytes, fed in pieces of any size, into (type, payload) frames."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._started = False
        self.ended = False  # a RESULT or ERROR frame was read

    def feed(self, chunk: bytes) -> Iterator[tuple[int, bytes]]:
        self._buf += chunk
        if not self._started:
            if len(self._buf) < _PREAMBLE.size:
                return
            magic, version = _PREAMBLE.unpack_from(self._buf)
            if magic != MAGIC:
                raise StreamError("it does not start like a backup stream")
            if version != VERSION:
                raise StreamError(f"it is backup stream version {version}; this engram reads 1")
            del self._buf[: _PREAMBLE.size]
            self._started = True
        while len(self._buf) >= _FRAME.size:
            if self.ended:
                raise StreamError("it goes on after its last frame")
            kind, n = _FRAME.unpack_from(self._buf)
            if kind not in TYPES:
                raise StreamError(f"it holds a frame of unknown type {kind}")
            if n > (MAX_DATA if kind == DATA else MAX_JSON):
                raise StreamError(f"it holds a frame of {n} bytes, more than allowed")
            if len(self._buf) < _FRAME.size + n:
                return
            payload = bytes(self._buf[_FRAME.size : _FRAME.size + n])
            del self._buf[: _FRAME.size + n]
            if kind in (RESULT, ERROR):
                self.ended = True
            yield kind, payload

    def finish(self) -> None:
        """The stream ended: it must have ended with its last frame, and nothing after it."""
        if not self.ended:
            raise StreamError("it was cut off before its result")
        if self._buf:
            raise StreamError("it goes on after its last frame")


def decode_json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError:
        raise StreamError(f"its {what} frame is not JSON") from None
    if not isinstance(obj, dict):
        raise StreamError(f"its {what} frame is not a JSON object")
    return obj
