"""uvicorn's httptools protocol, sending a response's head and the start of its body together.

uvicorn writes a response's status line and headers as soon as the app sends
`http.response.start`, and its body at `http.response.body`: two system calls and two TCP
segments for every answer, each paid again by the client that reads them. Here the head waits
for the body's first write and both leave in one, joined (as aiohttp does since
aio-libs/aiohttp#10991; joined, because uvloop sends two buffers through a slower path than one:
`perf/README.md`, "Session 10"). Nothing waits longer than its response: a head with
no body to follow (HEAD, 204, a 304) leaves when the response completes, and one whose app
fails before its body leaves as the connection closes.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_INTERIM = b"HTTP/1.1 1"
"""`100 Continue` and the like answer no request of their own: they leave at once."""


class _HeadHoldingTransport:
    """The connection's transport, holding each response's head until its body is written."""

    __slots__ = ("_expecting_head", "_head", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._expecting_head = True
        """The next write starts a response (the head of the first, or of the one after)."""

    def write(self, data: bytes) -> None:
        if self._head is not None:
            self.flush(data)
        elif self._expecting_head and not data.startswith(_INTERIM):
            self._expecting_head = False
            self._head = data
        else:
            self._transport.write(data)

    def response_complete(self) -> None:
        """Send a head still held (its response had no body), and expect the next one."""
        self.flush()
        self._expecting_head = True

    def flush(self, body: bytes = b"") -> None:
        """Send the head held, if any, with `body` (of any bytes-like type) in one write."""
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(b"".join((head, body)) if body else head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` over a `_HeadHoldingTransport`: one write a response."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, _HeadHoldingTransport(transport)))

    def on_response_complete(self) -> None:
        cast(_HeadHoldingTransport, self.transport).response_complete()
        super().on_response_complete()
