"""UcxEngineBase: what the UCX prefill and decode engines share.

Threads: the scheduler thread calls the public methods (never blocking on the network); the shared
UcxRuntime loop thread runs every UCX operation, the bootstrap server/client and the timeout
sweeper; a ThreadPoolExecutor of ``thread_pool_size`` threads runs pack/unpack (and waits on
``ready_event``), so the loop never blocks on a copy. On CUDA, pack/unpack run on the engine's own
side stream and are synchronized before the room lock is released: a finished pack/unpack is a
finished read/write of the pages, whatever stream the scheduler uses next.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import torch

from transfer.base import EngineDescription, TransferStats
from transfer.config import TransferConfig
from transfer.pack import pack_pages, unpack_pages
from transfer.room import RoomState, RoomTable
from transfer.staging import StagingPool
from transfer.ucx_runtime import UcxRuntime

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=RoomState)
T = TypeVar("T")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0  # UCX endpoint creation + handshake answer


def sweep_period(config: TransferConfig) -> float:
    """How often timeouts are checked: a small fraction of the shortest timeout, within [20 ms, 500 ms]."""
    shortest = min(config.bootstrap_timeout, config.waiting_timeout, config.heartbeat_interval)
    return min(0.5, max(0.02, shortest / 20))


class UcxEngineBase(Generic[R]):
    role = "?"

    def __init__(self, kv_buffer: torch.Tensor, desc: EngineDescription, config: TransferConfig) -> None:
        self.kv = kv_buffer
        self.desc = desc
        self.config = config
        self.engine_id = f"{self.role}-{uuid.uuid4().hex[:12]}"
        self.rooms: RoomTable[R] = RoomTable()
        self._runtime: UcxRuntime | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._staging: StagingPool | None = None
        self._stream = torch.cuda.Stream(kv_buffer.device) if kv_buffer.device.type == "cuda" else None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # --- life cycle ---------------------------------------------------------------------------

    def _start_runtime(self, astart: Callable[[], Coroutine[Any, Any, None]],
                       aclose: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._runtime is not None:
            raise RuntimeError(f"{self.engine_id} already started")
        self._runtime = UcxRuntime.acquire()
        self._executor = ThreadPoolExecutor(self.config.thread_pool_size, thread_name_prefix=f"transfer-{self.role}",
                                            initializer=self._bind_device)
        try:
            self._runtime.run(self._astart_common(astart), timeout=START_TIMEOUT_S)
        except BaseException:
            self._closing = True
            try:  # undo what did start (listener, server, sweeper) before giving the runtime back
                self._runtime.run(self._aclose_common(aclose), timeout=STOP_TIMEOUT_S)
            finally:
                self._stop_runtime()
            raise

    def _bind_device(self) -> None:
        """Make the KV's GPU current in this thread (UCX and torch default to GPU 0 otherwise)."""
        if self.kv.device.type == "cuda":
            torch.cuda.set_device(self.kv.device)

    async def _astart_common(self, astart: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._bind_device()
        self._staging = StagingPool(self.config.queue_size, self.kv.device)
        self.spawn(self._sweeper())
        await astart()

    def _shutdown_common(self, aclose: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._runtime is None or self._closing:
            return
        self._closing = True
        for state in self.rooms.snapshot():
            state.fail(f"{self.role} transfer engine shut down")
        try:
            self._runtime.run(self._aclose_common(aclose), timeout=STOP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - shutdown goes on regardless
            logger.warning("%s: shutdown did not finish cleanly: %s", self.engine_id, e)
        self._stop_runtime()

    async def _aclose_common(self, aclose: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await asyncio.wait_for(aclose(), STOP_TIMEOUT_S * 0.6)
        finally:
            current = asyncio.current_task()
            pending = [t for t in self._tasks if t is not current and not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=STOP_TIMEOUT_S * 0.2)

    def _stop_runtime(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=False, cancel_futures=True)
            deadline = time.monotonic() + STOP_TIMEOUT_S * 0.4  # a copy stuck on a ready_event must not hang us
            for thread in list(getattr(executor, "_threads", ())):
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    logger.warning("%s: transfer worker thread %s still busy at shutdown", self.engine_id, thread.name)
        if self._runtime is not None:
            runtime, self._runtime = self._runtime, None
            runtime.release()

    @property
    def runtime(self) -> UcxRuntime:
        if self._runtime is None:
            raise RuntimeError(f"{self.engine_id} is not started")
        return self._runtime

    # --- loop helpers (loop thread unless stated) ------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._closing:
            logger.error("%s: background task failed", self.engine_id, exc_info=task.exception())

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """From any thread: run ``fn(*args)`` on the loop (dropped once shutting down)."""
        if self._runtime is not None and not self._closing:
            self._runtime.call_soon(fn, *args)

    def spawn_soon(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """From any thread: start the coroutine ``make()`` on the loop."""
        self.call_soon(lambda: self.spawn(make()))

    async def in_executor(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def staging(self) -> StagingPool:
        assert self._staging is not None
        return self._staging

    async def _sweeper(self) -> None:
        period = sweep_period(self.config)
        while True:
            await asyncio.sleep(period)
            try:
                self.check_timeouts(time.monotonic())
            except Exception:
                logger.exception("%s: timeout sweep failed", self.engine_id)

    def check_timeouts(self, now: float) -> None:
        raise NotImplementedError

    # --- pages (executor threads) ------------------------------------------------------------------

    def pack_locked(self, state: RoomState, page_ids: Sequence[int] | torch.Tensor, out: torch.Tensor) -> bool:
        """Pack under the room lock unless the room is dead; False if it was (nothing read)."""
        with state.lock:
            if not state.alive:
                return False
            self._on_device(lambda: pack_pages(self.kv, page_ids, out))
            return True

    def unpack_locked(self, state: RoomState, page_ids: Sequence[int] | torch.Tensor, staging: torch.Tensor) -> bool:
        """Scatter under the room lock unless the room is dead; False if it was (nothing written)."""
        with state.lock:
            if not state.alive:
                return False
            self._on_device(lambda: unpack_pages(self.kv, page_ids, staging))
            return True

    def _on_device(self, fn: Callable[[], Any]) -> None:
        if self._stream is None:
            fn()
            return
        with torch.cuda.stream(self._stream):
            fn()
        self._stream.synchronize()

    # --- shared public helpers ----------------------------------------------------------------------

    def _stats(self, room: int) -> TransferStats:
        state = self.rooms.get(room)
        return state.stats() if state is not None else TransferStats()


async def settle(aws: Sequence[Awaitable[Any]]) -> None:
    """Wait for all, ignoring their outcomes."""
    if aws:
        await asyncio.gather(*aws, return_exceptions=True)
