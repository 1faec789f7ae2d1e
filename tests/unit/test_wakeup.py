"""Waking the scheduler when a KV transfer moves: the engine's eventfd, the scheduler's ZMQ wait on it, and the
thread that watches P's copy events on D."""

from __future__ import annotations

import os
import select
import threading
import time

import pytest
import zmq

from sglang_pd.server import ipc
from sglang_pd.server.messages import AbortReq
from transfer.event_watch import EventWatcher
from transfer.room import RoomState

pytestmark = pytest.mark.timeout(30)


def test_recv_all_returns_when_the_wakeup_fd_fires_and_drains_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = zmq.Context()
    sock = ipc.pull(ctx, f"ipc://{tmp_path / 'in'}")
    out = ipc.push(ctx, f"ipc://{tmp_path / 'in'}")
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        threading.Timer(0.05, os.eventfd_write, (fd, 1)).start()
        t0 = time.monotonic()
        assert ipc.recv_all(sock, 5000, fd) == []
        assert time.monotonic() - t0 < 2.0, "woken by the fd, not by the 5 s timeout"
        assert select.select([fd], [], [], 0)[0] == [], "the fd was drained"
        ipc.send(out, AbortReq("r1", "gone"))
        assert ipc.recv_all(sock, 5000, fd) == [AbortReq("r1", "gone")]  # messages still come through
    finally:
        os.close(fd)
        out.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def test_a_room_status_change_calls_its_engine_back() -> None:
    calls: list[int] = []
    state = RoomState(1, on_change=lambda: calls.append(1))
    from transfer.base import KVPoll

    assert state.advance(KVPoll.WaitingForInput) and calls == [1]
    assert not state.advance(KVPoll.WaitingForInput) and calls == [1]  # no change, no call
    assert state.fail("why") and calls == [1, 1]
    assert not state.fail("again") and calls == [1, 1]


class Flag:
    """An object with a CUDA event's ``query``: fires when ``set``; raises when told to."""

    def __init__(self) -> None:
        self.fired = False
        self.error: Exception | None = None

    def query(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.fired


def test_event_watcher_reports_fired_events_once_and_drops_dead_ones() -> None:
    watcher = EventWatcher("test-watch", period_s=1e-3)
    done: list[tuple[str, object]] = []
    try:
        fires, dies, breaks = Flag(), Flag(), Flag()
        alive = {"dies": True}
        watcher.watch(fires, lambda e: done.append(("fires", e)), lambda: True)
        watcher.watch(dies, lambda e: done.append(("dies", e)), lambda: alive["dies"])
        watcher.watch(breaks, lambda e: done.append(("breaks", e)), lambda: True)
        time.sleep(0.05)
        assert done == []
        fires.fired = True
        alive["dies"] = False
        breaks.error = RuntimeError("CUDA error")
        deadline = time.monotonic() + 5
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert sorted(name for name, _ in done) == ["breaks", "fires"]  # each once; the dead one silently dropped
        assert dict(done)["fires"] is None and isinstance(dict(done)["breaks"], RuntimeError)
        dies.fired = True
        time.sleep(0.05)
        assert len(done) == 2
    finally:
        watcher.close()
