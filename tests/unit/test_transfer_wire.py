"""The bootstrap server/client over real HTTP, and the wire messages' encoding and framing."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from transfer.bootstrap import BootstrapClient, BootstrapError, BootstrapServer, Route
from transfer.protocol import (
    CTRL_FRAME_BYTES,
    FRAME_HEADER,
    LINK_ID_BITS,
    MAX_HELLO_BYTES,
    MESSAGE_TYPES,
    Abort,
    AbortAck,
    Close,
    Data,
    Done,
    Fail,
    Hello,
    HelloOk,
    HelloRefused,
    Message,
    Pushed,
    Register,
    Registered,
    accept_tag,
    ctrl_tag,
    data_tag,
    decode,
    decode_hello,
    encode,
    encode_hello,
    frame,
    hello_payload,
)

pytestmark = pytest.mark.timeout(30)


def test_bootstrap_server_and_client() -> None:
    async def run() -> None:
        server = BootstrapServer("127.0.0.1", 0)
        port = await server.start()
        client = BootstrapClient()
        try:
            assert port > 0
            assert await client.health("127.0.0.1", port, timeout=5)
            with pytest.raises(BootstrapError, match="404"):
                await client.get_route("127.0.0.1", port, timeout=5)
            server.set_route(Route("10.0.0.1", "ab01", 77, {"dtype": "bfloat16"}, prefill_id="p0"))
            route = await client.get_route("127.0.0.1", port, timeout=5)
            assert route == Route("10.0.0.1", "ab01", 77, {"dtype": "bfloat16"}, 0, "p0")
            assert route.worker_address == b"\xab\x01" and not route.auth
            async with aiohttp.ClientSession() as s:  # another rank announces itself (loopback: no secret needed)
                async with s.put(
                    f"http://127.0.0.1:{port}/route", json={"rank": 1, "host": "h", "address": "0909", "accept_id": 9}
                ) as r:
                    assert r.status == 200
                async with s.put(f"http://127.0.0.1:{port}/route", json={"rank": 2}) as r:
                    assert r.status == 400
                async with s.put(
                    f"http://127.0.0.1:{port}/route",  # rank 0 is the server's own
                    json={"rank": 0, "host": "evil", "address": "00", "accept_id": 1},
                ) as r:
                    assert r.status == 409
                async with s.get(f"http://127.0.0.1:{port}/route?rank=x") as r:
                    assert r.status == 400
            assert (await client.get_route("127.0.0.1", port, timeout=5, rank=1)).accept_id == 9
            assert (await client.get_route("127.0.0.1", port, timeout=5)).host == "10.0.0.1"
        finally:
            await server.stop()
        assert not await client.health("127.0.0.1", port, timeout=1)  # nothing listens any more
        with pytest.raises(BootstrapError, match="failed"):
            await client.get_route("127.0.0.1", port, timeout=1)
        await client.close()

    asyncio.run(run())


def test_bootstrap_port_in_use_is_a_clear_error() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(OSError, match="bootstrap server cannot bind"):
            asyncio.run(BootstrapServer("127.0.0.1", taken.getsockname()[1]).start())
    finally:
        taken.close()


def test_every_message_round_trips() -> None:
    msgs: list[Message] = [
        Hello({"dtype": "bfloat16", "num_layers": 2}, "d1"),
        HelloOk("p1"),
        HelloRefused("mismatch"),
        Register(2**63 - 1, 12),
        Registered(5),
        Data(5, 7, 0, 3, 3 << 20),
        Done(5),
        Fail(5, "why"),
        Abort(5, "client gone"),
        Data(5, 8, 3, 1, 1 << 20, 4, {"first_token_id": 3, "output_top_logprobs": [[[-0.1, 3, None]]]}),
        Data(5, -1, 4, 0, 0, 4, {"first_token_id": 3}),
        Hello(
            {},
            "d2",
            {"kind": "shm", "boot_id": "b", "num_pages": 9, "nbytes": 1 << 30, "handle": bytes(64)},
            (1 << LINK_ID_BITS) - 1,
            b"\x00addr\xff",
            "123.abc",
        ),
        HelloOk("p2", True, [bytes(64), bytes(range(64))]),
        Register(6, 3, [7, 2, 9]),
        Pushed(6, 0, 3, event=5),
        Pushed(6, 3, 0, 3, {"first_token_id": 1}),
        AbortAck(6),
        Close("bye"),
    ]
    assert {type(m) for m in msgs} == set(MESSAGE_TYPES)
    for m in msgs:
        assert decode(encode(m)) == m
    with pytest.raises(ValueError, match="malformed"):
        decode(b"\x93\x63\x01\x02")
    with pytest.raises(ValueError, match="malformed Done"):  # a peer's wrong field count: ValueError, not TypeError
        decode(encode(Fail(1, "x")).replace(b"\x93\x07", b"\x93\x06", 1))


def test_hello_travels_as_one_bounded_message() -> None:
    hello = Hello({"dtype": "bf16"}, "d1", None, 5, b"\x01\x02", "tok")
    assert decode_hello(encode_hello(hello) + bytes(100)) == hello  # P's buffer is larger than the message
    with pytest.raises(ValueError, match="exceeds"):
        encode_hello(Hello({}, "d", None, 5, bytes(MAX_HELLO_BYTES)))
    for bad in (Hello({}, "d", None, 1 << LINK_ID_BITS, b"a"), Hello({}, "d", None, 5, b""), HelloOk("p")):
        with pytest.raises(ValueError):
            decode_hello(FRAME_HEADER.pack(len(encode(bad))) + encode(bad))
    with pytest.raises(ValueError, match="claims"):
        decode_hello(FRAME_HEADER.pack(10_000) + encode(hello))
    # the token signs every other field; bytes are signed as hex, so the payload is canonical JSON
    payload = hello_payload(hello)
    assert payload == [{"dtype": "bf16"}, "d1", None, 5, "hex:0102"]
    assert hello_payload(Hello({"dtype": "bf16"}, "d1", None, 5, b"\x01\x03")) != payload
    assert accept_tag(5) not in {ctrl_tag(5, True), ctrl_tag(5, False), data_tag(5, 0)}


def test_frames_inline_small_payloads_and_split_large_ones() -> None:
    small = encode(Done(1))
    first, rest = frame(small)
    assert rest is None and FRAME_HEADER.unpack_from(first)[0] == len(small) and first[FRAME_HEADER.size :] == small
    big = encode(Data(1, 0, 0, 1, 64, 1, {"input_token_logprobs": [[-1.0, i, None] for i in range(2000)]}))
    assert len(big) > CTRL_FRAME_BYTES
    first, rest = frame(big)
    assert rest == big and FRAME_HEADER.unpack_from(first)[0] == len(big) and len(first) == FRAME_HEADER.size
    assert not Data(1, 0, 0, 1, 64).last and Data(1, 0, 0, 1, 64, 1, {}).last


def test_tags_name_their_link_direction_and_sequence() -> None:
    links = [0, 1, 12345, (1 << LINK_ID_BITS) - 1]
    tags = [ctrl_tag(link, to) for link in links for to in (True, False)]
    tags += [data_tag(link, seq) for link in links for seq in range(500)]
    assert len(set(tags)) == len(tags) and all(0 <= t < 1 << 64 for t in tags)
    assert data_tag(7, 1 << 22) == data_tag(7, 0)  # sequence numbers wrap (far beyond what is in flight)
    with pytest.raises(ValueError, match="link id"):
        ctrl_tag(1 << LINK_ID_BITS, True)
