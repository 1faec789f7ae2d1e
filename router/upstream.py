"""The router's HTTP client side: worker calls over the pooled keep-alive client, their errors, and aborts.

- One ``h1_client.H1Client`` for the router's lifetime: keep-alive connections per worker, no cap
  on their number (admission control bounds concurrency). Its idle keep-alive (``KEEPALIVE_S``)
  is shorter than aiohttp servers' (75 s), so the router rarely reuses a connection the worker
  closed; when it does, the client sends the request again on a fresh connection, once (not a
  retry: not counted, not held against the worker).
- The hot path (``post``) writes each request as one message from a head prefix built once per
  worker, path and API key (method, path, Host, Content-Type, Authorization), plus
  Content-Length and ``x-request-id``.
- Every failure becomes a ``LegError`` that says what the client should see (status, message, the
  worker's own error body), whether another worker may be tried (``retryable``) and whether it is
  the worker's fault (``worker_fault``: counts against its circuit breaker); ``faults`` has the rules.
- Aborts (``POST /abort_request``) are fire-and-forget tasks, kept in a set until done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable
from typing import Any

from router import faults
from router.errors import error_from_body
from router.h1_client import (
    ConnectTimeout,
    H1Client,
    Origin,
    Response,
    header_value,
    request_bytes,
)
from router.worker import Worker

logger = logging.getLogger(__name__)
KEEPALIVE_S = 30.0
CONNECT_TIMEOUT_S = 10.0
ABORT_TIMEOUT_S = 5.0
RETRYABLE_STATUS = faults.RETRYABLE_STATUS
NET_ERRORS = (OSError, TimeoutError)  # what a worker call raises when the network or the worker fails


class LegError(Exception):
    """A worker call that did not succeed."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retryable: bool,
        transport: bool = False,
        body: bytes | None = None,
        worker: Worker | None = None,
        fault: bool | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable
        self.transport = transport  # the connection failed (vs. an answer we did not like)
        self.body = body  # the worker's own error answer, passed through verbatim when final
        self.worker = worker
        self.fatal = fatal  # the worker says a process of it died: eject it at once
        # does this say the worker is in trouble (counts against its circuit)? default: transport or 5xx
        self.worker_fault = (transport or fatal or status >= 500) if fault is None else fault


def status_error(worker: Worker, status: int, raw: bytes) -> LegError:
    """A worker's non-200 answer (its own envelope in ``raw``)."""
    message, _ = error_from_body(status, raw)
    return envelope_error(worker, status, message, faults.envelope(raw), raw)


def envelope_error(
    worker: Worker, status: int, message: str, err: dict[str, Any] | None, body: bytes | None
) -> LegError:
    """A worker's error (an answer or an SSE error event), classified by ``faults``."""
    fault = not faults.blames_request(status, err)
    return LegError(
        status, message, retryable=fault and status in RETRYABLE_STATUS, body=body, worker=worker, fault=fault
    )


def died_error(worker: Worker, message: str) -> LegError:
    """The worker answered, but says a process of it died: its fault, retried elsewhere, worker ejected."""
    return LegError(
        503, f"{worker.role} worker {worker.url} failed: {message}", retryable=True, worker=worker, fatal=True
    )


def transport_error(worker: Worker, e: BaseException) -> LegError:
    if isinstance(e, TimeoutError):
        connect = isinstance(e, ConnectTimeout)
        what = "connecting to" if connect else "waiting for"
        return LegError(
            504,
            f"timed out {what} {worker.role} worker {worker.url}",
            retryable=connect,
            transport=connect,
            worker=worker,
        )
    return LegError(
        502,
        f"{worker.role} worker {worker.url} failed: {e.__class__.__name__}: {e}".rstrip(": "),
        retryable=True,
        transport=True,
        worker=worker,
    )


class Upstream:
    def __init__(self, request_timeout_s: float, default_api_key: str | None) -> None:
        self.request_timeout_s = request_timeout_s
        self.default_api_key = default_api_key
        self._client: H1Client | None = None
        self._origins: dict[str, Origin] = {}  # worker url -> where to connect
        self._heads: dict[tuple[str, str], tuple[str | None, bytes]] = {}  # (url, path) -> (api key, head prefix)
        self._background: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> H1Client:
        assert self._client is not None, "Upstream.start() was not awaited"
        return self._client

    async def start(self) -> None:
        self._client = H1Client(KEEPALIVE_S, CONNECT_TIMEOUT_S)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            self._client.close()

    def forget(self, url: str) -> None:
        """A worker left: close its idle connections and drop what was cached for it."""
        origin = self._origins.pop(url, None)
        if origin is not None and self._client is not None:
            self._client.forget(origin)
        for key in [k for k in self._heads if k[0] == url]:
            del self._heads[key]

    def origin(self, worker: Worker) -> Origin:
        origin = self._origins.get(worker.url)
        if origin is None:
            origin = self._origins[worker.url] = Origin.of(worker.url)
        return origin

    def headers(self, worker: Worker, request_id: str | None, body: bool = True) -> dict[str, str]:
        h = {"Content-Type": "application/json"} if body else {}
        key = worker.spec.api_key or self.default_api_key
        if key:
            h["Authorization"] = f"Bearer {key}"
        if request_id:
            h["x-request-id"] = request_id
        return h

    def _head_prefix(self, worker: Worker, path: str) -> bytes:
        """POST ``path`` to ``worker``: the request head up to Content-Length (cached; rebuilt on a new key)."""
        key = worker.spec.api_key or self.default_api_key
        cached = self._heads.get((worker.url, path))
        if cached is not None and cached[0] == key:
            return cached[1]
        head = request_bytes(self.origin(worker), "POST", path, self.headers(worker, None), None)
        prefix = head[: head.rindex(b"Content-Length:")]
        self._heads[(worker.url, path)] = (key, prefix)
        return prefix

    async def post(self, worker: Worker, path: str, data: bytes, request_id: str | None) -> Response:
        """Send; -> the response once its head is in (any status). LegError on transport failure."""
        rid = f"x-request-id: {header_value(request_id)}\r\n".encode("utf-8", "surrogateescape") if request_id else b""
        message = b"%sContent-Length: %d\r\n%s\r\n%s" % (self._head_prefix(worker, path), len(data), rid, data)
        try:
            return await self.client.request(self.origin(worker), message, self.request_timeout_s)
        except NET_ERRORS as e:
            raise transport_error(worker, e) from e

    async def call(
        self, worker: Worker, method: str, path: str, timeout_s: float, body: bytes | None = None
    ) -> tuple[int, bytes, str]:
        """A small control-plane call -> (status, body, content type). LegError on transport failure."""
        origin = self.origin(worker)
        message = request_bytes(origin, method, path, self.headers(worker, None, body is not None), body)
        try:
            resp = await self.client.request(origin, message, timeout_s, head_request=method == "HEAD")
            return resp.status, await resp.read(), resp.content_type
        except NET_ERRORS as e:
            raise transport_error(worker, e) from e

    async def probe(self, worker: Worker, endpoint: str, timeout_s: float) -> faults.ProbeFailure | None:
        """Health probe: None when the worker answers 200, else why not (fatal: a process of it died)."""
        try:
            status, raw, _ = await self.call(worker, "GET", endpoint, timeout_s)
        except LegError as e:
            return faults.ProbeFailure(e.message)
        return None if status == 200 else faults.probe_failure(endpoint, status, raw)

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
