"""UcxEngineBase: what the UCX prefill and decode engines share.

Threads: the scheduler thread calls the public methods (never blocking on the network); the shared
UcxRuntime loop thread runs every UCX operation, the protocol, the bootstrap server/client and the
timeout sweeper. Copies are launched where the data is ready, with no thread hop: P gathers a piece on
the scheduler's thread inside ``send`` (or on the loop when no staging slot was free), D scatters on the
loop as soon as a piece has landed. On CUDA both are one kernel on the engine's own stream (ordered after
the forward by ``ready_event``), never a host wait: each records a CUDA event, and whoever needs the copy
finished waits for that event: the loop only when it has not fired yet, and then in one of the
``thread_pool_size`` worker threads, so the loop never blocks on the GPU. On a direct link P's copy into
D's mapped pool (ucx_push.py) is one such kernel too, in place of gather, send and scatter. On CPU the
copies are synchronous torch copies. An event that has fired means the copy is complete for every later reader,
whatever stream it uses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import torch

from transfer.base import EngineDescription, TransferStats
from transfer.config import TransferConfig
from transfer.hosts import net_devices_for
from transfer.pack import PageIds, pack_pages, unpack_pages, wait_ready
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

    def __init__(
        self, kv_buffer: torch.Tensor, desc: EngineDescription, config: TransferConfig, data_host: str | None = None
    ) -> None:
        self.kv = kv_buffer
        # UCX's network devices: the one(s) holding ``data_host`` (None or a wildcard: every device; hosts.py)
        self.net_devices = net_devices_for(data_host) if data_host is not None else None
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
        self._wakeup = _eventfd()  # readable after any room's status changed (``wakeup_fd``); None: no eventfd

    # --- life cycle ---------------------------------------------------------------------------

    def _start_runtime(
        self, astart: Callable[[], Coroutine[Any, Any, None]], aclose: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        if self._runtime is not None:
            raise RuntimeError(f"{self.engine_id} already started")
        self._runtime = UcxRuntime.acquire(self.kv.device, self.net_devices)
        self._executor = ThreadPoolExecutor(
            self.config.thread_pool_size, thread_name_prefix=f"transfer-{self.role}", initializer=self._bind_device
        )
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
        self._staging = StagingPool(self.config.queue_size, self.kv.device, self.wait_event)
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
        fd, self._wakeup = self._wakeup, None  # no thread of ours is left to write it
        if fd is not None:
            os.close(fd)

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

    async def wait_event(self, event: Any) -> None:
        """Loop: until the CUDA ``event`` fired (at once if it has; else a worker thread waits, not the loop)."""
        if event is not None and not event.query():
            await self.in_executor(event.synchronize)

    # --- pages (under the room lock; never a host wait on the GPU) ------------------------------------------

    def launch_pack(self, state: RoomState, page_ids: PageIds, out: torch.Tensor, ready_event: Any) -> tuple[bool, Any]:
        """Start gathering ``page_ids`` into ``out`` after ``ready_event`` unless the room is dead.

        (False, None) if it was (nothing read); else (True, CUDA event after the gather, or None on CPU
        where the gather is done on return). Any thread.
        """
        with state.lock:
            if not state.alive:
                return False, None
            if self._stream is None:
                wait_ready(ready_event)
                pack_pages(self.kv, page_ids, out)
                return True, None
            with torch.cuda.device(self.kv.device), torch.cuda.stream(self._stream):
                if isinstance(ready_event, torch.cuda.Event):
                    self._stream.wait_event(ready_event)
                else:
                    wait_ready(ready_event)
                pack_pages(self.kv, page_ids, out)
                return True, _record(self._stream)

    def launch_unpack(self, state: RoomState, page_ids: PageIds, staging: torch.Tensor) -> tuple[bool, Any]:
        """Start scattering ``staging`` into ``page_ids`` unless the room is dead; like ``launch_pack``.

        On CUDA the event also becomes the room's ``gpu_work`` (what ``fail`` waits for). Loop thread.
        """
        with state.lock:
            if not state.alive:
                return False, None
            if self._stream is None:
                unpack_pages(self.kv, page_ids, staging)
                return True, None
            with torch.cuda.device(self.kv.device), torch.cuda.stream(self._stream):
                unpack_pages(self.kv, page_ids, staging)
                state.gpu_work = _record(self._stream)
                return True, state.gpu_work

    async def until_ready(self, ready_event: Any) -> None:
        """Loop: until the forward that wrote the pages finished (CUDA event, or anything ``wait_ready`` takes)."""
        if isinstance(ready_event, torch.cuda.Event):
            await self.wait_event(ready_event)
        elif ready_event is not None:
            await self.in_executor(wait_ready, ready_event)

    # --- shared public helpers ----------------------------------------------------------------------

    def wakeup_fd(self) -> int | None:
        return self._wakeup

    def _notify(self) -> None:
        """Any thread: a room's status changed; wake whoever polls ``wakeup_fd``."""
        fd = self._wakeup
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:  # the counter is full (nobody reads): the fd is readable anyway
                pass

    def _stats(self, room: int) -> TransferStats:
        state = self.rooms.get(room)
        return state.stats() if state is not None else TransferStats()


def _eventfd() -> int | None:
    try:
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux: the scheduler polls on its own timer
        return None


def _record(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event
