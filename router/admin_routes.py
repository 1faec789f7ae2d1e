"""Routes that are not inference: health/readiness, the worker registry, info and cache fan-out, metrics.

Who may call which is the auth middleware's business (``app``): the registry, /flush_cache,
/abort_request and /get_server_info are management routes (admin key, or loopback without one).

- ``/health`` is readiness: 200 iff every role this router needs has a worker that can take
  requests (PD: >= 1 prefill and >= 1 decode; regular: >= 1 worker): healthy, not draining, circuit
  not open. A worker that says a process of it died is ejected on that first answer, so /health
  turns 503 at once when it was the last of its role. (SGLang's gateway answers /health as liveness
  and /readiness as readiness; here both /health and /readiness are readiness, so a load balancer
  in front of the router stops sending when the cluster cannot serve.) ``/liveness`` is always 200.
- ``/health_generate`` runs one real one-token generation end to end, the way a client request
  goes: PD mode through one prefill + decode pair (both picked as the least loaded available, with
  bootstrap fields, signed with the cluster secret), regular mode through one worker; 200 only when
  a token came back. It does not fan out to the workers' own /health_generate.
- ``/workers``: GET lists; POST ``{"url", "role", "bootstrap_port", "api_key"}`` registers (probes
  the worker once, so a healthy one serves at once; 201 new, 200 known); DELETE ``?url=`` drains:
  no new requests at once, removal when in-flight calls end (200 removed / 202 draining).
  ``/add_worker?url=`` and ``/remove_worker?url=`` are SGLang's older spellings.
- ``/get_server_info``, ``/flush_cache``, ``/abort_request`` fan out to workers;
  ``/v1/models`` and ``/get_model_info`` come from one available worker (decode/regular first).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from pd_common.json_body import JSONBodyError, loads_bounded
from router.app_keys import STATE_KEY
from router.config import DEFAULT_BOOTSTRAP_PORT, ROLES, Role, WorkerSpec, normalize_url
from router.errors import APIError
from router.jobs import Job
from router.legs import PairCall
from router.metrics import CONTENT_TYPE
from router.state import RouterState
from router.upstream import LegError
from router.worker import Worker

CONTROL_TIMEOUT_S = 30.0
HEALTH_GENERATE_TIMEOUT_S = 30.0


def _state(request: web.Request) -> RouterState:
    return request.app[STATE_KEY]


def readiness_problem(state: RouterState) -> str | None:
    if state.shutting_down:
        return "shutting down"
    missing = [role for role in state.config.roles if not state.registry.available(role)]
    return f"no healthy {' or '.join(missing)} worker" if missing else None


async def health(request: web.Request) -> web.Response:
    problem = readiness_problem(_state(request))
    if problem:
        return web.json_response({"status": "unhealthy", "reason": problem}, status=503)
    return web.json_response({"status": "ok"})


async def liveness(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# --- the registry ----------------------------------------------------------------------------------
async def list_workers(request: web.Request) -> web.Response:
    state = _state(request)
    workers = [w.describe() for w in state.registry.all()]
    return web.json_response(
        {"mode": "pd" if state.config.pd_disaggregation else "regular", "workers": workers, "total": len(workers)}
    )


def _spec_from(state: RouterState, data: dict[str, Any]) -> WorkerSpec:
    try:
        url = normalize_url(data.get("url"))  # type: ignore[arg-type]
    except ValueError as e:
        raise APIError(400, str(e), "url") from None
    default_role = "regular" if not state.config.pd_disaggregation else None
    role = data.get("role") or data.get("worker_type") or default_role
    if role not in ROLES:
        raise APIError(400, f"role must be one of {', '.join(ROLES)}; got {role!r}", "role")
    port = data.get("bootstrap_port", DEFAULT_BOOTSTRAP_PORT if role == "prefill" else None)
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
        raise APIError(400, f"bootstrap_port must be an integer in [1, 65535] or null, got {port!r}", "bootstrap_port")
    key = data.get("api_key")
    if key is not None and not isinstance(key, str):
        raise APIError(400, "api_key must be a string", "api_key")
    return WorkerSpec(url, role, port if role == "prefill" else None, key)


async def add_worker(request: web.Request) -> web.Response:
    state = _state(request)
    data: dict[str, Any] = dict(request.query)
    if request.body_exists:  # (read() returns the body again if the auth middleware read it for a signature)
        data.update(_json_object(await request.read()))
    if isinstance(data.get("bootstrap_port"), str) and data["bootstrap_port"].isdigit():
        data["bootstrap_port"] = int(data["bootstrap_port"])
    worker, created = state.registry.add(_spec_from(state, data))
    await state.health.probe_now(worker)
    return web.json_response(
        {"status": "added" if created else "updated", "worker": worker.describe()}, status=201 if created else 200
    )


async def remove_worker(request: web.Request) -> web.Response:
    state = _state(request)
    raw = request.match_info.get("url") or request.query.get("url")
    if not raw:
        raise APIError(400, "give the worker as ?url=...", "url")
    try:
        url = normalize_url(raw)
    except ValueError as e:
        raise APIError(400, str(e), "url") from None
    worker = state.registry.drain(url)
    removed = state.registry.get(url) is None
    return web.json_response(
        {"status": "removed" if removed else "draining", "worker": worker.describe()}, status=200 if removed else 202
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = loads_bounded(raw or b"{}")
    except JSONBodyError as e:
        raise APIError(400, str(e)) from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


# --- fan-out and single-worker info ----------------------------------------------------------------
async def _each(
    state: RouterState, workers: list[Worker], method: str, path: str, timeout: float, body: bytes | None = None
) -> list[dict[str, Any]]:
    async def one(w: Worker) -> dict[str, Any]:
        try:
            status, raw, ctype = await state.upstream.call(w, method, path, timeout, body)
        except LegError as e:
            return {"url": w.url, "role": w.role, "status": e.status, "error": e.message}
        out: dict[str, Any] = {"url": w.url, "role": w.role, "status": status}
        try:
            out["body"] = json.loads(raw) if ctype == "application/json" else raw.decode("utf-8", "replace")
        except (ValueError, RecursionError):
            out["body"] = raw.decode("utf-8", "replace")
        return out

    return list(await asyncio.gather(*(one(w) for w in workers)))


def _primary(state: RouterState) -> Worker:
    roles: tuple[Role, ...] = ("decode", "regular", "prefill")
    for role in roles:
        if role in state.config.roles and state.registry.available(role):
            return state.registry.available(role)[0]
    raise APIError(503, "no healthy worker is available", retry_after=5)


async def proxy_get(request: web.Request) -> web.Response:
    """GET from one available worker, answer passed through (/v1/models, /get_model_info)."""
    state = _state(request)
    try:
        status, raw, ctype = await state.upstream.call(_primary(state), "GET", request.path_qs, CONTROL_TIMEOUT_S)
    except LegError as e:
        raise APIError(e.status, e.message) from None
    return web.Response(body=raw, status=status, content_type=ctype or "application/json")


async def get_server_info(request: web.Request) -> web.Response:
    state = _state(request)
    results = await _each(
        state, [w for w in state.registry.all() if not w.draining], "GET", "/get_server_info", CONTROL_TIMEOUT_S
    )
    out: dict[str, Any] = {}
    for r in results:  # the top level looks like a worker's answer (decode/regular first) for SGLang tools
        if r["status"] == 200 and isinstance(r.get("body"), dict) and r["role"] != "prefill":
            out.update(r["body"])
            break
    out["router"] = state.config.public_dict()
    out["workers"] = results
    return web.json_response(out)


async def flush_cache(request: web.Request) -> web.Response:
    state = _state(request)
    results = await _each(state, state.registry.all(), "POST", "/flush_cache", CONTROL_TIMEOUT_S)
    worst = max((r["status"] for r in results), default=200)
    return web.json_response({"results": results}, status=200 if worst == 200 else worst)


async def abort_request(request: web.Request) -> web.Response:
    state = _state(request)
    body = _json_object(await request.read())
    rid, abort_all = body.get("rid"), body.get("abort_all")
    if not (isinstance(rid, str) and rid) and abort_all is not True:
        raise APIError(400, 'give {"rid": "..."} or {"abort_all": true}', "rid")
    if abort_all is not None and not isinstance(abort_all, bool):
        raise APIError(400, "abort_all must be a boolean", "abort_all")
    data = json.dumps(body).encode()
    results = await _each(state, state.registry.all(), "POST", "/abort_request", CONTROL_TIMEOUT_S, data)
    return web.json_response({"results": results})


PROBE_BODY = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0}, "stream": False}


def _least_loaded(state: RouterState, role: Role) -> Worker | None:
    workers = state.registry.available(role)
    if not workers:
        return None
    low = min(w.active for w in workers)
    return state.rng.choice([w for w in workers if w.active == low])


async def health_generate(request: web.Request) -> web.Response:
    """One one-token generation end to end (PD: one P + D pair; regular: one worker). 200 iff it made a token."""
    state = _state(request)
    problem = readiness_problem(state)
    if problem:
        return web.json_response({"status": "unhealthy", "reason": problem}, status=503)
    pd = state.config.pd_disaggregation
    prefill = _least_loaded(state, "prefill") if pd else None
    decode = _least_loaded(state, "decode" if pd else "regular")
    if decode is None or (pd and prefill is None):
        return web.json_response({"status": "unhealthy", "reason": "no available worker pair"}, status=503)
    picked = {"prefill": prefill.url, "decode": decode.url} if prefill is not None else {"worker": decode.url}
    rid = f"health-generate-{state.new_id()}"
    job = Job("/generate", PROBE_BODY, rid, (1,), False, "", None, rid)
    call = PairCall(state, job, prefill, decode, job.encode(0, prefill, state.rng, state.cluster_key))
    started = time.perf_counter()
    outcome = "failed"
    try:
        async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT_S):
            raw, _ = await call.unary()  # an answer saying a worker process died is a LegError (and ejects)
        reason = _generated(raw)
    except LegError as e:
        call.blame(e)
        reason = e.message
    except TimeoutError:
        reason = f"no answer within {HEALTH_GENERATE_TIMEOUT_S:g}s"
    except BaseException:
        outcome = "client_disconnected"
        raise
    finally:
        call.close(outcome)
    took = round(time.perf_counter() - started, 4)
    if reason is not None:
        return web.json_response({"status": "unhealthy", "reason": reason, **picked, "latency_s": took}, status=503)
    return web.json_response({"status": "ok", **picked, "latency_s": took})


def _generated(raw: bytes) -> str | None:
    """None when ``raw`` (a /generate answer) holds a generated token, else why not."""
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        return "the answer is not JSON"
    meta = answer.get("meta_info") if isinstance(answer, dict) else None
    finish = meta.get("finish_reason") if isinstance(meta, dict) else None
    if isinstance(finish, dict) and finish.get("type") == "abort":
        return f"the generation was aborted: {finish.get('message') or 'no reason given'}"
    ids = answer.get("output_ids") if isinstance(answer, dict) else None
    if not (isinstance(ids, list) and ids) and not (isinstance(meta, dict) and meta.get("completion_tokens")):
        return "the answer holds no generated token"
    return None


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=_state(request).metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def register(app: web.Application) -> None:
    r = app.router
    r.add_get("/health", health)
    r.add_get("/readiness", health)
    r.add_get("/liveness", liveness)
    r.add_get("/health_generate", health_generate)
    r.add_get("/workers", list_workers)
    r.add_post("/workers", add_worker)
    r.add_delete("/workers", remove_worker)
    r.add_delete("/workers/{url:.+}", remove_worker)
    r.add_post("/add_worker", add_worker)
    r.add_post("/remove_worker", remove_worker)
    r.add_get("/v1/models", proxy_get)
    r.add_get("/v1/models/{model:.+}", proxy_get)
    r.add_get("/get_model_info", proxy_get)
    r.add_get("/get_server_info", get_server_info)
    r.add_route("*", "/flush_cache", flush_cache)
    r.add_post("/abort_request", abort_request)
    r.add_get("/metrics", metrics)
