"""D's per-room and per-P state of the UCX engine (see ``transfer.ucx_decode`` for who touches what)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from transfer.base import AuxRecord
from transfer.protocol import Data, Pushed
from transfer.room import RoomState
from transfer.ucx_channel import Channel

Addr = tuple[str, int]


class HandshakeRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DecodeRoom(RoomState):
    def __init__(
        self, room: int, page_ids: list[int], addr: Addr, deadline: float, on_change: Callable[[], None] | None = None
    ) -> None:
        super().__init__(room, on_change=on_change)
        self.page_ids = page_ids  # D's pages of the whole prompt, in prompt order
        self.addr = addr
        self.deadline = deadline
        self.aux: AuxRecord | None = None
        self.pages_received = 0  # loop-only: pages landed and scattered (or scatter started, on CUDA)
        self.inflight = 0  # loop-only: pieces announced, not landed yet
        self.last_header: Data | Pushed | None = None  # loop-only: the message with the aux record, once it came
        self.finishing: Any = None  # CUDA event: Success once it fired (set on the loop, read by ``poll``)
        self.push_event: Any = None  # direct CUDA links: P's event after its latest copy into our pages
        self.exposed = False  # registered on a direct link: P may write our pages from now on (under ``lock``)
        self.draining: str | None = None  # failed by us while P may write our pages: the reason, until P answers
        self.drain_deadline = 0.0

    @property
    def alive(self) -> bool:
        """Not terminal and not draining (a draining room takes nothing more, but is not Failed yet)."""
        return not self.terminal and self.draining is None


class PrefillLink:
    def __init__(self, addr: Addr) -> None:
        self.addr = addr
        self.channel: Channel | None = None  # set once the handshake succeeded
        self.push = False  # P mapped our pool (a direct link): it writes our pages itself
        self.events: list[Any] = []  # direct CUDA links: P's interprocess events, opened here
        self.offer_pool = True  # False after P's events could not be opened here: reconnect without the offer
        self.rooms: dict[int, DecodeRoom] = {}
        self.misses = 0
        self.tasks: list[asyncio.Task[Any]] = []

    @property
    def name(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def has_live_rooms(self) -> bool:
        return any(s.alive for s in self.rooms.values())
