"""PD control-plane security on a real signed cluster (1 P + 1 D + router, UCX over TCP/shm on loopback):
a client cannot take a live request's room, make D dial a host of its choosing, rewrite P's route, get P
to write KV into a file, or reach any worker socket off loopback (README "Security", issue 19 item 3)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from cluster import Cluster
from transfer_testing import listening_tcp, process_tree

from pd_common.cluster_auth import ClusterKey, body_digest, load_cluster_key

PAGE = ("--page-size", "4", "--chunked-prefill-size", "16")
ROUTER = ("--policy", "round_robin", "--health-check-interval-secs", "0.5", "--health-success-threshold", "1")
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPT = [5, 17, 93, 4, 250, 31, 8, 77, 140, 66, 12, 9, 301, 45]

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    c = Cluster(tiny_llama, 1, 1, worker_args=PAGE, router_args=ROUTER)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def key(cluster) -> ClusterKey:
    path = cluster.info.get("cluster_secret_file")
    assert path, "deploy/local_cluster.py runs clusters signed by default"
    k = load_cluster_key(secret_file=path)
    assert k is not None
    return k


@pytest.fixture(scope="module")
def boot_port(cluster) -> int:
    return int(
        requests.get(cluster.prefill[0] + "/get_server_info", timeout=10).json()["disaggregation_bootstrap_port"]
    )


def bootstrap(key: ClusterKey | None, host: str, port: int, room: int) -> dict:
    fields = {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room}
    if key is not None:
        fields["bootstrap_token"] = key.sign("bootstrap", [host, port, room])
    return fields


def post(url: str, body: dict, timeout: float = 60) -> requests.Response:
    return requests.post(url + "/generate", json=body, timeout=timeout)


def transfer_queue(url: str) -> int:
    disagg = requests.get(url + "/get_server_info", timeout=5).json()["scheduler"]["disagg"]
    return int(disagg.get("num_decode_transfer_queue_reqs", 0))


def test_a_live_request_room_cannot_be_taken(cluster, key, boot_port) -> None:
    p_url, d_url = cluster.prefill[0], cluster.decode[0]
    room = random.randrange(1 << 62)
    legit = {"input_ids": PROMPT, "sampling_params": GREEDY, **bootstrap(key, "127.0.0.1", boot_port, room)}
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        d_leg = ex.submit(post, d_url, {**legit, "rid": f"legit-d-{room}"})  # D registers, waits for P's KV
        deadline = time.monotonic() + 30
        while transfer_queue(d_url) < 1:
            assert time.monotonic() < deadline, "D never registered the legitimate room"
            time.sleep(0.05)
        evil = {"input_ids": [7, 7, 7], "sampling_params": GREEDY, "rid": f"evil-{room}"}
        # 1. the live room without a token: refused at the edge
        r = post(d_url, {**evil, **bootstrap(None, "127.0.0.1", boot_port, room)})
        assert r.status_code == 403 and "bootstrap_token" in r.text, r.text
        # 2. the legitimate request's own token replayed (a captured one): D holds the room, so the copy fails
        r = post(d_url, {**evil, **bootstrap(key, "127.0.0.1", boot_port, room)})
        assert r.status_code == 409 and "already in use" in r.json()["error"]["message"], r.text
        # 3. a token for another room does not cover this one
        other = bootstrap(key, "127.0.0.1", boot_port, room + 1)
        r = post(
            d_url,
            {**evil, **bootstrap(None, "127.0.0.1", boot_port, room), "bootstrap_token": other["bootstrap_token"]},
        )
        assert r.status_code == 403, r.text
        p_out = post(p_url, {**legit, "rid": f"legit-p-{room}"}).json()
        d_out = d_leg.result(timeout=60).json()
    assert d_out["meta_info"]["finish_reason"]["type"] == "length", d_out
    reference = post(
        cluster.url, {"input_ids": PROMPT, "sampling_params": GREEDY}
    ).json()  # a fresh room, via the router
    assert d_out["output_ids"] == reference["output_ids"], "the legitimate request's output changed"
    assert p_out["output_ids"] == d_out["output_ids"][:1]


class Stranger:
    """A TCP listener that records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def test_decode_never_dials_a_host_that_was_not_signed(cluster, key, boot_port, tiny_llama) -> None:
    stranger = Stranger()
    try:
        room = random.randrange(1 << 62)
        base = {"input_ids": PROMPT, "sampling_params": GREEDY}
        unsigned = bootstrap(None, "127.0.0.1", stranger.port, room)
        foreign = bootstrap(ClusterKey(b"f" * 32), "127.0.0.1", stranger.port, room)
        swapped = {**unsigned, "bootstrap_token": bootstrap(key, "127.0.0.1", boot_port, room)["bootstrap_token"]}
        for fields in (unsigned, foreign, swapped):
            for url in (cluster.decode[0], cluster.prefill[0]):
                r = post(url, {**base, **fields})
                assert r.status_code == 403, r.text
        r = requests.post(
            cluster.decode[0] + "/v1/completions",
            json={"model": tiny_llama, "prompt": PROMPT, "max_tokens": 4, **unsigned},
            timeout=30,
        )
        assert r.status_code == 403, r.text
        time.sleep(0.5)
        assert stranger.connections == 0, "a decode worker dialed a host nobody signed"
    finally:
        stranger.close()
    assert transfer_queue(cluster.decode[0]) == 0


def test_put_route_needs_a_signature(cluster, key, boot_port) -> None:
    url = f"http://127.0.0.1:{boot_port}/route"
    before = requests.get(url, timeout=5).json()
    assert before["auth"] is True
    hijack = json.dumps({"rank": 0, "host": "10.66.66.66", "address": "00", "accept_id": 1}).encode()
    r = requests.put(url, data=hijack, headers={"Content-Type": "application/json"}, timeout=5)
    assert r.status_code == 401, r.text
    forged = ClusterKey(b"z" * 32).sign("route", body_digest("PUT", "/route", hijack))
    r = requests.put(url, data=hijack, headers={"X-SGLang-PD-Signature": forged}, timeout=5)
    assert r.status_code == 401, r.text
    signed = key.sign("route", body_digest("PUT", "/route", hijack))
    r = requests.put(url, data=hijack, headers={"X-SGLang-PD-Signature": signed}, timeout=5)
    assert r.status_code == 409, r.text  # even a cluster member cannot replace P's own rank
    assert requests.get(url, timeout=5).json() == before
    out = post(cluster.url, {"input_ids": PROMPT, "sampling_params": GREEDY}).json()  # new links still work
    assert out["meta_info"]["finish_reason"]["type"] == "length", out


def test_a_forged_pool_offer_is_not_mapped(cluster, key, boot_port, tmp_path) -> None:
    """A decode engine in this process, holding the secret, offers P a file on disk as its 'shared-memory pool'."""
    import torch

    from transfer import create_transfer
    from transfer.base import DecodeTransfer, EngineDescription, KVPoll
    from transfer.bootstrap import Route
    from transfer.config import TransferConfig
    from transfer.peer_pool import PoolOffer, boot_id

    route = Route.from_json(requests.get(f"http://127.0.0.1:{boot_port}/route", timeout=5).json())
    desc = EngineDescription(**route.engine)
    num_pages = 16
    kv = torch.zeros(
        desc.num_layers,
        2,
        num_pages,
        desc.page_size,
        desc.num_kv_heads,
        desc.head_dim,
        dtype=getattr(torch, desc.dtype),
    )
    victim = tmp_path / "victim.bin"
    content = os.urandom(kv.numel() * kv.element_size())
    victim.write_bytes(content)
    fd = os.open(victim, os.O_RDWR)
    st = os.fstat(fd)
    d = create_transfer(
        "decode", "ucx", kv, desc, TransferConfig(), "127.0.0.1", 0, data_host="127.0.0.1", cluster_key=key
    )
    assert isinstance(d, DecodeTransfer)
    try:
        d.start()
        # Fault injection on a private attribute: the offer names our file, with its true pid/fd/size/id.
        d._offer = PoolOffer(
            "shm",
            boot_id(),
            num_pages,
            len(content),
            0,
            pid=os.getpid(),
            fd=fd,  # type: ignore[attr-defined]
            file_id=[st.st_dev, st.st_ino],
        ).to_dict()
        room = random.randrange(1 << 62)
        pages = list(range(2, 2 + -(-len(PROMPT) // desc.page_size)))
        d.register(room, "127.0.0.1", boot_port, pages)
        p_out = post(
            cluster.prefill[0],
            {"input_ids": PROMPT, "sampling_params": GREEDY, **bootstrap(key, "127.0.0.1", boot_port, room)},
        ).json()
        deadline = time.monotonic() + 30
        while d.poll(room) not in (KVPoll.Success, KVPoll.Failed):
            assert time.monotonic() < deadline, "the forged link's room never settled"
            time.sleep(0.01)
        assert d.poll(room) == KVPoll.Success, d.failure(room)
        assert d.stats(room).path == "ucx", "P must fall back to UCX data messages"
        got = d.aux(room)
        assert got is not None and got.first_token_id == p_out["output_ids"][0]
        assert kv[:, :, pages].abs().sum() > 0  # the KV arrived as data messages, into our own pool
    finally:
        d.shutdown()
        os.close(fd)
    assert victim.read_bytes() == content, "P wrote into a file it was offered"
    log = (Path(cluster.info["log_dir"]) / "prefill0.log").read_text(errors="replace")
    assert "not a shared-memory object" in log


def test_a_loopback_worker_listens_on_loopback_only(cluster) -> None:
    workers = [
        pid
        for pid in process_tree(cluster.proc.pid)
        if b"sglang_pd.launch_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 2
    pids = [pid for w in workers for pid in process_tree(w)]  # main, scheduler and detokenizer processes
    addrs = listening_tcp(pids)
    ports = {port for _, port in addrs}
    assert {int(u.rsplit(":", 1)[1]) for u in cluster.prefill + cluster.decode} <= ports
    assert len(addrs) >= 5, addrs  # 2 HTTP, P's bootstrap server, UCX's TCP transport of P and D
    assert {a for a, _ in addrs} <= {"127.0.0.1", "::1"}, f"worker sockets off loopback: {sorted(addrs)}"


def test_a_worker_started_later_joins_with_the_cluster_secret(cluster, key, tiny_llama) -> None:
    """What a runtime-registered worker needs on a signed cluster: the secret (here the same file)."""
    from server_process import ServerProcess

    extra = ServerProcess(
        tiny_llama,
        *PAGE,
        "--disaggregation-mode",
        "decode",
        "--register-with",
        cluster.url,
        "--cluster-secret-file",
        cluster.info["cluster_secret_file"],
    )
    try:
        deadline = time.monotonic() + 30
        while extra.url not in [w["url"] for w in requests.get(cluster.url + "/workers", timeout=5).json()["workers"]]:
            assert time.monotonic() < deadline, "the signed registration was not accepted"
            time.sleep(0.2)
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            outs = list(
                ex.map(lambda _: post(cluster.url, {"input_ids": PROMPT, "sampling_params": GREEDY}).json(), range(4))
            )
        assert len({tuple(o["output_ids"]) for o in outs}) == 1 and len(outs[0]["output_ids"]) == 12, outs
        assert "direct copies into our KV pool" in extra.logs(), "the new decode worker never linked with P"
    finally:
        extra.stop()
