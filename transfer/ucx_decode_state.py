"""D's per-room and per-P state of the UCX engine (see ``transfer.ucx_decode`` for who touches what)."""

from __future__ import annotations

import asyncio
from typing import Any

from transfer.base import AuxRecord
from transfer.protocol import Data
from transfer.room import RoomState
from transfer.ucx_channel import Channel

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
        self.last_header: Data | None = None  # loop-only: the header with the aux record, once it came
        self.finishing: Any = None  # CUDA event: Success once it fired (set on the loop, read by ``poll``)


class PrefillLink:
    def __init__(self, addr: Addr) -> None:
        self.addr = addr
        self.channel: Channel | None = None  # set once the handshake succeeded
        self.rooms: dict[int, DecodeRoom] = {}
        self.misses = 0
        self.tasks: list[asyncio.Task[Any]] = []

    @property
    def name(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def has_live_rooms(self) -> bool:
        return any(s.alive for s in self.rooms.values())
