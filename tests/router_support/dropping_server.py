"""A raw asyncio HTTP server that answers the first ``answered`` requests of each connection
(keep-alive), then drops the connection on the next one without a byte: an idle close that crossed
the client's request. Used to test stale-connection recovery of the router's upstream client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def dropping_server(answered: int, answer: bytes) -> AsyncIterator[tuple[str, list[int]]]:
    """Yields (base URL, requests seen per connection); ``answer`` is a whole HTTP response."""
    seen: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(seen)
        seen.append(0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                seen[index] += 1
                if seen[index] > answered:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    finally:
        server.close()
        await server.wait_closed()
