"""The worker's side of the cluster secret: bootstrap tokens at the HTTP edge, the secret's flag/env and its
masking, signed registrations, and one request per room (a second live request with the room is refused)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import pytest
from aiohttp import web

from pd_common.cluster_auth import ENV_VAR, ClusterKey, body_digest
from sglang_pd.cli_args import parse_server_args
from sglang_pd.disagg.bootstrap_info import (
    BootstrapAuthError,
    BootstrapInfo,
    attach_bootstrap,
    parse_bootstrap,
)
from sglang_pd.disagg.live_rooms import LiveRooms
from sglang_pd.server.errors import APIError
from sglang_pd.server_args import ServerArgs

KEY = ClusterKey(b"k" * 32)
OTHER = ClusterKey(b"o" * 32)


def signed(
    host: str = "10.0.0.1", port: int = 8998, room: object = 12345, key: ClusterKey = KEY, **extra: object
) -> dict:
    body = {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room, **extra}
    body["bootstrap_token"] = key.sign("bootstrap", [host, port, room])
    return body


def test_a_valid_token_passes_and_covers_every_item() -> None:
    assert parse_bootstrap(signed(), 1, KEY) == [BootstrapInfo("10.0.0.1", 8998, 12345)]
    assert parse_bootstrap(signed(room=[5, 9]), 2, KEY) == [
        BootstrapInfo("10.0.0.1", 8998, 5),
        BootstrapInfo("10.0.0.1", 8998, 9),
    ]
    assert [i.room for i in parse_bootstrap(signed(room=7), 3, KEY)] == [7, 8, 9]  # room + k, signed once


@pytest.mark.parametrize("change", ["bootstrap_host", "bootstrap_port", "bootstrap_room"])
def test_any_altered_field_is_refused(change: str) -> None:
    body = signed()
    body[change] = {"bootstrap_host": "10.6.6.6", "bootstrap_port": 6666, "bootstrap_room": 12346}[change]
    with pytest.raises(BootstrapAuthError, match="does not match"):
        parse_bootstrap(body, 1, KEY)


def test_missing_malformed_foreign_and_expired_tokens_are_refused() -> None:
    unsigned = {"bootstrap_host": "10.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 1}
    with pytest.raises(BootstrapAuthError, match="missing bootstrap token"):
        parse_bootstrap(unsigned, 1, KEY)
    for token in ("garbage", "12.", 17, ""):
        with pytest.raises(BootstrapAuthError):
            parse_bootstrap({**unsigned, "bootstrap_token": token}, 1, KEY)
    with pytest.raises(BootstrapAuthError, match="does not match"):
        parse_bootstrap(signed(key=OTHER), 1, KEY)
    old = {
        "bootstrap_host": "h",
        "bootstrap_port": 1,
        "bootstrap_room": 2,
        "bootstrap_token": KEY.sign("bootstrap", ["h", 1, 2], ttl_s=1, now=time.time() - 3600),
    }
    with pytest.raises(BootstrapAuthError, match="expired"):
        parse_bootstrap(old, 1, KEY)
    # a token for another purpose (e.g. a captured registration signature) does not pass either
    body = {**unsigned, "bootstrap_token": KEY.sign("register", ["10.0.0.1", 8998, 1])}
    with pytest.raises(BootstrapAuthError, match="does not match"):
        parse_bootstrap(body, 1, KEY)


@dataclass(frozen=True)
class Item:
    bootstrap: BootstrapInfo | None = None


def test_field_errors_stay_400_and_auth_errors_become_403() -> None:
    items = [Item()]
    with pytest.raises(APIError) as e:
        attach_bootstrap(items, {"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 2}, KEY)
    assert e.value.status == 403 and e.value.param == "bootstrap_token" and "router" in e.value.message
    with pytest.raises(ValueError, match="bootstrap_port"):  # not an auth problem: the caller's 400
        attach_bootstrap(items, {"bootstrap_host": "h", "bootstrap_port": "x", "bootstrap_room": 2}, KEY)
    out = attach_bootstrap([Item()], signed(), KEY)
    assert out[0].bootstrap == BootstrapInfo("10.0.0.1", 8998, 12345)
    # no key: the fields are taken as they come (a token, if any, is ignored); none at all: None
    assert parse_bootstrap({"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 2}, 1) == [
        BootstrapInfo("h", 1, 2)
    ]
    assert parse_bootstrap({}, 2, KEY) == [None, None]


def test_secret_from_flag_or_env_never_printed(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    secret = tmp_path / "secret"
    secret.write_text("s" * 40 + "\n")
    args = parse_server_args(
        ["--model-path", "m", "--disaggregation-mode", "decode", "--cluster-secret-file", str(secret)]
    )
    key = args.cluster_key()
    assert key is not None and key.secret == b"s" * 40
    assert args.bootstrap_key() is key
    assert "s" * 40 not in repr(key) + json.dumps(args.public_dict()) + repr(args)
    assert args.public_dict()["cluster_secret_file"] == "***"
    assert ServerArgs(model_path="m", cluster_secret_file=str(secret)).bootstrap_key() is None  # colocated: no check
    assert ServerArgs(model_path="m", disaggregation_mode="prefill").cluster_key() is None
    monkeypatch.setenv(ENV_VAR, "e" * 20)
    assert ServerArgs(model_path="m").cluster_key() == ClusterKey(b"e" * 20)
    short = tmp_path / "short"
    short.write_text("tiny")
    with pytest.raises(SystemExit) as exit_info:
        parse_server_args(["--model-path", "m", "--cluster-secret-file", str(short)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        parse_server_args(["--model-path", "m", "--cluster-secret-file", str(tmp_path / "missing")])


def test_data_host_defaults_to_host() -> None:
    assert ServerArgs(model_path="m", host="10.1.2.3").data_host == "10.1.2.3"
    assert ServerArgs(model_path="m", host="0.0.0.0", disaggregation_data_host="10.9.9.9").data_host == "10.9.9.9"
    args = parse_server_args(["--model-path", "m", "--disaggregation-data-host", "127.0.0.1"])
    assert args.disaggregation_data_host == "127.0.0.1"


def test_registration_is_signed_over_the_bytes_sent(tmp_path, monkeypatch) -> None:
    from sglang_pd.server import registration

    monkeypatch.delenv(ENV_VAR, raising=False)
    secret = tmp_path / "secret"
    secret.write_text("r" * 32)
    seen: list[tuple[str, str, bytes, dict]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, await request.read(), dict(request.headers)))
        return web.json_response({}, status=201 if request.method == "POST" else 200)

    async def run() -> None:
        app = web.Application()
        app.router.add_route("*", "/workers", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            args = ServerArgs(
                model_path="m",
                disaggregation_mode="prefill",
                port=31000,
                cluster_secret_file=str(secret),
                register_with=f"http://127.0.0.1:{port}",
            )
            assert await registration.register(args)
            await registration.deregister(args)
        finally:
            await runner.cleanup()

    asyncio.run(run())
    key = ClusterKey(b"r" * 32)
    (_, _, post_body, post_headers), (_, _, _, del_headers) = seen
    assert [(m, path) for m, path, _, _ in seen] == [("POST", "/workers"), ("DELETE", "/workers")]
    assert json.loads(post_body) == {"url": "http://127.0.0.1:31000", "role": "prefill", "bootstrap_port": 8998}
    key.verify("register", body_digest("POST", "/workers", post_body), post_headers["X-SGLang-PD-Signature"])
    # a withdrawal is signed over the worker it names (the decoded query), so its token removes no other worker
    key.verify(
        "register",
        body_digest("DELETE", "/workers?url=http://127.0.0.1:31000", b""),
        del_headers["X-SGLang-PD-Signature"],
    )
    with pytest.raises(ValueError):  # signed over the body: another body does not verify
        key.verify("register", body_digest("POST", "/workers", post_body + b" "), post_headers["X-SGLang-PD-Signature"])


def test_worker_url_never_advertises_a_wildcard() -> None:
    from sglang_pd.server.registration import worker_url

    url = worker_url(ServerArgs(model_path="m", host="0.0.0.0", port=30001))
    assert "0.0.0.0" not in url and url.endswith(":30001")
    assert worker_url(ServerArgs(model_path="m", host="127.0.0.1", port=30001)) == "http://127.0.0.1:30001"


class FakeReq:
    def __init__(self, room: int | None) -> None:
        self.bootstrap = None if room is None else BootstrapInfo("h", 1, room)
        self.finished = False


def test_one_live_request_per_room() -> None:
    held: set[int] = set()
    rooms = LiveRooms(held.__contains__, sweep_at=4)
    first, second = FakeReq(7), FakeReq(7)
    assert rooms.claim(first) is None
    assert "already in use" in (rooms.claim(second) or "")  # a live duplicate: refused, the first untouched
    first.finished = True
    held.add(7)  # finished (answered) but the engine still holds the room: D's pages may still be written
    assert rooms.claim(second) is not None
    held.discard(7)
    assert rooms.claim(second) is None  # released: the room is free again
    assert rooms.claim(FakeReq(None)) is None  # a local request (no room) is never refused
    held.add(99)
    assert rooms.claim(FakeReq(99)) is not None  # held by the engine without a known request
    for r in range(20):  # finished, released requests are swept
        done = FakeReq(1000 + r)
        assert rooms.claim(done) is None
        done.finished = True
    assert len(rooms._rooms) < 20
