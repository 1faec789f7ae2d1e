"""LiveRooms: a room belongs to one request per worker at a time.

A second request naming a room this worker still holds is refused at once (HTTP 409 through the
scheduler's abort) and never shares the first one's data.
"""

from __future__ import annotations

from collections.abc import Callable

from sglang_pd.scheduler.req import Req


class LiveRooms:
    """Which request holds which room on this worker: a second live request with the same room is refused.

    A room stays taken while its request is unfinished or while the transfer engine still holds the room
    (``holds``: e.g. D's pages of an aborted request that P may still write)."""

    def __init__(self, holds: Callable[[int], bool], sweep_at: int = 4096) -> None:
        self._holds = holds
        self._rooms: dict[int, Req] = {}
        self._sweep_at = sweep_at

    def claim(self, req: Req) -> str | None:
        """Record ``req`` as its room's holder; the refusal text if another live request holds the room."""
        boot = req.bootstrap
        if boot is None:
            return None
        old = self._rooms.get(boot.room)
        if old is not None and old is not req and (not old.finished or self._holds(boot.room)):
            return (
                f"bootstrap_room {boot.room} is already in use by another request on this worker "
                "(rooms are single-use; the router draws a fresh one per request)"
            )
        if old is None and self._holds(boot.room):  # e.g. a request before this table existed
            return f"bootstrap_room {boot.room} is already in use on this worker"
        self._rooms[boot.room] = req
        if len(self._rooms) > self._sweep_at:
            self._rooms = {r: q for r, q in self._rooms.items() if not q.finished or self._holds(r)}
            self._sweep_at = max(self._sweep_at, 2 * len(self._rooms))
        return None
