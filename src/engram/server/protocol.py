"""uvicorn's HTTP protocol with a read timeout: no connection holds the server by sending slowly.

uvicorn's own ``timeout_keep_alive`` only closes a connection that is idle *between* requests.
A client that connects and sends nothing, or sends its request line, headers or body a byte at a
time, would hold a socket, a protocol object and (for a body) an ASGI task forever. This protocol
closes such a connection:

- the request line and headers must be complete within ``read_timeout`` seconds of the
  connection (or, on a kept-alive connection, of the request's first byte), however they trickle;
- while a body is being read, each piece of it must arrive within ``read_timeout`` seconds of the
  previous one. Time during which the server itself stopped reading (uvicorn pauses the socket
  while the application has not taken the body it buffered) does not count against the client.

Between requests, uvicorn's ``timeout_keep_alive`` applies as before. With TLS the protocol
starts once the handshake is done; the handshake itself is bounded by the event loop's own
limit (60 s), which uvicorn does not let a caller change.
The application never sees a timeout: to it the client disconnected (``http.disconnect``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_READ_TIMEOUT = 30.0


class ReadTimeoutProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that closes a connection whose request does not arrive in time."""

    read_timeout: float = DEFAULT_READ_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._in_body = False  # between the end of the headers and the end of the message

    @classmethod
    def with_timeout(cls, seconds: float) -> type[ReadTimeoutProtocol]:
        """A subclass bound to ``seconds`` (uvicorn builds protocols from a class, not a value)."""
        return type(cls.__name__, (cls,), {"read_timeout": float(seconds)})

    # -- the timer -------------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._in_body and self.flow is not None and self.flow.read_paused:
            # The server stopped reading, not the client: wait until it reads again.
            self._arm()
            return
        self.transport.close()

    # -- protocol hooks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request's line and headers are due within the timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_body and self._read_timer is not None:
            self._arm()  # the body made progress: the next piece is due within the timeout

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_body = False
        if self._read_timer is None:
            self._arm()  # a request on a kept-alive connection: its headers are due in time

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._in_body = True
        self._arm()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body = False
        self._disarm()
