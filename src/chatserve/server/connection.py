"""The HTTP connection: a bound on the time a client takes to send a request's headers.

uvicorn bounds only the idle time after a response (timeout_keep_alive): a client that sends one
header line every few seconds holds its connection for ever, and a few thousand of them hold the
server's sockets and memory. The app cannot see a request before its headers are complete, so the
bound lives in the protocol; the body's time is bounded in the app (app.py's RequestBody), which
sees the body arrive."""

from __future__ import annotations

import asyncio
import os
from typing import Optional

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ..config import ServerConfig


class HeaderTimeout:
    """Mixin over a uvicorn HTTP protocol (h11 or httptools): the connection closes when a
    request's headers have not all arrived header_timeout seconds after the connection opened or
    the previous response ended. Every uvicorn protocol calls self.app as soon as it has parsed
    a request's headers, so a call of the app is what stops the clock."""

    header_timeout: float

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: Optional[asyncio.TimerHandle] = None
        app = self.app

        async def headers_read(scope, receive, send) -> None:
            self._stop_header_timer()
            await app(scope, receive, send)

        self.app = headers_read

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_header_timer()  # for the next request on this connection

    def handle_websocket_upgrade(self, *args) -> None:
        self._stop_header_timer()  # the websocket protocol takes the connection over
        super().handle_websocket_upgrade(*args)

    def connection_lost(self, exc) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        self.transport.close()


def http_protocol(header_timeout: float, base: type = AutoHTTPProtocol) -> type:
    """uvicorn's HTTP protocol class (its `http` setting) with the header bound."""
    return type(f"HeaderTimeout{base.__name__}", (HeaderTimeout, base), {"header_timeout": header_timeout})


# For `uvicorn main:app --http chatserve.server.connection:HeaderTimeoutProtocol`: the bound from
# CHATSERVE_HEADER_TIMEOUT, else the default.
HeaderTimeoutProtocol = http_protocol(float(os.environ.get("CHATSERVE_HEADER_TIMEOUT", ServerConfig.header_timeout)))
