"""One conformance suite for both transfer engines: real UCX (TCP on 127.0.0.1, P and D in this process on
two CPU KV buffers), once with the KV as data messages and once direct (P maps D's pool from shared memory
and writes the pages itself), and the in-process fake. All must show the same states, pages, texts and timeouts."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch

from transfer import create_transfer
from transfer.base import (
    AuxRecord,
    DecodeTransfer,
    EngineDescription,
    KVPoll,
    PrefillTransfer,
)
from transfer.config import TransferConfig

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
NUM_PAGES = 48
SLOW = TransferConfig(
    thread_pool_size=2,
    queue_size=2,
    bootstrap_timeout=30,
    waiting_timeout=30,
    heartbeat_interval=1.0,
    heartbeat_max_failure=3,
    max_message_mb=0.0005,
)  # 524 B: sends of several pages go as several messages
HB = replace(SLOW, heartbeat_interval=0.25, heartbeat_max_failure=2)


def desc_for(page_size: int, **changes: object) -> EngineDescription:
    d = EngineDescription(
        model_id="LlamaForCausalLM:L3:H32:V128",
        architecture="LlamaForCausalLM",
        dtype="bfloat16",
        num_layers=3,
        num_kv_heads=2,
        head_dim=8,
        page_size=page_size,
    )
    return replace(d, **changes)  # type: ignore[arg-type]


def kv_for(desc: EngineDescription, fill: bool) -> torch.Tensor:
    shape = (desc.num_layers, 2, NUM_PAGES, desc.page_size, desc.num_kv_heads, desc.head_dim)
    return torch.randn(shape).to(torch.bfloat16) if fill else torch.zeros(shape, dtype=torch.bfloat16)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` until true; seconds it took. Fails the test after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


def settled(engine: PrefillTransfer | DecodeTransfer, room: int) -> Callable[[], bool]:
    return lambda: engine.poll(room) in (KVPoll.Success, KVPoll.Failed)


class Cluster:
    """One P and any number of D engines of one backend; everything is shut down at teardown."""

    def __init__(self, backend: str) -> None:
        self.direct = backend == "ucx-direct"  # P maps D's pool (shared memory here) and writes the pages itself
        self.backend = "ucx" if self.direct else backend
        self.hub = None
        if backend == "fake":
            from transfer.fake_engine import FakeTransferHub

            self.hub = FakeTransferHub()
        self.engines: list[PrefillTransfer | DecodeTransfer] = []
        self.p: PrefillTransfer
        self.port = 0

    def _extra(self) -> dict[str, object]:
        return {"hub": self.hub} if self.hub is not None else {}

    def prefill(self, desc: EngineDescription, config: TransferConfig = SLOW) -> tuple[PrefillTransfer, torch.Tensor]:
        kv = kv_for(desc, fill=True)
        config = replace(config, direct_copy=self.direct)
        p = create_transfer("prefill", self.backend, kv, desc, config, HOST, 0, **self._extra())  # type: ignore[arg-type]
        assert isinstance(p, PrefillTransfer)
        self.engines.append(p)
        p.start()
        self.p, self.port = p, p.bootstrap_port  # type: ignore[attr-defined]
        assert self.port > 0
        return p, kv

    def decode(self, desc: EngineDescription, config: TransferConfig = SLOW) -> tuple[DecodeTransfer, torch.Tensor]:
        kv = kv_for(desc, fill=False)
        config = replace(config, direct_copy=self.direct)
        d = create_transfer("decode", self.backend, kv, desc, config, HOST, 0, **self._extra())  # type: ignore[arg-type]
        assert isinstance(d, DecodeTransfer)
        self.engines.append(d)
        d.start()
        return d, kv

    def pair(self, page_size: int = 4, p_config: TransferConfig = SLOW, d_config: TransferConfig = SLOW):
        p, pkv = self.prefill(desc_for(page_size), p_config)
        d, dkv = self.decode(desc_for(page_size), d_config)
        return p, pkv, d, dkv

    def make_prefill_unreachable(self) -> None:
        """P's control plane stops answering (its process hangs) while its endpoint stays open."""
        if self.hub is not None:
            self.hub.set_reachable((HOST, self.port), False)
        else:
            self.p.runtime.run(self.p._bootstrap.stop(), timeout=5)  # type: ignore[attr-defined]

    def close(self) -> None:
        for e in reversed(self.engines):
            t = time.monotonic()
            e.shutdown()
            assert time.monotonic() - t < 5, "shutdown must finish within a few seconds"


@pytest.fixture(params=["ucx", "ucx-direct", "fake"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(request.param)
    yield c
    c.close()


def register_and_bootstrap(p: PrefillTransfer, d: DecodeTransfer, room: int, port: int, d_pages: list[int]) -> None:
    p.poll(room)
    d.register(room, HOST, port, d_pages)
    wait_until(lambda: p.poll(room) == KVPoll.WaitingForInput, 10, "P to see D's registration")


def aux_for(room: int) -> AuxRecord:
    return AuxRecord(
        first_token_id=room % 1000,
        cached_tokens=3,
        output_token_logprobs=[[-0.25, room % 1000, None]],
        output_top_logprobs=[[[-0.25, room % 1000, None], [-1.5, 7, None]]],
        input_token_logprobs=[[None, 1, None], [-2.0, 5, None]],
        input_top_logprobs=None,
    )


# --- the happy path ------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 4])
def test_rooms_move_pages_in_order_of_states(cluster: Cluster, page_size: int) -> None:
    p, pkv, d, dkv = cluster.pair(page_size)
    rng = random.Random(page_size)
    p_free, d_free = list(range(NUM_PAGES)), list(range(NUM_PAGES))
    rng.shuffle(p_free)  # pages out of order, different ids on P and D
    rng.shuffle(d_free)
    rooms: dict[int, tuple[list[int], list[int]]] = {}
    for n_pages in (1, 5, 9):  # one prompt shorter than a page (1 page), others in several chunks
        room = rng.randrange(1 << 63)
        rooms[room] = ([p_free.pop() for _ in range(n_pages)], [d_free.pop() for _ in range(n_pages)])
    seen: dict[tuple[str, int], list[KVPoll]] = {}

    def record(side: str, engine: PrefillTransfer | DecodeTransfer, room: int) -> KVPoll:
        states = seen.setdefault((side, room), [])
        state = engine.poll(room)
        if not states or states[-1] != state:
            states.append(state)
        return state

    def both_settled(room: int) -> bool:
        d_state, p_state = record("D", d, room), record("P", p, room)
        return {d_state, p_state} <= {KVPoll.Success, KVPoll.Failed}

    for room, (_p_pages, d_pages) in rooms.items():
        record("P", p, room)
        d.register(room, HOST, cluster.port, d_pages)
        record("D", d, room)
    for room in rooms:
        wait_until(lambda r=room: p.poll(r) == KVPoll.WaitingForInput, 10, "registration")  # type: ignore[misc]
    cursors = {room: 0 for room in rooms}
    while any(cursors[r] < len(rooms[r][0]) for r in rooms):  # interleave the rooms' chunks of 1-4 pages
        for room, (p_pages, _) in rooms.items():
            start = cursors[room]
            if start >= len(p_pages):
                continue
            end = min(len(p_pages), start + rng.randint(1, 4))
            last = end == len(p_pages)
            p.send(room, p_pages[start:end], start, last, aux_for(room) if last else None)
            cursors[room] = end
            record("P", p, room)
            record("D", d, room)
    for room in rooms:
        wait_until(lambda r=room: both_settled(r), 10, "both sides to settle")  # type: ignore[misc]
    for room, (p_pages, d_pages) in rooms.items():
        assert p.poll(room) == KVPoll.Success, p.failure(room)
        assert d.poll(room) == KVPoll.Success, d.failure(room)
        for side in ("P", "D"):
            states = seen[(side, room)]
            assert states == sorted(states) and states[-1] == KVPoll.Success, (side, states)
            assert KVPoll.Failed not in states
        assert seen[("P", room)][0] == KVPoll.Bootstrapping
        assert torch.equal(dkv[:, :, d_pages], pkv[:, :, p_pages])
        assert d.aux(room) == aux_for(room)
        nbytes = len(p_pages) * dkv[:, :, :1].numel() * dkv.element_size()
        assert p.stats(room).num_bytes == nbytes and d.stats(room).num_bytes == nbytes
        assert p.stats(room).ms >= 0 and d.stats(room).ms >= 0
        if cluster.backend == "ucx":
            assert p.stats(room).path == d.stats(room).path == ("direct" if cluster.direct else "ucx")
        assert p.failure(room) is None and d.failure(room) is None
    used = [pg for _, dp in rooms.values() for pg in dp]
    untouched = [pg for pg in range(NUM_PAGES) if pg not in used]
    assert not dkv[:, :, untouched].any(), "pages nobody registered must stay untouched"
    for room in rooms:
        p.release(room), d.release(room)
    assert d.poll(next(iter(rooms))) == KVPoll.Failed  # released rooms are unknown to D


def test_registration_before_prefill_sees_the_room(cluster: Cluster) -> None:
    p, pkv, d, dkv = cluster.pair()
    room = 77
    d.register(room, HOST, cluster.port, [4, 2])
    wait_until(lambda: d.poll(room) == KVPoll.WaitingForInput, 10, "P to acknowledge the early registration")
    assert p.poll(room) == KVPoll.WaitingForInput  # P's first look finds the registration kept
    big_aux = AuxRecord(
        first_token_id=9,
        input_token_logprobs=[[-0.5 - i, i, None] for i in range(3000)],
        input_top_logprobs=[[[-0.5, i, None], [-2.5, i + 1, None]] for i in range(3000)],
    )
    p.send(room, [9, 8], 0, True, big_aux)  # an aux record far larger than one control frame
    wait_until(lambda: settled(p, room)() and settled(d, room)(), 10, "transfer")
    assert d.poll(room) == p.poll(room) == KVPoll.Success
    assert torch.equal(dkv[:, :, [4, 2]], pkv[:, :, [9, 8]])
    assert d.aux(room) == big_aux


def test_unknown_prefill_fails_registration_within_heartbeat_budget(cluster: Cluster) -> None:
    cluster.prefill(desc_for(4))
    d, _ = cluster.decode(desc_for(4), HB)
    with socket.socket() as s:  # a port nobody listens on
        s.bind((HOST, 0))
        dead_port = s.getsockname()[1]
    d.register(41, HOST, dead_port, [1])
    budget = HB.heartbeat_interval * HB.heartbeat_max_failure
    took = wait_until(settled(d, 41), budget + 3, "D to give up on an absent prefill")
    text = d.failure(41) or ""
    assert d.poll(41) == KVPoll.Failed and f"prefill server {HOST}:{dead_port} unreachable" in text
    assert took <= budget + 2


# --- refusals and timeouts ---------------------------------------------------------------------------


def test_engine_mismatch_fails_decode_with_the_mismatch_text(cluster: Cluster) -> None:
    cluster.prefill(desc_for(4))
    d, dkv = cluster.decode(desc_for(4, dtype="float16", num_layers=3))
    d.register(5, HOST, cluster.port, [1])
    wait_until(settled(d, 5), 10, "the refusal")
    assert d.poll(5) == KVPoll.Failed
    text = d.failure(5) or ""
    assert text.startswith("prefill/decode engine mismatch") and "dtype" in text and "float16" in text
    assert not dkv.any()


def test_decode_never_registers_prefill_fails_after_bootstrap_timeout(cluster: Cluster) -> None:
    p, _ = cluster.prefill(desc_for(4), replace(SLOW, bootstrap_timeout=0.4))
    assert p.poll(11) == KVPoll.Bootstrapping  # the clock starts here
    took = wait_until(settled(p, 11), 5, "bootstrap timeout")
    assert p.poll(11) == KVPoll.Failed and "bootstrap timeout" in (p.failure(11) or "")
    assert 0.35 <= took <= 2.5


def test_prefill_never_sends_decode_fails_after_waiting_timeout(cluster: Cluster) -> None:
    p, _, d, dkv = cluster.pair(d_config=replace(SLOW, waiting_timeout=0.8))
    register_and_bootstrap(p, d, 12, cluster.port, [0, 1])
    took = wait_until(settled(d, 12), 5, "waiting timeout")
    assert d.poll(12) == KVPoll.Failed and "timed out" in (d.failure(12) or "")
    assert took <= 3
    wait_until(settled(p, 12), 5, "P to hear of D's timeout")
    assert p.poll(12) == KVPoll.Failed
    p.send(12, [3, 4], 0, True, aux_for(12))  # too late: nothing may land in D's pages
    time.sleep(0.2)
    assert not dkv.any()


# --- aborts and injected failures ----------------------------------------------------------------------


def test_decode_abort_reaches_prefill_and_leaves_pages_untouched(cluster: Cluster) -> None:
    p, _, d, dkv = cluster.pair()
    register_and_bootstrap(p, d, 21, cluster.port, [5, 6, 7])
    p.send(21, [1], 0, False)  # a chunk may be on its way
    d.abort(21, "client disconnected")
    # A direct link drains until P confirms its copies are done; Failed means nothing writes the pages any more.
    wait_until(settled(d, 21), 10, "D's abort to settle")
    assert d.poll(21) == KVPoll.Failed and d.failure(21) == "client disconnected"
    before = dkv.clone()
    p.send(21, [2, 3], 1, True, aux_for(21))
    wait_until(settled(p, 21), 10, "P to hear the abort")
    assert p.poll(21) == KVPoll.Failed and "aborted by decode: client disconnected" in (p.failure(21) or "")
    time.sleep(0.2)
    assert torch.equal(dkv, before), "no write into an aborted room's pages once it showed Failed"
    assert not dkv[:, :, [6, 7]].any()


def test_prefill_abort_reaches_decode(cluster: Cluster) -> None:
    p, _, d, _ = cluster.pair()
    register_and_bootstrap(p, d, 22, cluster.port, [5])
    p.abort(22, "prefill KV pool exhausted; retry the request")
    assert p.poll(22) == KVPoll.Failed
    wait_until(settled(d, 22), 10, "D to hear the abort")
    assert d.poll(22) == KVPoll.Failed
    assert "prefill KV pool exhausted; retry the request" in (d.failure(22) or "")


def test_injected_failures_fail_both_sides(cluster: Cluster) -> None:
    p, _, d, dkv = cluster.pair(p_config=replace(SLOW, test_failure_prob=1.0))
    register_and_bootstrap(p, d, 23, cluster.port, [1, 2])
    p.send(23, [3, 4], 0, True, aux_for(23))
    assert p.poll(23) == KVPoll.Failed and "injected" in (p.failure(23) or "")
    wait_until(settled(d, 23), 10, "D to hear of the injected failure")
    assert d.poll(23) == KVPoll.Failed and "injected" in (d.failure(23) or "")
    assert not dkv.any()


# --- a side dies ----------------------------------------------------------------------------------------


def test_prefill_shut_down_fails_decode_rooms_in_time(cluster: Cluster) -> None:
    p, _, d, _ = cluster.pair(d_config=HB)
    register_and_bootstrap(p, d, 31, cluster.port, [1])
    p.shutdown()
    budget = HB.heartbeat_interval * HB.heartbeat_max_failure
    took = wait_until(settled(d, 31), budget + 2, "D to notice P is gone")
    assert d.poll(31) == KVPoll.Failed and "prefill" in (d.failure(31) or "")
    assert took <= budget + 1.5


def test_unresponsive_prefill_fails_decode_rooms_by_heartbeat(cluster: Cluster) -> None:
    p, _, d, _ = cluster.pair(d_config=HB)
    register_and_bootstrap(p, d, 32, cluster.port, [1])
    cluster.make_prefill_unreachable()
    budget = HB.heartbeat_interval * HB.heartbeat_max_failure
    took = wait_until(settled(d, 32), budget + 3, "D's heartbeat to give up")
    text = d.failure(32) or ""
    assert d.poll(32) == KVPoll.Failed and "prefill server" in text and "unreachable" in text
    assert budget * 0.5 <= took <= budget + 2


def test_decode_shut_down_mid_transfer_fails_prefill_room(cluster: Cluster) -> None:
    p, _, d, _ = cluster.pair()
    register_and_bootstrap(p, d, 33, cluster.port, [1, 2, 3])
    p.send(33, [4], 0, False)
    d.shutdown()
    wait_until(settled(p, 33), 10, "P to notice D is gone")
    assert p.poll(33) == KVPoll.Failed and "decode" in (p.failure(33) or "")


# --- UCX only ---------------------------------------------------------------------------------------------


def test_ucx_prefill_start_on_a_busy_port_fails_cleanly() -> None:
    import threading

    before = {t.name for t in threading.enumerate()}
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        p = create_transfer(
            "prefill", "ucx", kv_for(desc_for(4), fill=True), desc_for(4), SLOW, HOST, taken.getsockname()[1]
        )
        with pytest.raises(OSError, match="bootstrap server cannot bind"):
            p.start()
    p.shutdown()  # a no-op after a failed start
    wait_until(lambda: {t.name for t in threading.enumerate()} <= before, 5, "transfer threads to end")
