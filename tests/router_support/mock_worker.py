"""A fake sglang-pd worker for router tests and the router benchmark: an aiohttp app with knobs.

It speaks the worker's HTTP surface (/generate, /v1/completions, /v1/chat/completions, /health, ...)
with made-up tokens (``w0 w1 ...``), records every call (path, body, headers) and every
``/abort_request``, and misbehaves on request:
  latency_ms       delay before an inference answer's headers (injected failures too)
  token_delay_ms   delay between streamed events
  num_tokens       tokens per answer (a prefill worker answers one)
  fail_first       the next N inference calls fail with ``fail_status`` (an error envelope; its
                   ``param`` is ``fail_param``: a 5xx that names a parameter blames the request)
  crash_after      streaming: drop the connection after N events (a worker dying mid-stream)
  error_after      streaming: send an error event (status ``fail_status``) after N events, then [DONE]
  hang             inference calls wait until aborted (/abort_request) or the client leaves
  health_status / health_delay_ms   what /health answers, and how slowly
  health_reason    the ``reason`` of a non-200 /health answer ("child process died: scheduler")
  abort_message    inference calls end at once with finish_reason abort and this message (native
                   routes; OpenAI answers carry "abort" only, as the real worker's do)
  api_key          require ``Authorization: Bearer KEY`` (except /health, /metrics)
Roles ``prefill``/``decode`` check the PD fields the router must add (scalar bootstrap_host/port/
room, exactly one choice) and answer as the PD contract says: P's answer carries the prompt
logprobs, D's carries none (null prompt logprob values for an echo).

In-process: ``MockWorker(**knobs)``, ``await m.start()`` -> URL, change ``m.knobs`` at will.
Subprocess: ``python -m router_support.mock_worker --port P [--name N --role R --latency-ms MS ...]``
(run from tests/)
(``MockProcess`` wraps that); knobs change with ``POST /_mock/knobs``; ``GET /_mock/calls``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from router_support.mock_answers import completion_answers, generate_answers

DONE = b"data: [DONE]\n\n"


@dataclass
class Knobs:
    name: str = "mock"
    role: str = "regular"
    latency_ms: float = 0.0
    token_delay_ms: float = 0.0
    num_tokens: int = 4
    fail_first: int = 0
    fail_status: int = 500
    fail_param: str | None = None
    crash_after: int | None = None
    error_after: int | None = None
    hang: bool = False
    health_status: int = 200
    health_delay_ms: float = 0.0
    health_reason: str | None = None
    abort_message: str | None = None
    api_key: str | None = None


def envelope(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "MockError", "param": param, "code": status}}


def lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


@dataclass
class Call:
    path: str
    body: Any
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)


class MockWorker:
    def __init__(self, **knobs: Any) -> None:
        self.knobs = Knobs(**knobs)
        self.calls: list[Call] = []
        self.aborts: list[str] = []
        self.inflight: dict[str, asyncio.Event] = {}
        self.active = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        r = app.router
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            r.add_post(path, self.inference)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health)
        r.add_post("/abort_request", self.abort)
        r.add_get("/get_model_info", self.json(lambda: {"model_path": "mock-model", "served_by": self.knobs.name}))
        r.add_get(
            "/get_server_info",
            self.json(lambda: {"name": self.knobs.name, "role": self.knobs.role, "max_total_num_tokens": 1000}),
        )
        r.add_get(
            "/v1/models", self.json(lambda: {"object": "list", "data": [{"id": "mock-model", "object": "model"}]})
        )
        r.add_route("*", "/flush_cache", self.json(lambda: {"flushed": True}))
        r.add_get("/metrics", self.json(lambda: {"active": self.active}))
        r.add_post("/_mock/knobs", self.set_knobs)
        r.add_get("/_mock/calls", self.get_calls)
        return app

    def json(self, make: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            self.calls.append(Call(request.path, None, lower(request.headers)))
            return web.json_response(make())

        return handler

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.url = f"http://{host}:{self.runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def inference_calls(self) -> list[Call]:
        return [c for c in self.calls if c.path in ("/generate", "/v1/completions", "/v1/chat/completions")]

    # --- control ---------------------------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = self.knobs.api_key
        open_path = request.path in ("/health", "/metrics") or request.path.startswith("/_mock")
        if key and not open_path and request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response(envelope(401, "invalid or missing API key"), status=401)
        return await handler(request)

    async def set_knobs(self, request: web.Request) -> web.Response:
        body = await request.json()
        reset = body.pop("reset_calls", False)
        self.knobs = dataclasses.replace(self.knobs, **body)
        if reset:
            self.calls.clear()
            self.aborts.clear()
        return web.json_response(dataclasses.asdict(self.knobs))

    async def get_calls(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": [dataclasses.asdict(c) for c in self.calls], "aborts": self.aborts})

    async def health(self, request: web.Request) -> web.Response:
        if self.knobs.health_delay_ms:
            await asyncio.sleep(self.knobs.health_delay_ms / 1000)
        body: dict[str, Any] = {"status": "ok" if self.knobs.health_status == 200 else "unhealthy"}
        if self.knobs.health_status != 200 and self.knobs.health_reason:
            body["reason"] = self.knobs.health_reason
        return web.json_response(body, status=self.knobs.health_status)

    async def abort(self, request: web.Request) -> web.Response:
        rid = (await request.json()).get("rid")
        self.aborts.append(rid)
        self.calls.append(Call(request.path, {"rid": rid}, lower(request.headers)))
        if rid in self.inflight:
            self.inflight[rid].set()
        return web.json_response({"aborted": rid})

    # --- inference -------------------------------------------------------------------------------
    async def inference(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append(Call(request.path, body, lower(request.headers)))
        k = self.knobs
        if k.latency_ms:
            await asyncio.sleep(k.latency_ms / 1000)
        if k.fail_first > 0:
            self.knobs.fail_first -= 1
            return web.json_response(
                envelope(k.fail_status, f"{k.name}: injected failure", k.fail_param), status=k.fail_status
            )
        problem = self._pd_problem(body)
        if problem:
            return web.json_response(envelope(400, problem), status=400)
        rid = body.get("rid") if isinstance(body.get("rid"), str) else None
        aborted = asyncio.Event()
        if rid:
            self.inflight[rid] = aborted
        self.active += 1
        try:
            if k.hang:
                await aborted.wait()
            if k.abort_message is not None:
                aborted.set()
            answers = self._answers(request.path, body, aborted.is_set())
            if not body.get("stream"):
                return web.json_response(answers["whole"])
            return await self._stream(request, answers["events"], aborted)
        finally:
            self.active -= 1
            if rid:
                self.inflight.pop(rid, None)

    def _pd_problem(self, body: dict[str, Any]) -> str | None:
        if self.knobs.role == "regular":
            return None
        for f in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
            if f not in body or isinstance(body[f], list):
                return f"{self.knobs.role} worker needs a scalar {f}"
        room = body["bootstrap_room"]
        if not isinstance(room, int) or not 0 <= room < 1 << 63:
            return f"bad bootstrap_room {room!r}"
        sp = body.get("sampling_params") or {}
        if body.get("n", 1) != 1 or sp.get("n", 1) != 1 or isinstance(body.get("text"), list):
            return "PD workers take exactly one choice per request"
        return None

    async def _stream(self, request: web.Request, events: list[bytes], aborted: asyncio.Event) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            return await self._write_events(request, resp, events, aborted)
        except ConnectionError:  # the router went away (it aborts, or its client left): quietly, as a worker should
            return resp

    async def _write_events(
        self, request: web.Request, resp: web.StreamResponse, events: list[bytes], aborted: asyncio.Event
    ) -> web.StreamResponse:
        k = self.knobs
        await resp.prepare(request)
        for i, event in enumerate(events):
            if k.crash_after is not None and i == k.crash_after:
                assert request.transport is not None
                request.transport.abort()  # die mid-stream: no [DONE], no terminating chunk
                return resp
            if k.error_after is not None and i == k.error_after:
                await resp.write(sse(envelope(k.fail_status, f"{k.name}: injected stream error")) + DONE)
                return resp
            if i and k.token_delay_ms:
                await asyncio.sleep(k.token_delay_ms / 1000)
            await resp.write(event)
            if aborted.is_set():
                break
        await resp.write(DONE)
        await resp.write_eof()
        return resp

    def _answers(self, path: str, body: dict[str, Any], aborted: bool) -> dict[str, Any]:
        k = self.knobs
        count = 1 if k.role == "prefill" else k.num_tokens
        if path == "/generate":
            return generate_answers(body, count, k.name, k.role, aborted, k.abort_message or "aborted")
        return completion_answers(path, body, count, k.name, k.role, aborted)


# --- as a subprocess -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MockProcess:
    """The mock in its own process (for the benchmark and subprocess tests)."""

    def __init__(self, *flags: str, timeout: float = 20.0, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        repo = os.path.dirname(tests_dir)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, repo, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router_support.mock_worker", "--port", str(self.port), *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=tests_dir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mock worker exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError("mock worker did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    for f in dataclasses.fields(Knobs):
        kind = (
            str
            if f.name in ("name", "role", "api_key", "health_reason", "abort_message", "fail_param")
            else (float if "float" in str(f.type) else int)
        )
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    args = vars(p.parse_args())
    host, port = args.pop("host"), args.pop("port")
    args["hang"] = bool(args["hang"])

    async def run() -> None:
        mock = MockWorker(**args)
        await mock.start(port, host)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
