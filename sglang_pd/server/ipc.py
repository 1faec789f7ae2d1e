"""ZMQ plumbing: per-server ipc:// endpoints in a private temp dir, and typed send/recv on sockets."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from sglang_pd.server import messages


@dataclass(frozen=True)
class IpcPaths:
    """One PUSH/PULL pair per arrow of DESIGN §2; the PULL side binds."""

    scheduler_input: str  # main -> scheduler
    detokenizer_input: str  # scheduler -> detokenizer
    main_output: str  # detokenizer -> main (token text)
    main_control: str  # scheduler -> main (ready, replies, stats)

    @classmethod
    def create(cls) -> tuple[IpcPaths, tempfile.TemporaryDirectory]:
        tmp = tempfile.TemporaryDirectory(prefix="sglang-pd-ipc-")
        base = Path(tmp.name)
        return cls(*(f"ipc://{base / name}" for name in ("sched", "detok", "out", "ctrl"))), tmp


def pull(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    return sock


def push(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def send(sock: zmq.Socket, msg: Any) -> None:
    sock.send(messages.encode(msg))


def recv_all(sock: zmq.Socket, timeout_ms: int, wakeup_fd: int | None = None) -> list[Any]:
    """Every message waiting now; blocks up to ``timeout_ms`` for the first when none is waiting, or until
    ``wakeup_fd`` (an eventfd, drained here) turns readable."""
    out: list[Any] = []
    if wakeup_fd is None:
        if sock.poll(timeout_ms) == 0:
            return out
    else:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wakeup_fd, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        if wakeup_fd in ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(wakeup_fd)
        if sock not in ready:
            return out
    while True:
        try:
            out.append(messages.decode(sock.recv(zmq.NOBLOCK)))
        except zmq.Again:
            return out
