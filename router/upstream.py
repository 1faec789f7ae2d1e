"""The router's HTTP client side: one pooled aiohttp session, worker calls, their errors, and aborts.

- One ``ClientSession`` for the router's lifetime: keep-alive connections per worker, no total cap
  (admission control bounds concurrency). The client's idle keep-alive (``KEEPALIVE_S``) is
  shorter than aiohttp servers' (75 s), so the router rarely reuses a connection the worker closed.
- Stale-connection recovery: when a POST fails with "server disconnected" before any response
  header, the connection was most likely a stale keep-alive one; it is retried at once, once, on a
  fresh connection (not counted as a retry, not held against the worker).
- Every failure becomes a ``LegError`` that says what the client should see (status, message, the
  worker's own error body) and whether another worker may be tried (``retryable``).
- Aborts (``POST /abort_request``) are fire-and-forget tasks, kept in a set until done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable

import aiohttp

from router.errors import error_from_body
from router.worker import Worker

logger = logging.getLogger(__name__)
KEEPALIVE_S = 30.0
CONNECT_TIMEOUT_S = 10.0
ABORT_TIMEOUT_S = 5.0
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class LegError(Exception):
    """A worker call that did not succeed."""

    def __init__(self, status: int, message: str, *, retryable: bool, transport: bool = False,
                 body: bytes | None = None, worker: Worker | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable
        self.transport = transport  # the connection failed (vs. an answer we did not like)
        self.body = body  # the worker's own error answer, passed through verbatim when final
        self.worker = worker

    @property
    def worker_fault(self) -> bool:
        """Does this say the worker is in trouble (counts against its circuit)?"""
        return self.transport or self.status >= 500


def status_error(worker: Worker, status: int, raw: bytes) -> LegError:
    message, _ = error_from_body(status, raw)
    return LegError(status, message, retryable=status in RETRYABLE_STATUS, body=raw, worker=worker)


def transport_error(worker: Worker, e: BaseException) -> LegError:
    if isinstance(e, asyncio.TimeoutError):
        connect = isinstance(e, aiohttp.ConnectionTimeoutError)
        what = "connecting to" if connect else "waiting for"
        return LegError(504, f"timed out {what} {worker.role} worker {worker.url}", retryable=connect,
                        transport=connect, worker=worker)
    return LegError(502, f"{worker.role} worker {worker.url} failed: {e.__class__.__name__}: {e}".rstrip(": "),
                    retryable=True, transport=True, worker=worker)


class Upstream:
    def __init__(self, request_timeout_s: float, default_api_key: str | None) -> None:
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=CONNECT_TIMEOUT_S)
        self.default_api_key = default_api_key
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, auto_decompress=False,
                                              skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()

    def headers(self, worker: Worker, request_id: str | None) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        key = worker.spec.api_key or self.default_api_key
        if key:
            h["Authorization"] = f"Bearer {key}"
        if request_id:
            h["x-request-id"] = request_id
        return h

    async def post(self, worker: Worker, path: str, data: bytes, request_id: str | None) -> aiohttp.ClientResponse:
        """Send; -> the response once its headers are in (any status). LegError on transport failure."""
        headers = self.headers(worker, request_id)
        for attempt in (0, 1):
            try:
                return await self.session.post(worker.url_for(path), data=data, headers=headers)
            except aiohttp.ServerDisconnectedError as e:
                if attempt == 0:
                    logger.debug("stale connection to %s; retrying on a fresh one", worker.url)
                    continue
                raise transport_error(worker, e) from e
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                raise transport_error(worker, e) from e
        raise AssertionError("unreachable")

    async def call(self, worker: Worker, method: str, path: str, timeout_s: float,
                   body: bytes | None = None) -> tuple[int, bytes, str]:
        """A small control-plane call -> (status, body, content type). LegError on transport failure."""
        try:
            async with self.session.request(method, worker.url + path, data=body, headers=self.headers(worker, None),
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status, await resp.read(), resp.content_type
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise transport_error(worker, e) from e

    async def probe(self, worker: Worker, endpoint: str, timeout_s: float) -> str | None:
        """Health probe: None when the worker answers 200, else why not."""
        try:
            status, raw, _ = await self.call(worker, "GET", endpoint, timeout_s)
        except LegError as e:
            return e.message
        return None if status == 200 else f"{endpoint} answered {status}: {raw[:200].decode('utf-8', 'replace')}"

    def abort(self, worker: Worker, rids: Iterable[str]) -> None:
        """POST /abort_request for each rid, in the background."""
        for rid in rids:
            task = asyncio.get_running_loop().create_task(self._abort(worker, rid))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _abort(self, worker: Worker, rid: str) -> None:
        body = json.dumps({"rid": rid}).encode()
        try:
            status, raw, _ = await self.call(worker, "POST", "/abort_request", ABORT_TIMEOUT_S, body)
        except Exception as e:  # noqa: BLE001 - best effort: the worker may be the one that died
            logger.debug("abort of %s on %s failed: %s", rid, worker.url, e)
            return
        if status != 200:
            logger.debug("abort of %s on %s answered %d: %s", rid, worker.url, status, raw[:200])
