"""UcxRuntime: the one thread per process that drives UCX, shared by every UCX engine in the process.

Decision: one asyncio loop thread does all UCX work. It owns a UCX worker in blocking-progress mode,
watches the worker's event fd (``loop.add_reader``), and on every wakeup progresses the worker, completes
our requests right there (their asyncio futures resolve in the same thread) and re-arms the worker. The
engines' protocol coroutines run on the same loop. So a completion reaches the coroutine that waits on
it with no thread hop: no UCX progress thread, no Python-future notifier thread. Measured on the 2-core
dev VM, a 64-byte ping-pong between two processes: ~0.25 ms round trip, against ~1 ms with UCXX's
``thread`` progress mode + Python futures (the notifier thread hands every completion to the loop) and a
busy core with its ``blocking``/``polling`` modes (their awaits spin the loop). A timer backs up the event
fd: every ``BUSY_TICK_S`` while a request that someone waits on is in flight, every ``IDLE_TICK_S``
otherwise (50 short wakeups a second when idle).

We use UCXX's low-level bindings (``ucxx._lib.libucxx``: context, worker, endpoint, requests),
not its asyncio layer (global ApplicationContext, progress tasks, notifier thread), so nothing here
depends on ``ucxx.init``. Invariants: every UCX call happens on the loop thread; a posted request stays
referenced in ``_pending`` together with the buffer it reads or writes until it completes or is
cancelled (dropping a UCXX request object cancels the request). Reference-counted: started by the first
``acquire``, torn down by the last ``release``; this class-level singleton is the only mutable global
of the package.

No listener: peers are reached by UCX *worker address* (``worker_address``/``connect_address``), published
by P's bootstrap server. UCXX's sockaddr listener can only bind every interface (0.0.0.0), so we open none;
what listens is UCX's own TCP transport, one socket per network device of the worker, and ``acquire``'s
``net_devices`` (e.g. "lo" for a worker started with ``--host 127.0.0.1``) restricts those devices unless
the operator set ``UCX_NET_DEVICES`` (or ``--disaggregation-ib-device``) himself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TICK_S = 0.001  # asyncio timers have 1 ms resolution (epoll); the event fd is the fast path
IDLE_TICK_S = 0.02
_MAX_ROUNDS = 64  # progress/arm rounds per wakeup before other loop work gets a turn


@dataclass
class _Pending:
    req: Any  # ucxx UCXRequest
    keep: Any  # the buffer(s) the request uses: must outlive it
    urgent: bool  # someone waits on it now (data, sends); False for receives that idle for long (control)


class UcxRuntime:
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _shared: ClassVar[UcxRuntime | None] = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._users = 0
        self._thread = threading.Thread(target=self._run_loop, name="transfer-ucx-loop", daemon=True)
        self._api: Any = None  # ucxx._lib.libucxx
        self._context: Any = None
        self._worker: Any = None
        self._fd = -1
        self._pending: dict[asyncio.Future[None], _Pending] = {}
        self._tick: asyncio.TimerHandle | None = None
        self._tick_busy = False
        self.net_devices: str | None = None  # what UCX_NET_DEVICES the worker was opened with (None: UCX's default)
        self._address: bytes | None = None

    @classmethod
    def acquire(cls, device: torch.device, net_devices: str | None = None) -> UcxRuntime:
        """The process's runtime; the first caller's ``device`` is the loop thread's CUDA device (UCX's context)
        and its ``net_devices`` (UCX_NET_DEVICES syntax; None: every device) the network devices UCX may use."""
        with cls._lock:
            if cls._shared is None:
                runtime = UcxRuntime()
                runtime._start(device, net_devices)
                cls._shared = runtime
            elif net_devices != cls._shared.net_devices and cls._shared.net_devices is not None:
                logger.warning(
                    "UCX runtime already open on network devices %s; %s ignored", cls._shared.net_devices, net_devices
                )
            cls._shared._users += 1
            return cls._shared

    def release(self) -> None:
        with UcxRuntime._lock:
            self._users -= 1
            if self._users > 0:
                return
            UcxRuntime._shared = None
            self._stop()

    # --- any thread ------------------------------------------------------------------------------------

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable[T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for it (from any thread but the loop's)."""
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"UCX runtime call did not finish within {timeout}s") from None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # --- loop thread: UCX objects and requests -----------------------------------------------------------

    @property
    def api(self) -> Any:
        return self._api

    @property
    def worker_address(self) -> bytes:
        """This process's UCX worker address: what a peer needs to create an endpoint to us (any thread)."""
        if self._address is None:
            raise RuntimeError("the UCX runtime is not started: it has no worker address yet")
        return self._address

    def connect_address(self, address: bytes) -> Any:
        """A UCX endpoint (with peer-failure handling) to the worker whose address is ``address``.

        Raises ValueError on an address UCX cannot use."""
        try:
            addr = self._api.UCXAddress.create_from_buffer(np.frombuffer(bytes(address), dtype=np.uint8).copy())
            return self._api.UCXEndpoint.create_from_worker_address(self._worker, addr, True)
        except Exception as e:  # UCXX raises its own types for a bad address
            raise ValueError(f"cannot create a UCX endpoint to that worker address: {type(e).__name__}: {e}") from e

    def recv_any(self, buf: Any, tag: int, keep: Any) -> asyncio.Future[None]:
        """Receive one message with ``tag`` from any endpoint into ``buf`` (a UCXX Array); not urgent."""
        from ucxx.types import Tag  # type: ignore[import-untyped]

        return self.track(self._worker.tag_recv(buf, Tag(tag)), keep, urgent=False)

    def track(self, req: Any, keep: Any, urgent: bool = True) -> asyncio.Future[None]:
        """A future resolved (or failed with UCXX's error) when ``req`` completes; cancelling it cancels ``req``."""
        fut: asyncio.Future[None] = self.loop.create_future()
        if req.completed:
            _settle(req, fut)
            return fut
        self._pending[fut] = _Pending(req, keep, urgent)
        fut.add_done_callback(self._forget)
        if urgent and not self._tick_busy:
            self._schedule_tick(busy=True)
        return fut

    def fail(self, fut: asyncio.Future[None], error: BaseException) -> None:
        """Fail ``fut`` now and cancel its request (endpoint gone, channel closed)."""
        if not fut.done():
            fut.set_exception(error)
            fut.exception()  # retrieved: a failure nobody awaits any more is not an asyncio warning

    def _forget(self, fut: asyncio.Future[None]) -> None:
        self._pending.pop(fut, None)  # drops the request: UCXX cancels it if it is still in flight

    def _progress(self) -> None:
        worker = self._worker
        if worker is None:
            return
        for _ in range(_MAX_ROUNDS):
            while worker.progress_once():
                pass
            if self._pending:
                for fut in [f for f, p in self._pending.items() if p.req.completed]:
                    _settle(self._pending.pop(fut).req, fut)
            if worker.arm():  # False: events arrived meanwhile, progress again
                return
        self.loop.call_soon(self._progress)  # still busy: let the loop's other work run first

    def _on_tick(self) -> None:
        self._tick = None
        self._progress()
        self._schedule_tick(busy=any(p.urgent for p in self._pending.values()))

    def _schedule_tick(self, busy: bool) -> None:
        if self._tick is not None:
            self._tick.cancel()
        self._tick_busy = busy
        self._tick = self.loop.call_later(BUSY_TICK_S if busy else IDLE_TICK_S, self._on_tick)

    # --- life cycle ----------------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _start(self, device: torch.device, net_devices: str | None) -> None:
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        if os.environ.get("UCX_NET_DEVICES"):  # the operator's choice (or --disaggregation-ib-device) wins
            net_devices = None
        self.net_devices = net_devices
        self._thread.start()
        try:
            self.run(self._open(device), timeout=30)
        except BaseException:
            self._stop()
            raise

    async def _open(self, device: torch.device) -> None:
        import ucxx  # type: ignore[import-untyped]  # sets UCX_MEMTYPE_CACHE / UCX_RNDV_THRESH defaults
        from ucxx._lib import libucxx as api  # type: ignore[import-untyped]

        if device.type == "cuda":  # UCX's CUDA transports work in this thread's current context
            torch.cuda.set_device(device)
        self._api = api
        options = {"NET_DEVICES": self.net_devices} if self.net_devices else {}
        self._context = api.UCXContext(options)  # UCXX's default features, as its own asyncio layer uses them
        self._worker = api.UCXWorker(self._context, False, False)  # no delayed submission, no Python futures
        self._address = api.UCXAddress.create_from_worker(self._worker).tobytes()
        self._worker.init_blocking_progress_mode()
        self._fd = self._worker.epoll_file_descriptor
        self.loop.add_reader(self._fd, self._progress)
        self._progress()
        self._schedule_tick(busy=False)
        logger.info(
            "UCX worker ready (UCXX %s, UCX %s, network devices: %s), event-driven progress on the transfer loop",
            ucxx.__version__,
            ucxx.__ucx_version__,
            self.net_devices or os.environ.get("UCX_NET_DEVICES") or "all",
        )

    async def _close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for fut in list(self._pending):
            self.fail(fut, ConnectionError("UCX runtime shut down"))
        self._pending.clear()
        await asyncio.sleep(0)  # let callbacks of failed futures run
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
            self._fd = -1
        self._worker = None
        self._context = None
        gc.collect()  # drop endpoints/listeners still referenced by cycles before the worker goes

    def _stop(self) -> None:
        if self._thread.is_alive():
            try:
                self.run(self._close(), timeout=10)
            except Exception as e:  # noqa: BLE001 - teardown must finish; a leaked UCX worker is only logged
                logger.warning("UCX runtime teardown failed: %s", e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if self._thread.is_alive():
            logger.warning("transfer UCX loop thread did not stop within 5 s")
        else:
            self.loop.close()


def _settle(req: Any, fut: asyncio.Future[None]) -> None:
    if fut.done():
        return
    try:
        req.check_error()
    except Exception as e:  # noqa: BLE001 - UCXX raises its own exception types; the waiter gets them
        fut.set_exception(e)
        fut.exception()  # retrieved: a fire-and-forget send that failed is reported by its link, not by asyncio
    else:
        fut.set_result(None)
