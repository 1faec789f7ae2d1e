"""The transfer engine's control plane under attack, over real UCX (P and D engines in this process):
rooms bound to their first registration, signed links, PUT /route, forged pool offers, where UCX listens."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import replace

import aiohttp
import pytest
import torch
from transfer_testing import DESC, HOST, listening_tcp, wait_until

from pd_common.cluster_auth import ClusterKey, body_digest
from transfer import create_transfer
from transfer.base import AuxRecord, DecodeTransfer, KVPoll, PrefillTransfer
from transfer.bootstrap import SIGNATURE_HEADER, BootstrapClient, BootstrapServer, Route
from transfer.config import TransferConfig
from transfer.hosts import net_devices_for, outward_address
from transfer.peer_pool import PeerPoolError, PoolOffer, boot_id, export_pool, open_pool
from transfer.room import RoomInUse

pytestmark = pytest.mark.timeout(90)

NUM_PAGES = 32
CONFIG = TransferConfig(
    thread_pool_size=2,
    queue_size=2,
    bootstrap_timeout=30,
    waiting_timeout=30,
    heartbeat_interval=0.5,
    heartbeat_max_failure=2,
)
KEY = ClusterKey(b"s" * 32)


class Engines:
    def __init__(self) -> None:
        self.all: list[PrefillTransfer | DecodeTransfer] = []

    def prefill(
        self, config: TransferConfig = CONFIG, key: ClusterKey | None = None, data_host: str | None = HOST
    ) -> tuple[PrefillTransfer, torch.Tensor]:
        kv = torch.randn(3, 2, NUM_PAGES, 4, 2, 8).to(torch.bfloat16)
        p = create_transfer("prefill", "ucx", kv, DESC, config, HOST, 0, data_host=data_host, cluster_key=key)
        assert isinstance(p, PrefillTransfer)
        self.all.append(p)
        p.start()
        return p, kv

    def decode(
        self, config: TransferConfig = CONFIG, key: ClusterKey | None = None
    ) -> tuple[DecodeTransfer, torch.Tensor]:
        kv = torch.zeros(3, 2, NUM_PAGES, 4, 2, 8, dtype=torch.bfloat16)
        d = create_transfer("decode", "ucx", kv, DESC, config, HOST, 0, data_host=HOST, cluster_key=key)
        assert isinstance(d, DecodeTransfer)
        self.all.append(d)
        d.start()
        return d, kv


@pytest.fixture
def engines() -> Iterator[Engines]:
    e = Engines()
    yield e
    for engine in reversed(e.all):
        engine.shutdown()


def aux(room: int) -> AuxRecord:
    return AuxRecord(first_token_id=room % 1000)


def settled(*pairs: tuple[PrefillTransfer | DecodeTransfer, int]) -> Callable[[], bool]:
    return lambda: all(e.poll(r) in (KVPoll.Success, KVPoll.Failed) for e, r in pairs)


# --- rooms -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "ucx"])
def test_a_second_registration_of_a_live_room_is_refused_and_data_stay_apart(engines: Engines, direct: bool) -> None:
    config = replace(CONFIG, direct_copy=direct)
    p, pkv = engines.prefill(config)
    d1, kv1 = engines.decode(config)
    d2, kv2 = engines.decode(config)  # the stranger: another decode worker naming the same room
    port = p.bootstrap_port  # type: ignore[attr-defined]
    p.poll(7)
    d1.register(7, HOST, port, [1, 2, 3])
    wait_until(lambda: p.poll(7) == KVPoll.WaitingForInput, 10, "D1's registration")
    d2.register(7, HOST, port, [4, 5, 6])
    wait_until(lambda: d2.poll(7) == KVPoll.Failed, 10, "P to refuse D2")
    assert "already registered" in (d2.failure(7) or "")
    # the same engine twice: refused at once, the holder untouched
    with pytest.raises(RoomInUse):
        d1.register(7, HOST, port, [9, 10, 11])
    p.send(7, [20, 21, 22], 0, True, aux(7))
    wait_until(settled((p, 7), (d1, 7)), 15, "room 7")
    assert p.poll(7) == d1.poll(7) == KVPoll.Success, (p.failure(7), d1.failure(7))
    assert torch.equal(kv1[:, :, [1, 2, 3]], pkv[:, :, [20, 21, 22]]) and d1.aux(7) == aux(7)
    assert not kv2.any() and d2.aux(7) is None, "nothing of room 7 may reach the second registrant"
    assert not kv1[:, :, [9, 10, 11]].any()
    # a room released on D is free again there (P: a new room)
    d1.release(7)
    p.release(7)
    assert not d1.holds(7) and not p.holds(7)


def test_the_room_registered_first_keeps_it_whoever_comes_second(engines: Engines) -> None:
    p, pkv = engines.prefill()
    d1, kv1 = engines.decode()
    d2, kv2 = engines.decode()
    port = p.bootstrap_port  # type: ignore[attr-defined]
    d1.register(8, HOST, port, [1, 2])  # before P saw the room (the router sends to both at once)
    wait_until(lambda: d1.poll(8) == KVPoll.WaitingForInput, 10, "D1's registration to be pending")
    d2.register(8, HOST, port, [3, 4])
    wait_until(lambda: d2.poll(8) == KVPoll.Failed, 10, "P to refuse the second registration")
    p.poll(8)
    p.send(8, [10, 11], 0, True, aux(8))
    wait_until(settled((p, 8), (d1, 8)), 15, "room 8")
    assert d1.poll(8) == KVPoll.Success and torch.equal(kv1[:, :, [1, 2]], pkv[:, :, [10, 11]])
    assert not kv2.any()


# --- signed links ------------------------------------------------------------------------------------------


def test_signed_links_work_and_unsigned_or_foreign_ones_are_refused(engines: Engines, monkeypatch) -> None:
    import transfer.ucx_decode

    monkeypatch.setattr(transfer.ucx_decode, "CONNECT_TIMEOUT_S", 1.0)  # a refused Hello gets no answer
    p, pkv = engines.prefill(key=KEY)
    port = p.bootstrap_port  # type: ignore[attr-defined]
    good, gkv = engines.decode(key=KEY)
    p.poll(1)
    good.register(1, HOST, port, [1])
    p.send(1, [5], 0, True, aux(1))
    wait_until(settled((p, 1), (good, 1)), 15, "the signed link's room")
    assert good.poll(1) == KVPoll.Success and torch.equal(gkv[:, :, [1]], pkv[:, :, [5]])

    unsigned, ukv = engines.decode()
    unsigned.register(2, HOST, port, [1])
    wait_until(lambda: unsigned.poll(2) == KVPoll.Failed, 5, "the unsigned D to give up")
    assert "requires a cluster secret" in (unsigned.failure(2) or "")

    before = p._refusals  # type: ignore[attr-defined]
    foreign, fkv = engines.decode(
        replace(CONFIG, heartbeat_interval=0.2, heartbeat_max_failure=1), key=ClusterKey(b"x" * 32)
    )
    foreign.register(3, HOST, port, [1])
    wait_until(lambda: foreign.poll(3) == KVPoll.Failed, 10, "the wrongly keyed D to give up")
    assert "did not answer our Hello" in (foreign.failure(3) or "")
    assert p._refusals > before  # type: ignore[attr-defined]
    assert len(p._peers) == 1, "P must not open an endpoint to a sender whose Hello it refused"  # type: ignore[attr-defined]
    assert not ukv.any() and not fkv.any()


# --- PUT /route --------------------------------------------------------------------------------------------


def test_put_route_needs_the_secret_or_loopback() -> None:
    route = {"rank": 1, "host": "10.0.0.7", "address": "0a0b", "accept_id": 3}
    own = Route("10.0.0.1", "abcd", 5)

    async def put(port: int, host: str, body: dict, signature: str | None) -> int:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({SIGNATURE_HEADER: signature} if signature else {})}
        async with aiohttp.ClientSession() as s, s.put(f"http://{host}:{port}/route", data=data, headers=headers) as r:
            return r.status

    def sig(body: dict, key: ClusterKey = KEY) -> str:
        return key.sign("route", body_digest("PUT", "/route", json.dumps(body).encode()))

    async def run() -> None:
        keyed = BootstrapServer(HOST, 0, KEY)
        port = await keyed.start()
        keyed.set_route(own)
        client = BootstrapClient()
        try:
            assert (await client.get_route(HOST, port, 5)).auth is False  # set_route above says so itself
            assert await put(port, HOST, route, None) == 401  # loopback, but unsigned
            assert await put(port, HOST, route, sig(route, ClusterKey(b"y" * 32))) == 401
            assert await put(port, HOST, route, sig({**route, "host": "x"})) == 401  # signature of another body
            hijack = {"rank": 0, "host": "evil", "address": "00", "accept_id": 1}
            assert await put(port, HOST, hijack, sig(hijack)) == 409  # even signed: rank 0 is P's own
            assert await client.get_route(HOST, port, 5) == own
            await client.put_route(HOST, port, Route("10.0.0.7", "0a0b", 3, rank=1), 5, KEY)
            assert (await client.get_route(HOST, port, 5, rank=1)).host == "10.0.0.7"
        finally:
            await keyed.stop()
        # no secret: loopback callers only (P's own ranks on this host)
        open_server = BootstrapServer("0.0.0.0", 0)
        port = await open_server.start()
        open_server.set_route(own)
        try:
            outside = outward_address()
            if outside != "127.0.0.1":
                assert await put(port, outside, route, None) == 403
                assert await put(port, outside, {**route, "rank": 0}, None) == 403
            assert await put(port, HOST, route, None) == 200
            assert await put(port, HOST, {**route, "rank": 0}, None) == 409
            assert await client.get_route(HOST, port, 5) == own
        finally:
            await open_server.stop()
            await client.close()

    asyncio.run(run())


# --- forged pool offers ------------------------------------------------------------------------------------


def _kv() -> torch.Tensor:
    return torch.zeros(3, 2, NUM_PAGES, 4, 2, 8, dtype=torch.bfloat16)


def _file_offer(fd: int, kv: torch.Tensor, **changes: object) -> PoolOffer:
    st = os.fstat(fd)
    offer = PoolOffer(
        "shm",
        boot_id(),
        NUM_PAGES,
        kv.numel() * kv.element_size(),
        0,
        pid=os.getpid(),
        fd=fd,
        file_id=[st.st_dev, st.st_ino],
    )
    return replace(offer, **changes)  # type: ignore[arg-type]


def test_open_pool_maps_only_what_the_offer_claims(tmp_path) -> None:
    kv = _kv()
    nbytes = kv.numel() * kv.element_size()
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"\xaa" * nbytes)
    fd = os.open(victim, os.O_RDWR)
    try:
        with pytest.raises(PeerPoolError, match="not a shared-memory object") as e:
            open_pool(_file_offer(fd, kv), kv)
        assert not e.value.benign
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"\xaa" * nbytes

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        offer = PoolOffer("shm", boot_id(), NUM_PAGES, nbytes, pid=os.getpid(), fd=rfd, file_id=[0, 0])
        with pytest.raises(PeerPoolError, match="not a regular file"):  # refused without opening it
            open_pool(offer, kv)
    finally:
        os.close(rfd)

    good = _kv()
    real = PoolOffer.from_dict(export_pool(good).to_dict())  # torch's shared memory: /dev/shm, unlinked
    pool = open_pool(real, kv)
    pool.target[:, :, 3] = 2.0
    assert (good[:, :, 3] == 2.0).all()
    pool.close()
    with pytest.raises(PeerPoolError, match="file id differs"):
        open_pool(replace(real, file_id=[real.file_id[0], real.file_id[1] + 1]), kv)
    with pytest.raises(PeerPoolError, match="pages need"):
        open_pool(replace(real, nbytes=real.nbytes * 2), kv)
    with pytest.raises(PeerPoolError, match="bytes; the offered pool needs"):  # past the end of the object
        open_pool(replace(real, offset=real.nbytes, nbytes=real.nbytes), kv)
    with pytest.raises(PeerPoolError, match="not aligned"):
        open_pool(replace(real, offset=1), kv)
    with pytest.raises(PeerPoolError, match="another host") as e:
        open_pool(replace(real, boot_id="elsewhere"), kv)
    assert e.value.benign
    with pytest.raises(PeerPoolError, match="unknown pool kind"):
        open_pool(replace(real, kind="nfs"), kv)
    for bad in (
        {**real.to_dict(), "fd": "3"},
        {**real.to_dict(), "num_pages": True},
        {**real.to_dict(), "evil": 1},
        {**real.to_dict(), "file_id": ["a", 1]},
        {**real.to_dict(), "offset": -4096},
        [1, 2],
    ):
        with pytest.raises(PeerPoolError):
            PoolOffer.from_dict(bad)


def test_a_memfd_pool_is_accepted(tmp_path) -> None:
    kv = _kv()
    nbytes = kv.numel() * kv.element_size()
    fd = os.memfd_create("kv-pool")
    try:
        os.ftruncate(fd, nbytes)
        pool = open_pool(_file_offer(fd, kv), kv)
        pool.target[:, :, 1] = 1.5
        pool.close()
        page = 4 * 2 * 8 * 2  # bytes of one page of one layer and K or V
        assert (
            torch.frombuffer(bytearray(os.pread(fd, page, page)), dtype=torch.bfloat16).eq(1.5).all()
        )  # layer 0 K page 1
        assert stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def test_a_forged_offer_naming_a_file_falls_back_to_data_messages(engines: Engines, tmp_path) -> None:
    p, pkv = engines.prefill()
    d, dkv = engines.decode()
    victim = tmp_path / "victim.bin"
    content = os.urandom(dkv.numel() * dkv.element_size())
    victim.write_bytes(content)
    fd = os.open(victim, os.O_RDWR)
    try:
        # Fault injection on a private attribute: D (or anyone reaching P's UCX worker) offers a file on disk.
        d._offer = _file_offer(fd, dkv).to_dict()  # type: ignore[attr-defined]
        port = p.bootstrap_port  # type: ignore[attr-defined]
        p.poll(4)
        d.register(4, HOST, port, [6, 7])
        p.send(4, [1, 2], 0, True, aux(4))
        wait_until(settled((p, 4), (d, 4)), 15, "room 4")
        assert p.poll(4) == d.poll(4) == KVPoll.Success, (p.failure(4), d.failure(4))
        assert p.stats(4).path == d.stats(4).path == "ucx"
        assert torch.equal(dkv[:, :, [6, 7]], pkv[:, :, [1, 2]])
    finally:
        os.close(fd)
    assert victim.read_bytes() == content, "P must never write into the offered file"


# --- where UCX listens -------------------------------------------------------------------------------------


def test_net_devices_follow_the_data_host() -> None:
    assert net_devices_for("127.0.0.1") == "lo"
    assert net_devices_for("localhost") == "lo"
    assert net_devices_for("0.0.0.0") is None and net_devices_for("::") is None
    assert net_devices_for("203.0.113.77") is None  # not an address of this host: UCX's default, with a warning
    outside = outward_address()
    assert outside != "0.0.0.0"
    if outside != "127.0.0.1":
        assert net_devices_for(outside) not in (None, "lo")


def test_a_loopback_data_host_listens_on_loopback_only(engines: Engines) -> None:
    p, _ = engines.prefill(data_host="127.0.0.1")
    d, _ = engines.decode()
    assert p.runtime.net_devices == "lo"  # type: ignore[attr-defined]
    port = p.bootstrap_port  # type: ignore[attr-defined]
    p.poll(9)
    d.register(9, HOST, port, [2])
    p.send(9, [3], 0, True, aux(9))
    wait_until(settled((p, 9), (d, 9)), 15, "room 9")
    assert d.poll(9) == KVPoll.Success
    addrs = listening_tcp([os.getpid()])
    assert ("127.0.0.1", port) in addrs
    assert {a for a, _ in addrs} <= {"127.0.0.1", "::1"}, addrs
