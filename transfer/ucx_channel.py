"""Channel: typed control messages and tagged data messages on one UCXX endpoint (see protocol.py).

Runs on the UCX runtime's event loop only. Sends are serialized by a lock (a control frame and its
overflow payload must stay adjacent on CTRL_TAG); ``recv`` has exactly one caller, the endpoint's
receive loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import torch

from transfer.protocol import (
    CTRL_FRAME_BYTES,
    CTRL_TAG,
    FRAME_HEADER,
    Message,
    data_tag,
    decode,
    encode,
    frame,
)

logger = logging.getLogger(__name__)

def ucx_buffer(t: torch.Tensor) -> Any:
    """What UCXX accepts for a contiguous tensor: the tensor on CUDA (__cuda_array_interface__), numpy on CPU."""
    if t.device.type == "cuda":
        return t
    return t.numpy()


class Channel:
    def __init__(self, ep: Any) -> None:
        self.ep = ep
        self._send_lock = asyncio.Lock()
        self._frame = np.empty(CTRL_FRAME_BYTES, dtype=np.uint8)
        self._next_seq = 0  # data message counter of this side's sends
        self.closed = False

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    async def send(self, msg: Message) -> None:
        first, rest = frame(encode(msg))
        async with self._send_lock:
            await self.ep.send(np.frombuffer(first, dtype=np.uint8), tag=CTRL_TAG)
            if rest is not None:
                await self.ep.send(np.frombuffer(rest, dtype=np.uint8), tag=CTRL_TAG)

    async def send_data(self, seq: int, buf: torch.Tensor) -> None:
        """The chunk announced by Data(seq=seq): one message on its own tag (no lock: tags never repeat)."""
        await self.ep.send(ucx_buffer(buf), tag=data_tag(seq))

    async def recv(self) -> Message:
        await self.ep.recv(self._frame, tag=CTRL_TAG)
        (length,) = FRAME_HEADER.unpack_from(self._frame.data)
        if FRAME_HEADER.size + length <= CTRL_FRAME_BYTES:
            return decode(self._frame[FRAME_HEADER.size:FRAME_HEADER.size + length].tobytes())
        payload = np.empty(length, dtype=np.uint8)
        await self.ep.recv(payload, tag=CTRL_TAG)
        return decode(payload.tobytes())

    async def recv_data(self, seq: int, buf: torch.Tensor) -> None:
        await self.ep.recv(ucx_buffer(buf), tag=data_tag(seq))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.ep.close(period=10**9)
        except Exception as e:  # noqa: BLE001 - closing a broken endpoint may raise; it is closed either way
            logger.debug("closing a UCX endpoint: %s", e)
