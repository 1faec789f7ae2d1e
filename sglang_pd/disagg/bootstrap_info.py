"""The bootstrap fields a router adds to a request so P and D can find each other (DESIGN §4.1)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROOM_MODULUS = 1 << 63


@dataclass(frozen=True)
class BootstrapInfo:
    host: str  # P's host (its bootstrap server and data endpoint)
    port: int  # P's bootstrap port
    room: int  # in [0, 2^63): names this request's handoff on both sides


def parse_bootstrap(body: dict[str, Any], count: int) -> list[BootstrapInfo | None]:
    """One BootstrapInfo per item (None when the body carries none). Raises ValueError on bad fields.

    ``bootstrap_room`` is an int or a list with one room per item. With a single int and several
    items (n > 1 choices or a batch), item k uses ``(room + k) mod 2^63``: P and D derive the same rooms.
    """
    host, port, room = body.get("bootstrap_host"), body.get("bootstrap_port"), body.get("bootstrap_room")
    if host is None and port is None and room is None:
        return [None] * count
    if not isinstance(host, str) or not host:
        raise ValueError("bootstrap_host must be a non-empty string")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError("bootstrap_port must be an integer port number")
    rooms = _rooms(room, count)
    return [BootstrapInfo(host, port, r) for r in rooms]


def _rooms(room: Any, count: int) -> list[int]:
    if isinstance(room, list):
        if len(room) != count:
            raise ValueError(f"bootstrap_room has {len(room)} entries for {count} requests")
        return [_room(r) for r in room]
    base = _room(room)
    return [(base + k) % ROOM_MODULUS for k in range(count)]


def _room(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < ROOM_MODULUS:
        raise ValueError("bootstrap_room must be an integer in [0, 2^63)")
    return value


def attach_bootstrap(items: Sequence[Any], body: dict[str, Any]) -> list[Any]:
    """Copies of ``items`` (GenerateItems) carrying the body's bootstrap fields."""
    infos = parse_bootstrap(body, len(items))
    return [dataclasses.replace(it, bootstrap=info) for it, info in zip(items, infos)]
