"""UcxDecodeTransfer: D's side of the UCX engine (one cached link per P, heartbeats, receive-and-scatter).

Room clock: ``waiting_timeout`` runs from ``register`` until Success, whatever the stage.
Link to a P (keyed by its bootstrap host:port, loop-only): connect = GET /route, create the UCX
endpoint to P's worker address, Hello with a fresh link id (it names the link's tags), our worker address
and, with a cluster secret, a ``link`` token over all of it -> HelloOk | HelloRefused. A P whose route
says ``auth`` refuses unsigned links, so a D without the secret fails such rooms at once, naming the cause.
A room is registered once per engine: ``register`` of a room this engine still holds raises RoomInUse
(the scheduler refuses such a request before it gets here). Then every room of that P is registered on the one endpoint
and a receive loop dispatches P's messages. Connection attempts and heartbeats (GET /health every
``heartbeat_interval`` while the link has live rooms) share one miss counter; at
``heartbeat_max_failure`` consecutive misses, an endpoint error, or a refused handshake, every room of
the link fails with the reason and the link is dropped (the next ``register`` builds a new one).
Receiving (data pieces, or P's direct copies into our pool) is PageReceiver's (ucx_receive.py).
Direct links (we offer our pool in Hello; P mapped it): P may write a room's pages from its registration
on. A room we fail ourselves (abort, timeout, bad message) then *drains*: P is told, and the room turns
Failed only when P answers (AbortAck, Fail or Abort: P sends them after its copies of the room finished),
when the link drops (P's process, and its queued copies, are gone), or after heartbeat interval x max
failures. So Failed still means: nothing writes the room's pages any more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from pd_common.cluster_auth import ClusterKey
from transfer.base import (
    AuxRecord,
    DecodeTransfer,
    EngineDescription,
    KVPoll,
    TransferStats,
)
from transfer.bootstrap import BootstrapClient
from transfer.config import TransferConfig
from transfer.event_watch import EventWatcher
from transfer.ipc_events import open_events
from transfer.peer_pool import PeerPoolError, export_pool
from transfer.protocol import (
    Abort,
    AbortAck,
    Close,
    Data,
    Fail,
    Hello,
    HelloOk,
    HelloRefused,
    Message,
    Pushed,
    Register,
    Registered,
    hello_payload,
)
from transfer.room import RoomInUse, unknown_room
from transfer.ucx_channel import Channel, connect
from transfer.ucx_decode_state import Addr, DecodeRoom, HandshakeRefused, PrefillLink
from transfer.ucx_engine import CONNECT_TIMEOUT_S
from transfer.ucx_receive import PageReceiver

logger = logging.getLogger(__name__)


class UcxDecodeTransfer(PageReceiver, DecodeTransfer):
    role = "decode"

    def __init__(
        self,
        kv_buffer: torch.Tensor,
        desc: EngineDescription,
        config: TransferConfig,
        data_host: str | None = None,
        cluster_key: ClusterKey | None = None,
    ) -> None:
        super().__init__(kv_buffer, desc, config, data_host)
        self._key = cluster_key
        self._links: dict[Addr, PrefillLink] = {}
        self._client = BootstrapClient()
        self._offer: dict[str, Any] | None = None  # our pool, offered to P for direct copies (peer_pool.py)
        self.push_watcher = EventWatcher(f"{self.engine_id}-copies")  # P's copy events (CUDA direct links)

    # --- scheduler thread -------------------------------------------------------------------------

    def start(self) -> None:
        if self.config.direct_copy:
            try:
                self._offer = export_pool(self.kv).to_dict()
            except PeerPoolError as e:
                logger.info(
                    "%s: KV pool not offered for direct copies (%s): KV comes as UCX data messages", self.engine_id, e
                )
        self._start_runtime(self._astart, self._aclose)

    async def _astart(self) -> None:
        pass

    def register(self, room: int, bootstrap_host: str, bootstrap_port: int, page_ids: Sequence[int]) -> None:
        ids = page_ids.tolist() if isinstance(page_ids, torch.Tensor) else list(page_ids)
        state = DecodeRoom(
            room,
            ids,
            (bootstrap_host, int(bootstrap_port)),
            time.monotonic() + self.config.waiting_timeout,
            self._notify,
        )
        _, created = self.rooms.get_or_create(room, lambda: state)
        if not created:  # never touch the holder's state: its pages and data are its own
            raise RoomInUse(room)
        self.call_soon(self._attach, state)

    def holds(self, room: int) -> bool:
        return self.rooms.get(room) is not None

    def poll(self, room: int) -> KVPoll:
        state = self.rooms.get(room)
        if state is None:
            return KVPoll.Failed
        finishing = state.finishing
        if finishing is not None and state.alive and finishing.query():
            self._succeed(state)
        if state.alive and time.monotonic() > state.deadline:
            self._fail_room(state, self._timeout_text(state), Fail)
        return state.status

    def aux(self, room: int) -> AuxRecord | None:
        state = self.rooms.get(room)
        return state.aux if state is not None and state.status == KVPoll.Success else None

    def abort(self, room: int, message: str) -> None:
        """Fail the room; on a direct link it may drain first (``poll`` shows Failed once nothing writes its pages)."""
        state = self.rooms.get(room)
        if state is not None:
            self._fail_room(state, message, Abort)

    def failure(self, room: int) -> str | None:
        state = self.rooms.get(room)
        if state is None:
            return unknown_room(room)
        return state.reason if state.status == KVPoll.Failed else None

    def stats(self, room: int) -> TransferStats:
        return self._stats(room)

    def release(self, room: int) -> None:
        state = self.rooms.pop(room)
        if state is None:
            return
        self._fail_room(state, "released by the decode scheduler before the transfer finished", Abort)
        self.call_soon(self._forget, state)

    def shutdown(self) -> None:
        self._shutdown_common(self._aclose)
        self.push_watcher.close()

    # --- rooms (any thread) -----------------------------------------------------------------------

    def _fail_room(self, state: DecodeRoom, reason: str, tell: type[Fail | Abort] | None) -> None:
        """Fail the room (waits for its queued scatters: afterwards nothing writes its pages); ``tell`` P.

        A room P may be writing (direct link) drains instead until P answers (``tell`` None: P's answer,
        or P is gone); it then fails with the reason it began draining for."""
        if tell is not None and self._drain(state, reason, tell):
            return
        reason = state.draining or reason
        if not state.fail(reason):
            return
        logger.info("%s: room %d failed: %s", self.engine_id, state.room, reason)
        if tell is not None:
            self.call_soon(self._tell_prefill, state, tell(state.room, reason))

    def _drain(self, state: DecodeRoom, reason: str, tell: type[Fail | Abort]) -> bool:
        """Start draining the room if P may be writing its pages; True if it is draining now."""
        with state.lock:
            if state.draining is not None:
                return True
            if state.terminal or not state.exposed:
                return False
            state.draining = reason
            state.drain_deadline = time.monotonic() + self._drain_timeout
        logger.info("%s: room %d failing once prefill stops writing its pages: %s", self.engine_id, state.room, reason)
        self.call_soon(self._tell_prefill, state, tell(state.room, reason))
        return True

    @property
    def _drain_timeout(self) -> float:
        """How long a draining room waits for P's answer: as long as we wait before declaring P dead."""
        return self.config.heartbeat_interval * self.config.heartbeat_max_failure

    def _timeout_text(self, state: DecodeRoom) -> str:
        return (
            f"KV transfer timed out: room {state.room} got no complete KV from prefill {state.addr[0]}:"
            f"{state.addr[1]} within {self.config.waiting_timeout:g}s (SGLANG_DISAGGREGATION_WAITING_TIMEOUT)"
        )

    def check_timeouts(self, now: float) -> None:
        for state in self.rooms.snapshot():
            if state.alive and now > state.deadline:
                self._fail_room(state, self._timeout_text(state), Fail)
            elif state.draining is not None and not state.terminal and now > state.drain_deadline:
                logger.warning(
                    "%s: room %d: prefill did not answer within %gs; failing it anyway",
                    self.engine_id,
                    state.room,
                    self._drain_timeout,
                )
                self._fail_room(state, state.draining, None)

    # --- loop: links ------------------------------------------------------------------------------

    def _attach(self, state: DecodeRoom) -> None:
        if not state.alive:
            return
        link = self._links.get(state.addr)
        if link is None:
            link = self._links[state.addr] = PrefillLink(state.addr)
            link.tasks = [self.spawn(self._run_link(link)), self.spawn(self._heartbeat(link))]
        link.rooms[state.room] = state
        if link.channel is not None:
            self._register(link, state)

    def _forget(self, state: DecodeRoom) -> None:
        link = self._links.get(state.addr)
        if link is not None and link.rooms.get(state.room) is state:
            del link.rooms[state.room]

    def _tell_prefill(self, state: DecodeRoom, msg: Message) -> None:
        link = self._links.get(state.addr)
        if link is not None and link.channel is not None and link.rooms.get(state.room) is state:
            self._post(link, msg)

    def _register(self, link: PrefillLink, state: DecodeRoom) -> None:
        with state.lock:  # vs. a failure on the scheduler's thread: it sees ``exposed`` or we see it dead
            if not state.alive:
                return
            state.exposed = link.push
            self._post(link, Register(state.room, len(state.page_ids), state.page_ids if link.push else None))

    def _post(self, link: PrefillLink, msg: Message) -> None:
        """Send a control message, not waiting for it (loop); a broken link is reported by its receive loop."""
        if link.channel is None:
            return
        try:
            link.channel.post_nowait(msg)
        except ConnectionError as e:
            logger.debug("%s: could not send %s to %s: %s", self.engine_id, type(msg).__name__, link.name, e)

    def _drop_link(self, link: PrefillLink, reason: str) -> None:
        """Fail every room of the link with ``reason`` and forget the link (loop)."""
        if self._links.get(link.addr) is link:
            del self._links[link.addr]
        live = [s for s in link.rooms.values() if not s.terminal]  # draining ones too: P is gone
        if not self._closing:
            logger.log(
                logging.WARNING if live else logging.INFO,
                "%s: %s (%d live rooms failed)",
                self.engine_id,
                reason,
                len(live),
            )
        for state in live:
            self._fail_room(state, reason, None)
        link.rooms.clear()
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
        if link.channel is not None:
            channel, link.channel = link.channel, None
            self.spawn(channel.close())

    def _unreachable(self, link: PrefillLink, detail: str) -> str:
        return (
            f"prefill server {link.name} unreachable: {link.misses} consecutive failed probes "
            f"every {self.config.heartbeat_interval:g}s ({detail})"
        )

    async def _run_link(self, link: PrefillLink) -> None:
        while True:
            try:
                link.channel = await self._connect(link)
                break
            except HandshakeRefused as e:
                self._drop_link(link, e.reason)
                return
            except Exception as e:  # noqa: BLE001 - counted as a missed heartbeat, then retried
                link.misses += 1
                if link.misses >= self.config.heartbeat_max_failure:
                    self._drop_link(link, self._unreachable(link, f"{type(e).__name__}: {e}"))
                    return
                await asyncio.sleep(self.config.heartbeat_interval)
        link.misses = 0
        for state in list(link.rooms.values()):
            self._register(link, state)
        try:
            while True:
                msg = await link.channel.recv()
                if isinstance(msg, Data):
                    await self._on_data(link, msg)
                elif isinstance(msg, Pushed):
                    self._on_pushed(link, msg)
                elif isinstance(msg, Close):
                    raise ConnectionError(f"prefill closed the link: {msg.reason[:200]}")
                else:
                    self._on_control(link, msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any endpoint error fails the link's rooms
            self._drop_link(link, f"connection to prefill {link.name} lost ({type(e).__name__}: {e})")

    async def _connect(self, link: PrefillLink) -> Channel:
        """The handshaken channel to P; sets ``link.push`` (and its events) if P mapped our pool."""
        route = await self._client.get_route(*link.addr, timeout=CONNECT_TIMEOUT_S)
        if route.auth and self._key is None:
            raise HandshakeRefused(
                f"prefill {link.name} requires a cluster secret and this decode worker has none "
                "(--cluster-secret-file or $SGLANG_DISAGGREGATION_CLUSTER_SECRET)"
            )
        taken = {lk.channel.link_id for lk in self._links.values() if lk.channel is not None}
        try:
            channel = connect(self.runtime, route.worker_address, taken)
        except ValueError as e:
            raise ConnectionError(f"prefill {link.name}'s route: {e}") from e
        try:
            hello = Hello(
                self.desc.to_dict(),
                self.engine_id,
                self._offer if link.offer_pool else None,
                channel.link_id,
                self.runtime.worker_address,
            )
            if self._key is not None:
                hello = replace(hello, token=self._key.sign("link", hello_payload(hello)))
            await asyncio.wait_for(channel.post_hello(route.accept_id, hello), 2 * CONNECT_TIMEOUT_S)
            try:
                reply = await asyncio.wait_for(channel.recv(), CONNECT_TIMEOUT_S)
            except TimeoutError as e:
                raise ConnectionError(
                    f"prefill {link.name} did not answer our Hello within {CONNECT_TIMEOUT_S:g}s "
                    "(prefill drops links whose cluster secret differs without answering)"
                ) from e
            if isinstance(reply, HelloOk) and reply.push and self._stream is not None:
                try:
                    link.events = open_events(reply.events, self.kv.device)
                except RuntimeError as e:
                    link.offer_pool = False  # the next attempt asks for data messages
                    raise ConnectionError(
                        f"cannot open prefill's copy events ({e}); reconnecting without direct copies"
                    ) from e
        except BaseException:
            await channel.close()
            raise
        if isinstance(reply, HelloOk):
            link.push = reply.push
            logger.info(
                "%s: prefill %s: %s",
                self.engine_id,
                link.name,
                "direct copies into our KV pool" if link.push else "KV as UCX data messages",
            )
            return channel
        await channel.close()
        if isinstance(reply, HelloRefused):
            raise HandshakeRefused(reply.reason)
        raise ValueError(f"expected HelloOk, got {type(reply).__name__}")

    async def _heartbeat(self, link: PrefillLink) -> None:
        interval = self.config.heartbeat_interval
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            tick += interval
            await asyncio.sleep(max(0.0, tick - loop.time()))
            if link.channel is None or not link.has_live_rooms():
                continue  # connecting (attempts count as probes) or idle
            if await self._client.health(*link.addr, timeout=min(interval, 2.0)):
                link.misses = 0
                continue
            link.misses += 1
            if link.misses >= self.config.heartbeat_max_failure:
                self._drop_link(link, self._unreachable(link, "GET /health failed"))
                return

    # --- loop: messages from P --------------------------------------------------------------------

    def _on_control(self, link: PrefillLink, msg: Message) -> None:
        state = link.rooms.get(getattr(msg, "room", -1))
        if isinstance(msg, Registered):
            if state is not None:
                state.advance(KVPoll.WaitingForInput)
        elif isinstance(msg, (Fail, Abort, AbortAck)):  # P's copies of the room are done: its pages are ours again
            if isinstance(msg, AbortAck):  # answers our Fail/Abort: only a draining room waits for it
                if state is not None and state.draining is not None:
                    self._fail_room(state, state.draining, None)
            elif state is not None:
                reason = msg.reason if isinstance(msg, Fail) else f"aborted by prefill: {msg.reason}"
                self._fail_room(state, reason, None)  # a draining room fails with its own reason
        else:
            logger.warning("%s: unexpected %s from prefill %s", self.engine_id, type(msg).__name__, link.name)

    async def _aclose(self) -> None:
        for link in list(self._links.values()):
            for task in link.tasks:
                task.cancel()
            if link.channel is not None:
                await link.channel.close()
        self._links.clear()
        await self._client.close()
