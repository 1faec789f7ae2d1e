"""The UCX engine's piece pipeline over real UCX (TCP/shared memory on 127.0.0.1, P and D in this process):
sends split into pieces of uneven sizes and reassembled, gathers on the caller's thread, staging slots
shared fairly between rooms (no deadlock with one slot), and a runtime that does not spin when idle."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from transfer_testing import DESC, HOST, PAGE_BYTES, wait_until

from transfer import create_transfer
from transfer.base import (
    AuxRecord,
    DecodeTransfer,
    KVPoll,
    PrefillTransfer,
)
from transfer.config import TransferConfig
from transfer.pack import page_nbytes
from transfer.staging import StagingPool

pytestmark = pytest.mark.timeout(90)

NUM_PAGES = 64


def config(pages_per_piece: int, queue_size: int) -> TransferConfig:
    return TransferConfig(
        thread_pool_size=2,
        queue_size=queue_size,
        bootstrap_timeout=30,
        waiting_timeout=30,
        heartbeat_interval=1.0,
        heartbeat_max_failure=3,
        max_message_mb=pages_per_piece * PAGE_BYTES / (1 << 20),
        direct_copy=False,
    )  # pieces are data messages (a direct link sends none)


class Pair:
    def __init__(self, p_config: TransferConfig, d_config: TransferConfig) -> None:
        self.pkv = torch.randn(3, 2, NUM_PAGES, 4, 2, 8).to(torch.bfloat16)
        self.dkv = torch.zeros_like(self.pkv)
        assert page_nbytes(self.pkv) == PAGE_BYTES
        p = create_transfer("prefill", "ucx", self.pkv, DESC, p_config, HOST, 0)
        d = create_transfer("decode", "ucx", self.dkv, DESC, d_config, HOST, 0)
        assert isinstance(p, PrefillTransfer) and isinstance(d, DecodeTransfer)
        self.p, self.d = p, d
        p.start()
        d.start()
        self.port: int = p.bootstrap_port  # type: ignore[attr-defined]

    def register(self, room: int, d_pages: list[int]) -> None:
        self.p.poll(room)
        self.d.register(room, HOST, self.port, d_pages)
        wait_until(lambda: self.p.poll(room) == KVPoll.WaitingForInput, 10, "registration")

    def settle(self, room: int) -> None:
        done = (KVPoll.Success, KVPoll.Failed)
        wait_until(lambda: self.p.poll(room) in done and self.d.poll(room) in done, 15, f"room {room} to settle")

    def close(self) -> None:
        self.d.shutdown()
        self.p.shutdown()


@pytest.fixture
def make_pair() -> Iterator[Callable[[TransferConfig, TransferConfig], Pair]]:
    pairs: list[Pair] = []

    def make(p_config: TransferConfig, d_config: TransferConfig) -> Pair:
        pairs.append(Pair(p_config, d_config))
        return pairs[-1]

    yield make
    for pair in pairs:
        pair.close()


def aux(room: int) -> AuxRecord:
    return AuxRecord(first_token_id=room, cached_tokens=1, output_token_logprobs=[[-0.5, room, None]])


@pytest.mark.parametrize("queue_size", [1, 2, 4])
def test_sends_split_into_uneven_pieces_arrive_whole(make_pair: Callable[..., Pair], queue_size: int) -> None:
    """3 pages per piece; sends of 7, 1, 5 and 0 pages: pieces of 3, 3, 1 | 1 | 3, 2 | none, in order."""
    pair = make_pair(config(3, queue_size), config(3, queue_size))
    p_pages = [40, 3, 17, 8, 61, 22, 5, 30, 11, 50, 2, 36, 19]
    d_pages = [7, 55, 1, 44, 28, 13, 60, 9, 33, 21, 48, 4, 26]
    pair.register(9, d_pages)
    first = 0
    for n in (7, 1, 5):
        pair.p.send(9, p_pages[first : first + n], first, False)
        first += n
    pair.p.send(9, [], first, True, aux(9))  # the aux record alone: a header without data
    pair.settle(9)
    assert pair.p.poll(9) == pair.d.poll(9) == KVPoll.Success, (pair.p.failure(9), pair.d.failure(9))
    assert torch.equal(pair.dkv[:, :, d_pages], pair.pkv[:, :, p_pages])
    untouched = [pg for pg in range(NUM_PAGES) if pg not in d_pages]
    assert not pair.dkv[:, :, untouched].any()
    assert pair.d.aux(9) == aux(9)
    assert pair.p.stats(9).num_bytes == pair.d.stats(9).num_bytes == len(p_pages) * PAGE_BYTES


def test_send_gathers_on_the_callers_thread_when_a_slot_is_free(make_pair: Callable[..., Pair]) -> None:
    """With a free slot, ``send`` has read the pages when it returns: later writes to them do not travel."""
    pair = make_pair(config(4, 4), config(4, 4))
    pair.register(3, [10, 11, 12, 13, 14, 15])
    before = pair.pkv[:, :, [1, 2, 3, 4, 5, 6]].clone()
    pair.p.send(3, [1, 2, 3, 4, 5, 6], 0, True, aux(3))  # two pieces, both gathered in send()
    pair.pkv[:, :, [1, 2, 3, 4, 5, 6]] = 0  # the scheduler reuses the pages at once
    pair.settle(3)
    assert pair.d.poll(3) == KVPoll.Success, pair.d.failure(3)
    assert torch.equal(pair.dkv[:, :, [10, 11, 12, 13, 14, 15]], before)


def test_a_gather_error_fails_the_room_not_the_caller(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(config(4, 2), config(4, 2))
    pair.register(4, [1, 2])
    pair.p.send(4, [3, NUM_PAGES + 5], 0, True, aux(4))  # a page id past the pool: send() must not raise
    pair.settle(4)
    assert pair.p.poll(4) == pair.d.poll(4) == KVPoll.Failed
    assert "IndexError" in (pair.p.failure(4) or "") and "IndexError" in (pair.d.failure(4) or "")
    assert not pair.dkv.any()


def test_one_slot_shared_by_interleaved_rooms_never_deadlocks(make_pair: Callable[..., Pair]) -> None:
    """One staging slot on each side, four rooms sending interleaved multi-piece chunks: all arrive."""
    pair = make_pair(config(2, 1), config(2, 1))
    rooms = {
        100 + r: (list(range(r * 12, r * 12 + 11)), list(range(63 - r * 12, 63 - r * 12 - 11, -1))) for r in range(4)
    }
    for room, (_, d_pages) in rooms.items():
        pair.register(room, d_pages)
    for lo, hi in ((0, 5), (5, 6), (6, 11)):  # each round: every room sends its next chunk
        for room, (p_pages, _) in rooms.items():
            last = hi == 11
            pair.p.send(room, p_pages[lo:hi], lo, last, aux(room) if last else None)
    for room, (p_pages, d_pages) in rooms.items():
        pair.settle(room)
        assert pair.d.poll(room) == KVPoll.Success, pair.d.failure(room)
        assert torch.equal(pair.dkv[:, :, d_pages], pair.pkv[:, :, p_pages])
        assert pair.d.aux(room) == aux(room)


def test_failed_rooms_give_their_slots_back(make_pair: Callable[..., Pair]) -> None:
    """Rooms aborted with pieces queued (one slot each side) leave the engines able to move the next room."""
    pair = make_pair(config(1, 1), config(1, 1))
    pair.register(1, [1, 2, 3, 4])
    pair.register(2, [5, 6, 7, 8])
    pair.p.send(1, [11, 12, 13, 14], 0, False)  # four pieces for one slot
    pair.p.abort(1, "client went away")
    pair.d.abort(2, "client went away")
    pair.p.send(2, [15, 16, 17, 18], 0, True, aux(2))
    pair.settle(1)
    pair.settle(2)
    assert pair.p.poll(1) == pair.d.poll(1) == pair.p.poll(2) == pair.d.poll(2) == KVPoll.Failed
    pair.register(3, [20, 21, 22])
    pair.p.send(3, [30, 31, 32], 0, True, aux(3))
    pair.settle(3)
    assert pair.d.poll(3) == KVPoll.Success, pair.d.failure(3)
    assert torch.equal(pair.dkv[:, :, [20, 21, 22]], pair.pkv[:, :, [30, 31, 32]])


def test_decode_dying_mid_transfer_gives_prefills_slots_back(make_pair: Callable[..., Pair]) -> None:
    """D goes away with pieces in flight (one slot): P fails the room, then serves a new D with the same slot."""
    pair = make_pair(config(1, 1), config(1, 1))
    pair.register(1, [1, 2, 3, 4, 5, 6])
    pair.p.send(1, [11, 12, 13, 14, 15, 16], 0, False)
    pair.d.shutdown()
    wait_until(lambda: pair.p.poll(1) == KVPoll.Failed, 10, "P to notice D is gone")
    d2kv = torch.zeros_like(pair.pkv)
    d2 = create_transfer("decode", "ucx", d2kv, DESC, config(1, 1), HOST, 0)
    assert isinstance(d2, DecodeTransfer)
    d2.start()
    try:
        pair.p.poll(2)
        d2.register(2, HOST, pair.port, [7, 8, 9])
        wait_until(lambda: pair.p.poll(2) == KVPoll.WaitingForInput, 10, "registration")
        pair.p.send(2, [20, 21, 22], 0, True, aux(2))
        wait_until(lambda: d2.poll(2) in (KVPoll.Success, KVPoll.Failed), 15, "the new D's room")
        assert d2.poll(2) == KVPoll.Success, d2.failure(2)
        assert torch.equal(d2kv[:, :, [7, 8, 9]], pair.pkv[:, :, [20, 21, 22]])
    finally:
        d2.shutdown()


def test_idle_engines_do_not_spin(make_pair: Callable[..., Pair]) -> None:
    """Event-driven progress: a registered link with nothing to move costs (almost) no CPU."""
    pair = make_pair(config(4, 2), config(4, 2))
    pair.register(5, [1])  # a live link with a posted control receive on each side
    loop_threads = [t for t in threading.enumerate() if t.name == "transfer-ucx-loop"]
    assert len(loop_threads) == 1
    start = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - start < 0.25, "the transfer threads burn CPU while idle"


def test_staging_waiters_are_served_in_order_and_never_overtaken() -> None:
    import asyncio

    async def run() -> None:
        pool = StagingPool(1, torch.device("cpu"))
        held = pool.try_acquire(100)
        assert held is not None and pool.try_acquire(10) is None  # the only slot is taken
        first = asyncio.ensure_future(pool.acquire(10))
        second = asyncio.ensure_future(pool.acquire(20))
        await asyncio.sleep(0.01)
        pool.release(held)
        assert pool.try_acquire(10) is None  # a waiter is queued: the caller's thread does not overtake it
        slot = await asyncio.wait_for(first, 1)
        assert not second.done()
        pool.release(slot)
        slot = await asyncio.wait_for(second, 1)
        pool.release(slot)
        assert pool.try_acquire(10) is slot  # nobody waits any more

    asyncio.run(run())
