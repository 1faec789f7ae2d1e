"""Channel: one D<->P link on a UCX endpoint: typed control frames both ways, tagged P->D data messages.

Loop thread only (see ucx_runtime.py). ``post``/``post_data``/``post_recv_data`` put the request(s) on the
wire at once and return a future of their completion, so a caller can post several messages back to back
(a Data header and its data, one piece after another) and wait for them together. A control frame and
its overflow payload are posted in one synchronous call, so they stay adjacent on their tag without a
lock. ``recv`` has exactly one caller, the link's receive loop.
When the endpoint fails (peer died, link closed) every request of the channel fails with
``ConnectionError``: UCX itself does not end receives posted on a dead endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import numpy as np
import torch

from transfer.protocol import (
    CTRL_FRAME_BYTES,
    FRAME_HEADER,
    LINK_ID_BITS,
    Close,
    Hello,
    Message,
    accept_tag,
    ctrl_tag,
    data_tag,
    decode,
    encode,
    encode_hello,
    frame,
)
from transfer.ucx_runtime import UcxRuntime

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 0.1
MAX_CTRL_PAYLOAD = (
    64 << 20
)  # a control payload beyond this is a broken or hostile peer (no buffer for it)  # a live peer answers within a round trip; a dead one is not waited for longer


def ucx_array(buf: torch.Tensor | np.ndarray) -> Any:
    """A UCXX Array over a contiguous buffer: CUDA tensors directly (__cuda_array_interface__), CPU ones as numpy."""
    from ucxx._lib.arr import Array  # type: ignore[import-untyped]

    if isinstance(buf, torch.Tensor) and buf.device.type != "cuda":
        buf = buf.numpy()
    return Array(buf)


class Channel:
    def __init__(self, runtime: UcxRuntime, ep: Any, link_id: int, prefill_side: bool) -> None:
        from ucxx.types import Tag  # type: ignore[import-untyped]

        self.rt = runtime
        self.ep = ep
        self.link_id = link_id
        self._tag_of = Tag
        self._send_tag = Tag(ctrl_tag(link_id, to_prefill=not prefill_side))
        self._recv_tag = Tag(ctrl_tag(link_id, to_prefill=prefill_side))
        self._frame = np.empty(CTRL_FRAME_BYTES, dtype=np.uint8)
        self._next_seq = 0  # data messages posted by this side
        self._futs: set[asyncio.Future[None]] = set()
        self.broken: str | None = None  # why the channel stopped working (no more requests)
        self._closed = False
        ep.set_close_callback(self._on_endpoint_closed)

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # --- requests ------------------------------------------------------------------------------------------

    def post(self, msg: Message) -> asyncio.Future[Any]:
        """Put ``msg`` on the wire now; the future completes when UCX is done with it."""
        first, rest = frame(encode(msg))
        futs = [self._send(np.frombuffer(first, dtype=np.uint8), self._send_tag)]
        if rest is not None:
            futs.append(self._send(np.frombuffer(rest, dtype=np.uint8), self._send_tag))
        return futs[0] if len(futs) == 1 else asyncio.gather(*futs)

    def post_nowait(self, msg: Message) -> None:
        """``post`` a control message nobody waits for: its failure is not reported here (the link's receive
        loop reports a broken link). Raises ConnectionError if the channel is already broken."""
        self.post(msg).add_done_callback(_consume)

    async def send(self, msg: Message) -> None:
        await self.post(msg)

    def post_hello(self, accept_id: int, hello: Hello) -> asyncio.Future[None]:
        """D: the link's first message, on P's accept tag (one message: P receives Hellos from any sender)."""
        buf = np.frombuffer(encode_hello(hello), dtype=np.uint8)
        return self._send(buf, self._tag_of(accept_tag(accept_id)))

    def post_data(self, seq: int, buf: torch.Tensor) -> asyncio.Future[None]:
        """The data announced by Data(seq=seq): one message on its own tag."""
        return self._send(buf, self._tag_of(data_tag(self.link_id, seq)))

    def post_recv_data(self, seq: int, buf: torch.Tensor) -> asyncio.Future[None]:
        self._check()
        return self._track(self.ep.tag_recv(ucx_array(buf), self._tag_of(data_tag(self.link_id, seq))), buf, True)

    async def recv(self) -> Message:
        await self._recv_frame(self._frame)
        (length,) = FRAME_HEADER.unpack_from(self._frame.data)
        if FRAME_HEADER.size + length <= CTRL_FRAME_BYTES:
            msg = decode(self._frame[FRAME_HEADER.size : FRAME_HEADER.size + length].tobytes())
        else:
            if length > MAX_CTRL_PAYLOAD:
                raise ValueError(f"control frame of {length} bytes exceeds {MAX_CTRL_PAYLOAD}")
            payload = np.empty(length, dtype=np.uint8)
            await self._recv_frame(payload)
            msg = decode(payload.tobytes())
        if isinstance(msg, Close):  # the peer is gone: nothing more goes to it (not even our Close)
            self._break(f"peer closed the link: {msg.reason[:200]}")
        return msg

    def _send(self, buf: torch.Tensor | np.ndarray, tag: Any) -> asyncio.Future[None]:
        self._check()
        return self._track(self.ep.tag_send(ucx_array(buf), tag), buf, True)

    def _recv_frame(self, buf: np.ndarray) -> asyncio.Future[None]:
        self._check()
        return self._track(self.ep.tag_recv(ucx_array(buf), self._recv_tag), buf, False)

    def _track(self, req: Any, keep: Any, urgent: bool) -> asyncio.Future[None]:
        fut = self.rt.track(req, keep, urgent)
        if not fut.done():
            self._futs.add(fut)
            fut.add_done_callback(self._futs.discard)
        return fut

    def _check(self) -> None:
        if self.broken is not None:
            raise ConnectionError(self.broken)

    # --- failure and close -------------------------------------------------------------------------------------

    def _on_endpoint_closed(self) -> None:  # called from inside UCX: defer to the loop
        self.rt.loop.call_soon_threadsafe(self._break, "UCX endpoint closed or failed (peer gone)")

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        for fut in list(self._futs):
            self.rt.fail(fut, ConnectionError(reason))

    async def close(self, reason: str = "link closed") -> None:
        """Tell the peer (Close, best effort, briefly), then fail every request of the channel and close the endpoint."""
        if self._closed:
            return
        self._closed = True
        if self.broken is None:
            try:
                await asyncio.wait_for(self.post(Close(reason)), CLOSE_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - a peer that cannot hear it learns from the endpoint
                logger.debug("could not send Close: %s", e)
        self._break("channel closed")
        await asyncio.sleep(0)  # let the failed requests' waiters see it before the endpoint goes
        try:
            self.ep.close_blocking(period=int(CLOSE_TIMEOUT_S * 1e9), max_attempts=1)  # progresses the worker itself
        except Exception as e:  # noqa: BLE001 - closing a broken endpoint may fail; it is closed either way
            logger.debug("closing a UCX endpoint: %s", e)
        finally:
            self.ep.remove_close_callback()


def connect(runtime: UcxRuntime, address: bytes, taken: set[int]) -> Channel:
    """D's side of a new link: an endpoint to P's worker address and a fresh link id (not in ``taken``).

    Nothing is sent yet: D's Hello (``post_hello``) is the link's first message."""
    link_id = secrets.randbits(LINK_ID_BITS)
    while link_id in taken:
        link_id = secrets.randbits(LINK_ID_BITS)
    return Channel(runtime, runtime.connect_address(address), link_id, prefill_side=False)


def accept(runtime: UcxRuntime, hello: Hello) -> Channel:
    """P's side of a new link: an endpoint back to the D that sent ``hello`` (checked by the caller first)."""
    return Channel(runtime, runtime.connect_address(hello.address), hello.link_id, prefill_side=True)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: not an asyncio warning
