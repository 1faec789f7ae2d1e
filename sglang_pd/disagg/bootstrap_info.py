"""The bootstrap fields a router adds to a request so P and D can find each other (DESIGN §4.1), and who may.

With a cluster secret (README "Security") a PD worker takes bootstrap fields only together with
``bootstrap_token`` = key.sign("bootstrap", [bootstrap_host, bootstrap_port, bootstrap_room]) over exactly
the body's values, which the router adds: a client cannot name a room or make D dial a host of its own
choosing; the request is refused (403) before anything is dialed or reserved. Without a secret the fields
are taken as they come (private network only; the worker warns at startup).

Which request holds a room on this worker is ``live_rooms.LiveRooms``'s business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pd_common.cluster_auth import ClusterAuthError, ClusterKey

ROOM_MODULUS = 1 << 63
TOKEN_FIELD = "bootstrap_token"


@dataclass(frozen=True)
class BootstrapInfo:
    host: str  # P's host (its bootstrap server and data endpoint)
    port: int  # P's bootstrap port
    room: int  # in [0, 2^63): names this request's handoff on both sides


class BootstrapAuthError(ValueError):
    """Bootstrap fields without a valid ``bootstrap_token`` on a worker with a cluster secret (HTTP 403)."""

    status = 403


def bootstrap_payload(body: dict[str, Any]) -> list[Any]:
    """What ``bootstrap_token`` signs: the body's own three values, as they are."""
    return [body.get("bootstrap_host"), body.get("bootstrap_port"), body.get("bootstrap_room")]


def parse_bootstrap(body: dict[str, Any], count: int, key: ClusterKey | None = None) -> list[BootstrapInfo | None]:
    """One BootstrapInfo per item (None when the body carries none). Raises ValueError on bad fields, and
    BootstrapAuthError when ``key`` is given and the body's ``bootstrap_token`` does not sign its fields.

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
    if key is not None:
        try:
            key.verify("bootstrap", bootstrap_payload(body), body.get(TOKEN_FIELD))
        except ClusterAuthError as e:
            raise BootstrapAuthError(
                f"bootstrap fields refused: {e} ({TOKEN_FIELD} must sign bootstrap_host, "
                "bootstrap_port and bootstrap_room with the cluster secret; send requests "
                "through the router)"
            ) from e
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


def attach_bootstrap(items: Sequence[Any], body: dict[str, Any], key: ClusterKey | None = None) -> list[Any]:
    """Copies of ``items`` (GenerateItems) carrying the body's bootstrap fields.

    ``key``: the worker's ``ServerArgs.bootstrap_key()``; with one, unsigned or wrongly signed fields raise
    an HTTP 403 (APIError) naming the problem. Other bad fields raise ValueError (the caller's 400)."""
    try:
        infos = parse_bootstrap(body, len(items), key)
    except BootstrapAuthError as e:
        from sglang_pd.server.errors import APIError

        raise APIError(e.status, str(e), TOKEN_FIELD) from e
    return [dataclasses.replace(it, bootstrap=info) for it, info in zip(items, infos)]
