"""The router's HTTP/1.1 client: pooled keep-alive connections per origin, one whole request per write.

Lean on purpose (the router pays its cost on every request; aiohttp's ClientSession cost several
times more CPU per call): the caller hands over the complete request bytes (``request_bytes``) and
gets a ``Response`` once the head arrived; the body is read with ``read`` (whole) or ``async for``
(pieces as they arrive, chunked coding removed).

- Pool: idle connections per ``Origin`` on a stack (the most recently used first: the likeliest to
  be alive). A connection idle longer than ``keepalive_s`` is closed instead of reused; a sweep
  closes such connections at most every ``keepalive_s / 2``. Keep ``keepalive_s`` below the
  servers' idle timeout (aiohttp's is 75 s) so the client, not the server, ends idle connections.
- Stale-connection recovery: when a request on a reused connection fails because the server
  closed it before one byte of the answer came back (an idle close crossing our request), it is
  sent again at once, once, on a fresh connection.
- Deadline: ``timeout_s`` covers the whole exchange, connecting (at most ``connect_timeout_s``)
  and reading to the end of the body; a timeout closes the connection.
- Cancelling the caller, or ``Response.close()``, closes the connection: the server sees the
  client leave. ``Response.release()`` returns a fully read connection to the pool.
Errors: ``ConnectTimeout`` / ``h1_conn.ResponseTimeout`` (TimeoutError), ``h1_conn.Disconnected`` and
``h1_parser.ProtocolError`` (ConnectionError), and OSError from connecting.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from router.h1_conn import Disconnected, H1Connection
from router.h1_parser import ResponseHead


class ConnectTimeout(TimeoutError):
    """No connection to the server within the connect timeout."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str  # "http" or "https"
    host: str  # as connected to (no IPv6 brackets)
    port: int
    netloc: str  # as written in the Host header
    prefix: str  # the URL's path ("" or "/something"), put before every request path
    key: str  # "scheme://netloc": connections are pooled per key (a str hashes faster than this object)

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(
            parts.scheme, parts.hostname, port, parts.netloc, parts.path.rstrip("/"), f"{parts.scheme}://{parts.netloc}"
        )


def request_bytes(origin: Origin, method: str, path: str, headers: dict[str, str], body: bytes | None) -> bytes:
    """A whole HTTP/1.1 request. ValueError when the path or a header would break the message."""
    if not path.startswith("/") or any(c in path for c in " \r\n\0"):
        raise ValueError(f"bad request path {path!r}")
    lines = [f"{method} {origin.prefix}{path} HTTP/1.1", f"Host: {origin.netloc}"]
    for name, value in headers.items():
        lines.append(f"{name}: {header_value(value)}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + (body or b"")


def header_value(value: str) -> str:
    """``value`` unchanged; ValueError when it holds CR, LF or NUL (it would split the message)."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"forbidden character in header value {value[:100]!r}")
    return value


class Response:
    """An answer whose head has arrived; its body is read once, whole or in pieces."""

    __slots__ = ("_client", "_conn", "_done", "_key", "head", "status")

    def __init__(self, client: H1Client, key: str, conn: H1Connection, head: ResponseHead) -> None:
        self._client = client
        self._key = key
        self._conn = conn
        self._done = False
        self.head = head
        self.status = head.status

    @property
    def content_type(self) -> str:
        return self.head.content_type

    async def read(self) -> bytes:
        """The whole (rest of the) body; the connection goes back to the pool."""
        parts: list[bytes] = []
        async for data in self:
            parts.append(data)
        self.release()
        return b"".join(parts)

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self._conn.read_some()
        except BaseException:
            self.close()
            raise
        if not data:
            raise StopAsyncIteration
        return data

    def release(self) -> None:
        """Done with the answer: a complete one frees its connection for reuse, a partial one closes it."""
        if not self._done:
            self._done = True
            if self._conn.finish():
                self._client.put(self._key, self._conn)

    def close(self) -> None:
        """Done with the answer, whatever is left of it: the connection is closed."""
        if not self._done:
            self._done = True
            self._conn.close()
            self._conn.finish()


class H1Client:
    def __init__(self, keepalive_s: float, connect_timeout_s: float) -> None:
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[str, list[H1Connection]] = {}  # Origin.key -> idle connections, most recent last
        self._open: set[H1Connection] = set()  # every connection not yet lost, busy or idle
        self._swept_at = 0.0
        self._ssl: ssl.SSLContext | None = None

    async def request(self, origin: Origin, data: bytes, timeout_s: float, head_request: bool = False) -> Response:
        """Send ``data`` (a whole request); -> the response once its head is in."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        key = origin.key
        for fresh in (False, True):
            conn = self._take_idle(key, loop.time()) if not fresh else None
            if conn is None:
                conn = await self._connect(origin, deadline)
            conn.send(data, deadline, head_request)
            try:
                head = await conn.head()
            except Disconnected as e:
                conn.close()
                if conn.reused and e.before_response and not fresh:
                    continue  # a stale keep-alive connection: once more on a new one
                raise
            except BaseException:
                conn.close()
                raise
            return Response(self, key, conn, head)
        raise AssertionError("unreachable")

    def put(self, key: str, conn: H1Connection) -> None:
        """A finished, reusable connection goes back to the pool (``key``: its ``Origin.key``)."""
        now = conn.loop.time()
        conn.idle_since = now
        conn.reused = True
        stack = self._idle.get(key)
        if stack is None:
            stack = self._idle[key] = []
        stack.append(conn)
        if now - self._swept_at > self.keepalive_s / 2:
            self._sweep(now)

    def forget(self, origin: Origin) -> None:
        """Close the idle connections to ``origin`` (its worker left)."""
        for conn in self._idle.pop(origin.key, []):
            conn.close()

    def close(self) -> None:
        """Close every connection, busy ones included (the router is stopping)."""
        self._idle.clear()
        for conn in list(self._open):
            conn.close()

    def idle_count(self, origin: Origin) -> int:
        return sum(1 for c in self._idle.get(origin.key, ()) if not c.closed)

    def _take_idle(self, key: str, now: float) -> H1Connection | None:
        stack = self._idle.get(key)
        while stack:
            conn = stack.pop()
            transport = conn.transport
            if (
                not conn.closed
                and transport is not None
                and not transport.is_closing()
                and now - conn.idle_since < self.keepalive_s
            ):
                return conn
            conn.close()
        return None

    async def _connect(self, origin: Origin, deadline: float) -> H1Connection:
        loop = asyncio.get_running_loop()
        timeout = min(self.connect_timeout_s, deadline - loop.time())
        tls = None
        if origin.scheme == "https":
            tls = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                _, conn = await loop.create_connection(
                    lambda: H1Connection(self._lost), origin.host, origin.port, ssl=tls
                )
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {origin.netloc} within {timeout:.3g}s") from None
        self._open.add(conn)
        return conn

    def _lost(self, conn: H1Connection) -> None:
        self._open.discard(conn)

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        for key, stack in list(self._idle.items()):
            keep = []
            for c in stack:
                if not c.closed and now - c.idle_since < self.keepalive_s:
                    keep.append(c)
                else:
                    c.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
