"""UcxRuntime: the one event-loop thread per process that owns UCXX, shared by every UCX engine in the process.

Decision: UCXX keeps ONE process-global application context (one UCX worker, one progress thread),
and with Python-future notification (the only mode in which a pending receive does not spin a core:
measured 1 core busy per idle endpoint otherwise) it completes requests on the event loop that was
running when the context was created. So every UCX engine of a process (normally one; P and D
together in tests) shares this runtime: reference-counted, started by the first ``acquire`` and torn
down (UCXX reset, loop stopped, thread joined) by the last ``release``. This class-level singleton is
the only mutable global of the package, mirroring UCXX's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class UcxRuntime:
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _shared: ClassVar[UcxRuntime | None] = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._users = 0
        self._thread = threading.Thread(target=self._run_loop, name="transfer-ucx-loop", daemon=True)

    @classmethod
    def acquire(cls) -> UcxRuntime:
        with cls._lock:
            if cls._shared is None:
                runtime = UcxRuntime()
                runtime._start()
                cls._shared = runtime
            cls._shared._users += 1
            return cls._shared

    def release(self) -> None:
        with UcxRuntime._lock:
            self._users -= 1
            if self._users > 0:
                return
            UcxRuntime._shared = None
            self._stop()

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

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _start(self) -> None:
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        self._thread.start()
        self.run(_init_ucxx(), timeout=30)

    def _stop(self) -> None:
        try:
            self.run(_reset_ucxx(), timeout=10)
        except Exception as e:  # noqa: BLE001 - teardown must finish; a leaked UCX context is only logged
            logger.warning("UCXX reset failed: %s", e)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            logger.warning("transfer UCX loop thread did not stop within 5 s")
        else:
            self.loop.close()


async def _init_ucxx() -> None:
    import ucxx  # type: ignore[import-untyped]

    if ucxx.core._ctx is not None:  # someone else initialised UCXX in this process: use it as it is
        logger.warning("UCXX was already initialised in this process; KV transfer uses its context")
        return
    ucxx.init(progress_mode="thread", enable_python_future=True)
    logger.info("UCXX %s initialised (UCX %s)", ucxx.__version__, ucxx.__ucx_version__)


async def _reset_ucxx() -> None:
    import gc

    import ucxx  # type: ignore[import-untyped]

    await asyncio.sleep(0)  # let closing endpoints' callbacks run
    gc.collect()
    ucxx.reset()
