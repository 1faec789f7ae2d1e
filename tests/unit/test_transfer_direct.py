"""The direct handoff on one host over real UCX (TCP on 127.0.0.1, P and D in this process, CPU pools): D offers
its KV pool in shared memory, P maps it and writes a room's pages itself, announcing each copy in a Pushed
message; anything that does not fit (either side opting out, an offer P cannot map) falls back to UCX data
messages. A room D fails itself drains until P confirms that none of its copies can still write the pages."""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

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

pytestmark = pytest.mark.timeout(90)

NUM_PAGES = 48
DIRECT = TransferConfig(
    thread_pool_size=2,
    queue_size=2,
    bootstrap_timeout=30,
    waiting_timeout=30,
    heartbeat_interval=1.0,
    heartbeat_max_failure=3,
    direct_copy=True,
)
NO_DIRECT = replace(DIRECT, direct_copy=False)


class Pair:
    """One started P and one started D; ``close`` shuts both down (the fixture always calls it)."""

    def __init__(self) -> None:
        self.pkv = torch.randn(3, 2, NUM_PAGES, 4, 2, 8).to(torch.bfloat16)
        self.dkv = torch.zeros_like(self.pkv)
        assert page_nbytes(self.pkv) == PAGE_BYTES
        self.p: PrefillTransfer | None = None
        self.d: DecodeTransfer | None = None

    def start(self, p_config: TransferConfig, d_config: TransferConfig) -> None:
        p = create_transfer("prefill", "ucx", self.pkv, DESC, p_config, HOST, 0)
        assert isinstance(p, PrefillTransfer)
        self.p = p
        p.start()
        self.port: int = p.bootstrap_port  # type: ignore[attr-defined]
        d = create_transfer("decode", "ucx", self.dkv, DESC, d_config, HOST, 0)
        assert isinstance(d, DecodeTransfer)
        self.d = d
        d.start()

    def register(self, room: int, d_pages: list[int]) -> None:
        assert self.p is not None and self.d is not None
        self.p.poll(room)
        self.d.register(room, HOST, self.port, d_pages)
        wait_until(lambda: self.p.poll(room) == KVPoll.WaitingForInput, 10, f"room {room}'s registration")

    def settle(self, room: int) -> None:
        done = (KVPoll.Success, KVPoll.Failed)
        wait_until(lambda: self.p.poll(room) in done and self.d.poll(room) in done, 15, f"room {room} to settle")

    def move(self, room: int, p_pages: list[int], d_pages: list[int]) -> None:
        """Register, send everything in one call, settle, and require Success on both sides."""
        self.register(room, d_pages)
        self.p.send(room, p_pages, 0, True, aux(room))
        self.settle(room)
        assert self.p.poll(room) == self.d.poll(room) == KVPoll.Success, (self.p.failure(room), self.d.failure(room))

    def close(self) -> None:
        for engine in (self.d, self.p):
            if engine is not None:
                engine.shutdown()


@pytest.fixture
def make_pair() -> Iterator[Callable[..., Pair]]:
    pairs: list[Pair] = []

    def make(p_config: TransferConfig = DIRECT, d_config: TransferConfig = DIRECT) -> Pair:
        pairs.append(Pair())  # appended before start: a half-started pair is still shut down
        pairs[-1].start(p_config, d_config)
        return pairs[-1]

    yield make
    for pair in pairs:
        pair.close()


def aux(room: int) -> AuxRecord:
    return AuxRecord(
        first_token_id=room,
        cached_tokens=2,
        output_token_logprobs=[[-0.5, room, None]],
        output_top_logprobs=[[[-0.5, room, None], [-1.25, 3, None]]],
    )


def test_direct_is_chosen_on_one_host_and_moves_pages_bit_exact(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    p_pages = [30, 2, 17, 9, 44, 0, 23, 11, 5, 47]  # out of order on both sides
    d_pages = [12, 40, 1, 33, 7, 26, 19, 45, 3, 28]
    pair.register(1, d_pages)
    pair.p.send(1, p_pages[:4], 0, False)
    pair.p.send(1, p_pages[4:], 4, True, aux(1))
    pair.settle(1)
    assert pair.p.poll(1) == pair.d.poll(1) == KVPoll.Success, (pair.p.failure(1), pair.d.failure(1))
    assert torch.equal(pair.dkv[:, :, d_pages], pair.pkv[:, :, p_pages])
    assert not pair.dkv[:, :, [pg for pg in range(NUM_PAGES) if pg not in d_pages]].any()
    ps, ds = pair.p.stats(1), pair.d.stats(1)
    assert ps.path == ds.path == "direct"
    for side in (pair.p, pair.d):  # each room change made the engine's wakeup fd readable: a waiting scheduler wakes
        fd = side.wakeup_fd()
        assert fd is not None and select.select([fd], [], [], 0)[0] == [fd]
    assert ps.num_bytes == ds.num_bytes == len(p_pages) * PAGE_BYTES
    assert pair.d.aux(1) == aux(1)


def test_decode_times_the_handoff_from_prefill_launching_the_copy(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    pair.register(1, [3, 4])
    # Fault injection on a private method: P's Pushed messages leave 50 ms after the copy (CPU: done at once).
    p_post = pair.p._post  # type: ignore[attr-defined]

    def late_post(peer: object, msg: object) -> None:
        if type(msg).__name__ == "Pushed":
            time.sleep(0.05)
        p_post(peer, msg)

    pair.p._post = late_post  # type: ignore[attr-defined]
    pair.p.send(1, [20, 21], 0, True, aux(1))
    pair.settle(1)
    assert pair.d.poll(1) == KVPoll.Success, pair.d.failure(1)
    # Both run on one host's monotonic clock: D's handoff time starts when P launched the copy, not when D heard.
    assert pair.d.stats(1).ms >= 50 and pair.p.stats(1).ms >= pair.d.stats(1).ms


def test_a_send_before_registration_pushes_once_decode_registers(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    pair.p.poll(1)
    pair.p.send(1, [4, 5], 0, False)  # the router reached P first: D has not registered yet
    pair.p.send(1, [6], 2, True, aux(1))
    pair.d.register(1, HOST, pair.port, [9, 8, 7])
    pair.settle(1)
    assert pair.p.poll(1) == pair.d.poll(1) == KVPoll.Success, (pair.p.failure(1), pair.d.failure(1))
    assert pair.p.stats(1).path == "direct"
    assert torch.equal(pair.dkv[:, :, [9, 8, 7]], pair.pkv[:, :, [4, 5, 6]])


def test_prefill_writes_into_decode_shared_pool(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    pair.register(1, [3, 4])
    assert pair.dkv.is_shared(), "D's pool must live in shared memory for P to map it"
    # Peek at P's mapping (a private attribute): it aliases D's pool.
    (peer,) = pair.p._peers  # type: ignore[attr-defined]
    assert peer.pool is not None
    peer.pool.target[:, :, 20] = 7.0
    assert (pair.dkv[:, :, 20] == 7.0).all()
    pair.dkv[:, :, 20] = 0
    pair.p.send(1, [20, 21], 0, True, aux(1))
    pair.settle(1)
    assert pair.p.poll(1) == pair.d.poll(1) == KVPoll.Success, (pair.p.failure(1), pair.d.failure(1))
    old = pair.dkv[:, :, [3, 4]].clone()
    assert torch.equal(old, pair.pkv[:, :, [20, 21]])
    pair.pkv[:, :, 21] = -3.5  # P reuses page 21 after the first room finished
    pair.move(2, [20, 21], [10, 11])
    assert pair.p.stats(2).path == pair.d.stats(2).path == "direct"
    assert torch.equal(pair.dkv[:, :, [10, 11]], pair.pkv[:, :, [20, 21]])
    assert (pair.dkv[:, :, 11] == -3.5).all() and torch.equal(pair.dkv[:, :, [3, 4]], old)  # room 1 untouched


@pytest.mark.parametrize("p_direct,d_direct", [(True, False), (False, True)], ids=["no-offer", "prefill-opts-out"])
def test_either_side_opting_out_uses_data_messages(
    make_pair: Callable[..., Pair], p_direct: bool, d_direct: bool
) -> None:
    pair = make_pair(DIRECT if p_direct else NO_DIRECT, DIRECT if d_direct else NO_DIRECT)
    assert (pair.d._offer is not None) == d_direct  # type: ignore[attr-defined]
    p_pages, d_pages = [8, 1, 40, 15, 33], [2, 29, 11, 46, 0]
    pair.move(1, p_pages, d_pages)
    assert pair.p.stats(1).path == pair.d.stats(1).path == "ucx"
    assert pair.p.stats(1).num_bytes == pair.d.stats(1).num_bytes == len(p_pages) * PAGE_BYTES
    assert torch.equal(pair.dkv[:, :, d_pages], pair.pkv[:, :, p_pages])
    assert pair.d.aux(1) == aux(1)


def test_an_offer_prefill_cannot_map_falls_back_to_data_messages(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    # Fault injection on a private attribute: P checks that /proc/<pid>/fd/<fd> is the offered file, and it is
    # not any more. D connects only at its first register(), so the corrupted offer is what the handshake sends.
    pair.d._offer["file_id"] = [0, 0]  # type: ignore[attr-defined,index]
    p_pages, d_pages = [6, 7, 19, 2], [31, 30, 5, 44]
    pair.move(1, p_pages, d_pages)
    assert pair.p.stats(1).path == pair.d.stats(1).path == "ucx"
    assert torch.equal(pair.dkv[:, :, d_pages], pair.pkv[:, :, p_pages])


def test_bad_page_ids_on_a_direct_link_fail_only_that_room(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    pair.register(1, [4, 5, 6])
    pair.p.send(1, [3, NUM_PAGES, 9], 0, True, aux(1))  # a P page that does not exist
    pair.settle(1)
    assert pair.p.poll(1) == pair.d.poll(1) == KVPoll.Failed
    for side in (pair.p, pair.d):
        assert "page id out of range" in (side.failure(1) or ""), side.failure(1)  # our check, not torch's
    pair.p.poll(2)
    pair.d.register(2, HOST, pair.port, [7, NUM_PAGES + 3])  # a D page that does not exist
    pair.settle(2)
    assert pair.p.poll(2) == pair.d.poll(2) == KVPoll.Failed
    assert "decode registered unusable page ids" in (pair.d.failure(2) or ""), pair.d.failure(2)
    assert not pair.dkv.any(), "no page may be written for a room whose ids were rejected"
    pair.move(3, [3, 9, 12], [4, 5, 6])  # the same engines, the same link, the same D pages
    assert pair.p.stats(3).path == pair.d.stats(3).path == "direct"
    assert torch.equal(pair.dkv[:, :, [4, 5, 6]], pair.pkv[:, :, [3, 9, 12]])


def test_decode_abort_drains_until_prefill_answers(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    pair.register(1, [1, 2, 3, 4, 5, 6])
    pair.p.send(1, [10, 11, 12], 0, False)  # half the room written, the rest still to come
    wait_until(lambda: pair.d.poll(1) == KVPoll.Transferring, 10, "P's first copy")
    pair.d.abort(1, "client gone")
    wait_until(lambda: pair.d.poll(1) == KVPoll.Failed, 10, "P's answer to D's abort")
    assert pair.d.failure(1) == "client gone"
    assert pair.p.poll(1) == KVPoll.Failed, "P answers only once its room failed"
    assert "aborted by decode" in (pair.p.failure(1) or "") and "client gone" in (pair.p.failure(1) or "")
    pair.p.send(1, [13, 14, 15], 3, True, aux(1))  # the scheduler's next chunk of a dead room: a no-op
    pair.move(2, [20, 21, 22], [7, 8, 9])
    assert pair.p.stats(2).path == pair.d.stats(2).path == "direct"
    assert torch.equal(pair.dkv[:, :, [7, 8, 9]], pair.pkv[:, :, [20, 21, 22]])
    assert not pair.dkv[:, :, [4, 5, 6]].any(), "pages of the aborted room's unsent chunk stay untouched"


def test_decode_abort_unanswered_holds_the_pages_until_the_drain_timeout(make_pair: Callable[..., Pair]) -> None:
    hb = replace(DIRECT, heartbeat_interval=0.5, heartbeat_max_failure=2)  # D waits 1 s for P's answer
    pair = make_pair(hb, hb)
    pair.register(1, [1, 2, 3, 4])
    pair.p.send(1, [10, 11], 0, False)
    wait_until(lambda: pair.d.poll(1) == KVPoll.Transferring, 10, "P's first copy")
    # Fault injection on a private method: P's answers to D's aborts are lost on the way.
    p_post = pair.p._post  # type: ignore[attr-defined]
    pair.p._post = lambda peer, msg: None if type(msg).__name__ == "AbortAck" else p_post(peer, msg)  # type: ignore[attr-defined]
    t0 = time.monotonic()
    pair.d.abort(1, "client gone")
    wait_until(lambda: pair.p.poll(1) == KVPoll.Failed, 10, "P to hear of the abort")
    assert pair.d.poll(1) == KVPoll.Transferring, "D must keep the room (and its pages) while P may write them"
    wait_until(lambda: pair.d.poll(1) == KVPoll.Failed, 10, "D's drain timeout")
    assert time.monotonic() - t0 >= 0.9 and pair.d.failure(1) == "client gone"


def test_decode_timeout_on_a_direct_link_drains_too(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(DIRECT, replace(DIRECT, waiting_timeout=0.5))
    pair.register(1, [1, 2])
    wait_until(lambda: pair.d.poll(1) == KVPoll.Failed, 10, "D's waiting timeout")  # P never sends
    assert "timed out" in (pair.d.failure(1) or "")
    assert pair.p.poll(1) == KVPoll.Failed, "D's room turns Failed only after P failed its room and answered"
    pair.p.send(1, [10, 11], 0, True, aux(1))  # too late: nothing may land in D's pages
    time.sleep(0.2)
    assert not pair.dkv.any()


def test_prefill_abort_reaches_decode_after_its_copies(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    pair.register(1, [1, 2, 3, 4])
    pair.p.send(1, [10, 11], 0, False)
    wait_until(lambda: pair.d.poll(1) == KVPoll.Transferring, 10, "P's first copy")
    pair.p.abort(1, "client gone")
    assert pair.p.poll(1) == KVPoll.Failed, "P's own pages are free at once: only P reads them"
    wait_until(lambda: pair.d.poll(1) == KVPoll.Failed, 10, "P's abort to reach D")
    assert "client gone" in (pair.d.failure(1) or "")
    pair.move(2, [20, 21], [5, 6])  # the link goes on
    assert pair.p.stats(2).path == "direct"
