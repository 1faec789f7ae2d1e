"""Issue 19, router side, with real processes: the router (``python -m router.launch_router``) in front
of mock worker processes that speak the worker's HTTP.

- A hypothesis fuzz of request bodies (native /generate, /v1/completions, /v1/chat/completions)
  against a live PD router with a cluster secret: every answer is 2xx or a 4xx JSON envelope, no
  traceback in the router's log, the router healthy after.
- /health_generate 100 times in a row and 100 requests a worker answers 400 leave every breaker
  closed and the cluster serving; the workers saw signed bootstrap fields only.
- A prefill worker killed and restarted on its port is routable again within seconds (the breaker's
  60 s timeout is not waited for).
- Management routes from a non-loopback caller: 403 without an admin key; with one (from the
  environment) the inference key gets 403 and the admin key works; a worker signing its
  registration with the cluster secret is admitted.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from router_support.harness import non_loopback_ip
from router_support.mock_worker import MockProcess
from router_support.procs import RouterProcess

from pd_common.cluster_auth import UNSIGNED_WARNING, ClusterKey, body_digest

pytestmark = pytest.mark.timeout(120)
SECRET = b"e2e-cluster-secret-0123456789"
FAST = (
    "--health-check-interval-secs",
    "0.2",
    "--health-failure-threshold",
    "2",
    "--health-success-threshold",
    "2",
    "--retry-initial-backoff-ms",
    "1",
    "--retry-max-backoff-ms",
    "5",
    "--log-level",
    "info",
)
MOCK_PD_PROBLEMS = ("needs a scalar", "exactly one choice", "bad bootstrap_room")  # the router must never cause these


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def workers(router: RouterProcess, **kw: Any) -> dict[str, dict[str, Any]]:
    return {w["url"]: w for w in requests.get(router.url + "/workers", timeout=5, **kw).json()["workers"]}


def mock_calls(mock: MockProcess) -> list[dict[str, Any]]:
    return requests.get(mock.url + "/_mock/calls", timeout=5).json()["calls"]


def no_traceback(router: RouterProcess) -> None:
    log = router.logs(tail=None)
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("secret") / "cluster.secret"
    path.write_bytes(SECRET)
    return str(path)


@pytest.fixture(scope="module")
def pd_cluster(secret_file):
    """Two mock prefill + one mock decode process behind a real PD router holding the cluster secret."""
    procs = [
        MockProcess("--role", "prefill", "--name", "p0"),
        MockProcess("--role", "prefill", "--name", "p1"),
        MockProcess("--role", "decode", "--name", "d"),
    ]
    router = None
    try:
        router = RouterProcess(
            "--pd-disaggregation",
            "--prefill",
            procs[0].url,
            "9100",
            "--prefill",
            procs[1].url,
            "9101",
            "--decode",
            procs[2].url,
            "--cluster-secret-file",
            secret_file,
            "--policy",
            "round_robin",
            "--cb-failure-threshold",
            "1",  # any worker fault opens it
            "--health-check-timeout-secs",
            "20",  # a slow probe on a busy machine is no failure
            *FAST,
            wait_ready=True,
        )
        yield router, procs
    finally:
        if router is not None:
            router.stop()
        for p in procs:
            p.stop()


# --- the fuzz ----------------------------------------------------------------------------------------
# Two kinds of bodies per route: plausible ones (valid shapes, edge values, integral floats where
# integers go, batches and n > 1 that PD mode splits) that reach the workers, and wild ones (any JSON
# in any field, huge integers, NaN, client-set bootstrap fields) that the router must refuse cleanly.
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
ANY = st.recursive(
    LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)
EDGE_INT = st.one_of(
    st.integers(min_value=-2, max_value=6),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1]),
    st.floats(min_value=-2, max_value=1e20),
)
TOKEN = st.one_of(st.integers(min_value=0, max_value=600), st.integers(min_value=0, max_value=600).map(float))
IDS = st.lists(TOKEN, min_size=1, max_size=5)
BAD_IDS = st.lists(st.one_of(st.integers(min_value=-1, max_value=600), st.just(2**64), st.floats()), max_size=5)
TEXT = st.text(min_size=1, max_size=8)
PROMPT = st.one_of(TEXT, IDS, st.lists(TEXT, min_size=1, max_size=3), st.lists(IDS, min_size=1, max_size=2))
WILD_PROMPT = st.one_of(st.text(max_size=8), BAD_IDS, st.lists(BAD_IDS, max_size=2), ANY)
N = st.one_of(st.integers(min_value=1, max_value=3), st.just(2.0))
BOOTSTRAP = st.dictionaries(
    st.sampled_from(["bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_token"]),
    st.one_of(st.text(max_size=10), EDGE_INT),
    max_size=2,
)


def optional(**fields: Any) -> Any:
    return st.fixed_dictionaries({}, optional=fields)


def merged(*parts: Any) -> Any:
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()})


SAMPLING = optional(
    max_new_tokens=st.one_of(st.integers(min_value=0, max_value=8), st.just(4.0)),
    temperature=st.floats(min_value=0, max_value=2),
    top_p=st.floats(min_value=0.01, max_value=1),
    top_k=st.integers(min_value=-1, max_value=50),
    min_p=st.floats(min_value=0, max_value=1),
    n=N,
    seed=st.integers(min_value=0, max_value=2**63 - 1),
    stop=st.one_of(TEXT, st.lists(TEXT, max_size=2)),
    stop_token_ids=IDS,
    ignore_eos=st.booleans(),
    repetition_penalty=st.floats(min_value=0.1, max_value=2),
)
WILD_SAMPLING = st.dictionaries(
    st.sampled_from(
        [
            "max_new_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "n",
            "seed",
            "stop",
            "stop_token_ids",
            "ignore_eos",
            "repetition_penalty",
        ]
    ),
    st.one_of(EDGE_INT, ANY, BAD_IDS),
    max_size=4,
)
GENERATE = st.one_of(
    merged(
        st.one_of(
            st.fixed_dictionaries({"text": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3))}),
            st.fixed_dictionaries({"input_ids": st.one_of(IDS, st.lists(IDS, min_size=1, max_size=2))}),
        ),
        optional(
            sampling_params=SAMPLING,
            stream=st.booleans(),
            return_logprob=st.booleans(),
            logprob_start_len=st.integers(min_value=-1, max_value=3),
            top_logprobs_num=st.integers(0, 3),
            rid=st.text(min_size=1, max_size=6),
        ),
        BOOTSTRAP,
    ),
    merged(
        optional(
            text=WILD_PROMPT,
            input_ids=WILD_PROMPT,
            sampling_params=st.one_of(WILD_SAMPLING, ANY),
            stream=st.one_of(st.booleans(), ANY),
            return_logprob=st.one_of(st.booleans(), ANY),
            logprob_start_len=EDGE_INT,
            top_logprobs_num=EDGE_INT,
            rid=st.one_of(st.text(max_size=6), ANY),
        ),
        BOOTSTRAP,
    ),
)
OPENAI: dict[str, Any] = {
    "model": st.just("mock-model"),
    "max_tokens": st.integers(min_value=1, max_value=8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "n": N,
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=2)),
    "seed": st.integers(min_value=0, max_value=2**40),
    "top_k": st.integers(min_value=-1, max_value=20),
    "stop_token_ids": IDS,
    "rid": st.text(min_size=1, max_size=6),
}
WILD_OPENAI: dict[str, Any] = {
    "model": ANY,
    "max_tokens": EDGE_INT,
    "temperature": EDGE_INT,
    "top_p": EDGE_INT,
    "n": EDGE_INT,
    "stop": ANY,
    "seed": EDGE_INT,
    "stream": ANY,
    "stream_options": ANY,
    "top_k": EDGE_INT,
    "stop_token_ids": st.one_of(BAD_IDS, ANY),
    "logit_bias": ANY,
    "rid": ANY,
}
STREAMING: Any = st.one_of(
    st.just({}), st.just({"stream": True}), st.just({"stream": True, "stream_options": {"include_usage": True}})
)
COMPLETIONS = st.one_of(
    merged(
        st.fixed_dictionaries({"prompt": PROMPT}),
        optional(echo=st.booleans(), logprobs=st.integers(0, 2), **OPENAI),
        STREAMING,
        BOOTSTRAP,
    ),
    merged(optional(prompt=WILD_PROMPT, echo=ANY, logprobs=EDGE_INT, best_of=EDGE_INT, **WILD_OPENAI), BOOTSTRAP),
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant"]),
        "content": st.one_of(
            TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=1, max_size=2)
        ),
    }
)
CHAT = st.one_of(
    merged(
        st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=3)}),
        optional(logprobs=st.booleans(), max_completion_tokens=st.integers(1, 8), **OPENAI),
        STREAMING,
        BOOTSTRAP,
    ),
    merged(
        optional(
            messages=st.one_of(st.lists(st.one_of(MESSAGE, ANY), max_size=3), ANY),
            logprobs=ANY,
            top_logprobs=EDGE_INT,
            max_completion_tokens=EDGE_INT,
            **WILD_OPENAI,
        ),
        BOOTSTRAP,
    ),
)
RAW = st.one_of(
    st.binary(max_size=40),
    st.just(b"[" * 5000 + b"]" * 5000),
    st.just(b'{"text": "x"' + b"}" * 3),
    st.builds(
        lambda d: b'{"text": "x", "sampling_params": ' + b'{"a": ' * d + b"1" + b"}" * d + b"}",
        st.integers(min_value=30, max_value=3000),
    ),
)


def check(router: RouterProcess, path: str, body: Any, session: requests.Session) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN/Infinity kept: the router must 400
    r = session.post(router.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=30)
    if not (200 <= r.status_code < 300 or 400 <= r.status_code < 500):
        raise AssertionError(
            f"{r.status_code} {r.text[:500]} for {data[:300]!r}; workers: {workers(router)}; "
            f"router log: {router.logs(tail=2000)}"
        )
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["code"] == r.status_code and isinstance(err["message"], str)
        assert not any(p in err["message"] for p in MOCK_PD_PROBLEMS), err
    elif r.headers["Content-Type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n") and '"code": 5' not in r.text, r.text[-500:]
    else:
        r.json()


FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@pytest.mark.parametrize(
    "path,bodies",
    [("/generate", st.one_of(GENERATE, RAW)), ("/v1/completions", COMPLETIONS), ("/v1/chat/completions", CHAT)],
)
def test_fuzzed_bodies_get_2xx_or_a_4xx_envelope_and_no_traceback(pd_cluster, path, bodies):
    router, _ = pd_cluster
    with requests.Session() as session:

        @FUZZ
        @given(body=bodies)
        def one(body: Any) -> None:
            check(router, path, body, session)

        one()
    assert requests.get(router.url + "/health", timeout=5).status_code == 200
    assert all(w["circuit_state"] == "closed" and w["available"] for w in workers(router).values())
    no_traceback(router)


# --- health_generate, client errors, signed fields -------------------------------------------------------
def test_health_generate_and_client_errors_100_times_leave_the_cluster_serving(pd_cluster):
    router, (p0, p1, d) = pd_cluster
    for mock in (p0, p1, d):
        requests.post(mock.url + "/_mock/knobs", json={"reset_calls": True}, timeout=5)
    for _ in range(100):
        r = requests.get(router.url + "/health_generate", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok"
    requests.post(p0.url + "/_mock/knobs", json={"fail_first": 100, "fail_status": 400}, timeout=5)
    requests.post(p1.url + "/_mock/knobs", json={"fail_first": 100, "fail_status": 400}, timeout=5)
    requests.post(d.url + "/_mock/knobs", json={"latency_ms": 20}, timeout=5)  # D answers after P, as a real one
    with requests.Session() as s:
        for _ in range(100):
            r = s.post(
                router.url + "/generate", json={"text": "poison", "sampling_params": {"max_new_tokens": 2}}, timeout=30
            )
            assert r.status_code == 400 and "injected failure" in r.json()["error"]["message"]
    for mock in (p0, p1, d):
        requests.post(mock.url + "/_mock/knobs", json={"latency_ms": 0, "fail_first": 0}, timeout=5)
    assert sum(len([c for c in mock_calls(p) if c["path"] == "/generate"]) for p in (p0, p1)) == 200  # no retries
    assert all(w["circuit_state"] == "closed" and w["available"] for w in workers(router).values())
    r = requests.post(router.url + "/generate", json={"text": "fine"}, timeout=30)
    assert r.status_code == 200 and requests.get(router.url + "/health", timeout=5).status_code == 200
    key = ClusterKey(SECRET)
    for mock in (p0, p1, d):
        for c in mock_calls(mock):
            if c["path"] == "/generate":
                b = c["body"]
                key.verify(
                    "bootstrap", [b["bootstrap_host"], b["bootstrap_port"], b["bootstrap_room"]], b["bootstrap_token"]
                )
    assert UNSIGNED_WARNING not in router.logs(tail=None)
    no_traceback(router)


def test_a_restarted_prefill_worker_is_routable_within_seconds(pd_cluster):
    router, (p0, _, _) = pd_cluster
    port = p0.port
    p0.stop()
    with requests.Session() as s:  # calls to the dead P fail over to p1 and open p0's circuit
        for _ in range(6):
            assert s.post(router.url + "/generate", json={"text": "x"}, timeout=30).status_code == 200
    wait_for(lambda: workers(router)[p0.url]["status"] == "unhealthy", 10, "the dead prefill worker ejected")
    assert workers(router)[p0.url]["circuit_state"] == "open"
    started = time.monotonic()
    restarted = MockProcess("--role", "prefill", "--name", "p0-again", port=port)
    pd_cluster[1][0] = restarted  # the fixture stops it
    wait_for(lambda: workers(router)[p0.url]["available"], 10, "the restarted prefill worker routable again")
    took = time.monotonic() - started
    assert took < 10, took  # the breaker's timeout is 60 s
    for _ in range(4):
        assert requests.post(router.url + "/generate", json={"text": "x"}, timeout=30).status_code == 200
    assert any(c["path"] == "/generate" for c in mock_calls(restarted))  # round robin: it serves again
    no_traceback(router)


# --- management routes -------------------------------------------------------------------------------------
def test_management_routes_from_a_non_loopback_caller(secret_file):
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    d = MockProcess("--role", "regular", "--name", "d")
    extra = MockProcess("--role", "regular", "--name", "extra")
    routers: list[RouterProcess] = []
    try:
        open_router = RouterProcess("--host", "0.0.0.0", "--worker-urls", d.url, *FAST, wait_ready=True)
        routers.append(open_router)
        remote = open_router.url.replace("127.0.0.1", ip)
        assert requests.post(remote + "/workers", json={"url": extra.url}, timeout=10).status_code == 403
        assert requests.post(remote + "/abort_request", json={"abort_all": True}, timeout=10).status_code == 403
        assert requests.post(remote + "/generate", json={"text": "x"}, timeout=30).status_code == 200
        assert requests.get(open_router.url + "/workers", timeout=10).status_code == 200  # loopback

        admin = RouterProcess(
            "--host",
            "0.0.0.0",
            "--worker-urls",
            d.url,
            "--api-key",
            "infer",
            "--cluster-secret-file",
            secret_file,
            *FAST,
            wait_ready=True,
            env={"SGLANG_ROUTER_ADMIN_API_KEY": "admin-key"},
        )
        routers.append(admin)
        remote = admin.url.replace("127.0.0.1", ip)
        infer, key = {"Authorization": "Bearer infer"}, {"Authorization": "Bearer admin-key"}
        assert requests.get(remote + "/workers", headers=infer, timeout=10).status_code == 403
        assert requests.get(admin.url + "/workers", headers=infer, timeout=10).status_code == 403  # loopback too
        assert (
            requests.post(remote + "/abort_request", json={"abort_all": True}, headers=infer, timeout=10).status_code
            == 403
        )
        assert requests.get(remote + "/workers", headers=key, timeout=10).status_code == 200
        assert requests.post(remote + "/generate", json={"text": "x"}, headers=infer, timeout=30).status_code == 200
        body = json.dumps({"url": extra.url, "role": "regular"}).encode()
        token = ClusterKey(SECRET).sign("register", body_digest("POST", "/workers", body))
        r = requests.post(
            remote + "/workers",
            data=body,
            timeout=10,
            headers={"X-SGLang-PD-Signature": token, "Content-Type": "application/json"},
        )
        assert r.status_code == 201, r.text  # a worker signing its registration needs no admin key
        assert extra.url in workers(admin, headers=key)
        r = requests.post(
            remote + "/workers",
            data=body,
            timeout=10,
            headers={
                "X-SGLang-PD-Signature": ClusterKey(b"not-the-cluster-secret!").sign(
                    "register", body_digest("POST", "/workers", body)
                ),
                "Content-Type": "application/json",
            },
        )
        assert r.status_code == 401
        for router in routers:
            assert "--allow-remote-admin" not in router.logs(tail=None)
            no_traceback(router)
            assert UNSIGNED_WARNING not in router.logs(tail=None)  # regular mode: nothing to sign
    finally:
        for router in routers:
            router.stop()
        d.stop()
        extra.stop()
