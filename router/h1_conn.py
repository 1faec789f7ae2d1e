"""One keep-alive HTTP/1.1 connection of the router's upstream client (an asyncio Protocol).

A connection carries one request at a time (no pipelining): ``send`` writes a whole request in one
``write``; ``head`` waits for the response head; ``read_some`` hands over the body bytes that have
arrived (b"" at the end); ``finish`` ends the exchange and says whether the connection may carry
another request. The pool (``h1_client``) owns idle connections; one caller owns a busy one.

Invariants:
- ``_parser is None`` exactly while the connection is idle; a byte arriving then is a protocol
  error and closes it (the server is not allowed to speak first).
- Failures (malformed answer, the server closing before the end, the request deadline) are
  stored once in ``_error``, close the transport and wake the caller; body bytes that arrived
  before the failure are still handed over first, so a caller forwarding whole events can do so.
- Flow control: body bytes wait in ``_chunks`` until taken; above ``HIGH_WATER`` buffered bytes
  the socket is not read until the caller catches up.
- ``closed`` turns true once and stays so; a closed connection never returns to the pool.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

from router.h1_parser import ProtocolError, ResponseHead, ResponseParser

HIGH_WATER = 256 * 1024  # buffered body bytes above which reading pauses


class Disconnected(ConnectionError):
    """The server closed the connection before its answer was complete."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response  # not one byte of the answer had arrived


class ResponseTimeout(TimeoutError):
    """The request's deadline passed before its answer was complete."""


class H1Connection(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[H1Connection], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # this exchange runs on a connection that served an earlier one
        self.idle_since = 0.0  # loop time it last went back to the pool
        self._parser: ResponseParser | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._got_bytes = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # --- the caller's side ---------------------------------------------------------------------------
    def send(self, data: bytes, deadline: float, head_request: bool = False) -> None:
        """Start an exchange: ``data`` is the whole request; it fails after loop time ``deadline``."""
        assert self._parser is None and self.transport is not None, "send() on a busy or unconnected connection"
        self._parser = ResponseParser(head_request)
        self._got_bytes = False
        self._error = None
        self._timer = self.loop.call_at(deadline, self._on_timeout)
        if self.transport.is_closing():  # the server's close is being processed: a stale connection
            self._error = Disconnected("the connection closed before the request went out", before_response=True)
            return
        self.transport.write(data)

    async def head(self) -> ResponseHead:
        parser = self._parser
        assert parser is not None
        while parser.head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return parser.head

    async def read_some(self) -> bytes:
        """The body bytes that arrived since the last call (waits for some); b"" once the body ended."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    assert self.transport is not None
                    self.transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            parser = self._parser
            if parser is None or parser.done:  # None: the exchange was finished under the reader
                return b""
            await self._wait()

    def finish(self) -> bool:
        """End the exchange; -> True when the connection may carry another request (else it is closed)."""
        self._cancel_timer()
        parser, self._parser = self._parser, None
        self._chunks.clear()
        self._buffered = 0
        reusable = (
            parser is not None
            and parser.done
            and not parser.extra
            and parser.head is not None
            and parser.head.keep_alive
            and self._error is None
            and not self.closed
        )
        if not reusable:
            self.close()
        elif self._paused:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return reusable

    def close(self) -> None:
        self._cancel_timer()
        parser = self._parser
        if parser is not None and not parser.done and self._error is None:  # a reader gets an error, not a hang
            self._error = ConnectionAbortedError("the exchange was closed before its answer was complete")
            self._wake()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    async def _wait(self) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.close()
        self._wake()

    def _on_timeout(self) -> None:
        self._timer = None
        self._fail(ResponseTimeout("no complete answer within the request timeout"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write is a whole message

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            self._fail(ProtocolError("the server sent bytes on an idle connection"))
            return
        self._got_bytes = True
        try:
            body = parser.feed(data)
        except ProtocolError as e:
            self._fail(e)
            return
        if body:
            self._chunks.append(body)
            self._buffered += len(body)
            if self._buffered > HIGH_WATER and not self._paused:
                self._paused = True
                assert self.transport is not None
                self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        parser = self._parser
        if parser is not None and not parser.done:
            try:
                parser.feed_eof()
            except ProtocolError as e:
                self._fail(Disconnected(str(e), before_response=not self._got_bytes))
            self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        parser = self._parser
        if parser is not None and not parser.done and self._error is None:
            why = f": {exc}" if exc else ""
            self._error = Disconnected(
                f"the server closed the connection before the answer was complete{why}",
                before_response=not self._got_bytes,
            )
        self._wake()
        if self._on_lost is not None:
            self._on_lost(self)
