"""D's per-room and per-P state of the UCX engine (see ``transfer.ucx_decode`` for who touches what)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from transfer.base import AuxRecord
from transfer.peer_pool import PeerPool, PeerPoolError, PoolOffer, open_pool
from transfer.protocol import Data, Pages
from transfer.room import RoomState
from transfer.ucx_channel import Channel

logger = logging.getLogger(__name__)

Addr = tuple[str, int]


class HandshakeRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DecodeRoom(RoomState):
    def __init__(self, room: int, page_ids: list[int], addr: Addr, deadline: float) -> None:
        super().__init__(room)
        self.page_ids = page_ids  # D's pages of the whole prompt, in prompt order
        self.addr = addr
        self.deadline = deadline
        self.aux: AuxRecord | None = None
        self.pages_received = 0  # loop-only: pages landed and scattered (or scatter started, on CUDA)
        self.inflight = 0  # loop-only: pieces announced, not landed yet
        self.last_header: Data | Pages | None = None  # loop-only: the message with the aux record, once it came
        self.finishing: Any = None  # CUDA event: Success once it fired (set on the loop, read by ``poll``)


class PrefillLink:
    def __init__(self, addr: Addr) -> None:
        self.addr = addr
        self.channel: Channel | None = None  # set once the handshake succeeded
        self.pool: PeerPool | None = None  # P's pool mapped here (a direct link); closed when the link drops
        self.rooms: dict[int, DecodeRoom] = {}
        self.misses = 0
        self.tasks: list[asyncio.Task[Any]] = []

    @property
    def name(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def has_live_rooms(self) -> bool:
        return any(s.alive for s in self.rooms.values())

    def map_pool(self, offer: dict[str, Any] | None, kv: torch.Tensor, engine_id: str) -> PeerPool | None:
        """Map P's offered pool (HelloOk) for direct reads; None (data messages) if none or it cannot be mapped."""
        if offer is None:
            return None
        try:
            pool = open_pool(PoolOffer.from_dict(offer), kv)
        except PeerPoolError as e:
            logger.info("%s: prefill %s: KV as UCX data messages, no direct reads (%s)", engine_id, self.name, e)
            return None
        logger.info("%s: prefill %s: direct reads of its KV pool (%s)", engine_id, self.name, offer.get("kind"))
        return pool

    def close_pool(self, engine_id: str) -> None:
        """Unmap P's pool; only once every copy through it finished (the link's rooms are all terminal)."""
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                pool.close()
            except Exception as e:  # noqa: BLE001 - a mapping that will not close is logged, not fatal
                logger.warning("%s: unmapping prefill %s's pool failed: %s", engine_id, self.name, e)
