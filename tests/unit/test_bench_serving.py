"""bench/serving.py: datasets, arrivals, SSE parsing, per-backend stream rules, metrics, report, and
end-to-end runs of the CLI against TokenStreamTestDouble (a stand-in HTTP server, see below)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.append(str(BENCH_DIR))  # last: bench/kernels.py must not shadow the pd_kernels/ package

from serving_lib.arrivals import arrival_gaps, arrival_offsets  # noqa: E402
from serving_lib.backends import APPLIERS, build_payload  # noqa: E402
from serving_lib.client import handle_event, http_error  # noqa: E402
from serving_lib.config import BenchConfig  # noqa: E402
from serving_lib.datasets import Prompt, build_prompts, random_ids_prompts, random_text_prompts  # noqa: E402
from serving_lib.metrics import compute_metrics, tpot_seconds  # noqa: E402
from serving_lib.records import RequestRecord, StreamState  # noqa: E402
from serving_lib.report import append_jsonl, format_table, result_json, summarize_errors  # noqa: E402
from serving_lib.sse import SSEParser  # noqa: E402


def make_cfg(**over: Any) -> BenchConfig:
    base: dict[str, Any] = dict(
        base_url="http://127.0.0.1:1",
        backend="sglang",
        model=None,
        tokenizer=None,
        dataset_name="random-ids",
        random_input_len=32,
        random_output_len=8,
        random_range_ratio=0.5,
        random_vocab_size=None,
        num_prompts=4,
        request_rate=math.inf,
        max_concurrency=None,
        seed=1,
        stream=True,
        ignore_eos=True,
        warmup_requests=0,
        request_timeout_s=30.0,
        output_file=None,
        disable_tqdm=True,
        api_key=None,
    )
    return BenchConfig(**{**base, **over})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from sglang_pd.tools.make_tiny_model import write_tokenizer

    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.path = str(out)
    return tok


# ---------------------------------------------------------------- datasets and arrivals


def test_random_ids_lengths_vocab_and_seed() -> None:
    a = random_ids_prompts(500, 100, 40, 0.5, vocab_size=300, seed=7, special_ids=[0, 1, 2])
    assert all(50 <= p.prompt_len <= 100 and len(p.input_ids or ()) == p.prompt_len for p in a)
    assert all(20 <= p.output_len <= 40 and p.text is None for p in a)
    ids = np.concatenate([p.input_ids for p in a])
    assert ids.min() >= 3 and ids.max() < 300  # specials excluded, within vocab
    assert {p.prompt_len for p in a} >= {50, 100}  # both ends of the range are reachable
    assert a == random_ids_prompts(500, 100, 40, 0.5, 300, 7, [0, 1, 2])
    assert a != random_ids_prompts(500, 100, 40, 0.5, 300, 8, [0, 1, 2])
    fixed = random_ids_prompts(20, 16, 4, 1.0, 300, 0)
    assert {(p.prompt_len, p.output_len) for p in fixed} == {(16, 4)}
    assert {p.prompt_len for p in random_ids_prompts(50, 3, 1, 0.0, 10, 0)} <= {1, 2, 3}  # ratio 0: from 1


def test_random_text_prompts_with_real_tokenizer(tokenizer: Any) -> None:
    prompts = random_text_prompts(20, 64, 8, 0.5, tokenizer, seed=3)
    for p in prompts:
        assert p.input_ids is None and p.text
        assert p.prompt_len == len(tokenizer.encode(p.text, add_special_tokens=False))
        assert 16 <= p.prompt_len <= 70  # re-encoding merges/splits a little around [32, 64]
    assert prompts == random_text_prompts(20, 64, 8, 0.5, tokenizer, seed=3)


def test_build_prompts_needs_tokenizer_for_text(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="--tokenizer"):
        build_prompts(make_cfg(dataset_name="random"), None, 256)
    with pytest.raises(ValueError, match="openai-chat"):
        build_prompts(make_cfg(backend="openai-chat"), None, 256)
    chat = build_prompts(make_cfg(backend="openai-chat"), tokenizer, tokenizer.vocab_size)
    assert all(p.text is not None for p in chat)


def test_poisson_gaps_mean_rate_and_inf() -> None:
    gaps = np.array(arrival_gaps(rate=4.0, n=40000, seed=0))
    assert abs(gaps.mean() - 0.25) < 0.25 * 0.03 and abs(gaps.std() - 0.25) < 0.25 * 0.05
    assert arrival_gaps(4.0, 100, 5) == arrival_gaps(4.0, 100, 5) != arrival_gaps(4.0, 100, 6)
    assert arrival_gaps(math.inf, 7, 0) == [0.0] * 7 and arrival_offsets(math.inf, 3, 0) == [0.0] * 3
    offsets = arrival_offsets(2.0, 1000, 1)
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets[-1] == pytest.approx(sum(arrival_gaps(2.0, 999, 1)))
    with pytest.raises(ValueError):
        arrival_gaps(0.0, 3, 0)


# ---------------------------------------------------------------- SSE and per-backend stream rules


def split_every_way(blob: bytes) -> Iterator[list[bytes]]:
    for i in range(len(blob) + 1):
        yield [blob[:i], blob[i:]]
    yield [blob[i : i + 1] for i in range(len(blob))]


def test_sse_parser_any_split() -> None:
    blob = ('data: {"text": "é€"}\r\n\r\n: keep-alive\n\nevent: x\ndata:{"a": 1}\n\ndata: [DONE]\n\n').encode()
    for chunks in split_every_way(blob):
        parser = SSEParser()
        events = [e for c in chunks for e in parser.feed(c)] + parser.flush()
        assert [e.data for e in events] == ['{"text": "é€"}', '{"a": 1}', "[DONE]"]
        assert events[0].json() == {"text": "é€"} and events[-1].is_done
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]") == [] and parser.flush()[0].is_done  # no trailing newline


def replay(backend: str, timed_chunks: Sequence[tuple[float, bytes]]) -> RequestRecord:
    """Feed (arrival time, bytes) through the parser and the backend's rules, as the client does."""
    state, parser, apply = StreamState(start=0.0), SSEParser(), APPLIERS[backend]
    end = 0.0
    for ts, chunk in timed_chunks:
        end = ts
        if any(handle_event(e, state, apply, ts) for e in parser.feed(chunk)):
            break
    return state.to_record(prompt_len=99, end=end)


def sse(*objs: Any) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objs)


def sg(text: str, n: int, finish: str | None = None) -> dict[str, Any]:
    meta = {"prompt_tokens": 5, "completion_tokens": n, "finish_reason": {"type": finish} if finish else None}
    return {"text": text, "output_ids": list(range(n)), "meta_info": meta}


def test_sglang_stream_ttft_itl_split_and_done() -> None:
    blob_a, blob_b = sse(sg("A", 1)), sse(sg("ABC", 3), sg("ABCD", 4, "length"), b"[DONE]")
    # The second network chunk ends mid-event: its events complete at 0.35.
    rec = replay("sglang", [(0.1, blob_a), (0.3, blob_b[:20]), (0.35, blob_b[20:]), (0.5, b"")])
    assert rec.success and rec.ttft == pytest.approx(0.1) and rec.latency == pytest.approx(0.35)
    assert rec.itl == pytest.approx((0.125, 0.125, 0.0))  # 2 tokens in one chunk: 2 equal gaps
    assert (rec.output_len, rec.prompt_len, rec.generated_text, rec.finish_reason) == (4, 5, "ABCD", "length")
    # Delta (incremental) text is appended, and meta_info still decides the token count.
    delta = replay("sglang", [(0.1, sse(sg("A", 2))), (0.2, sse(sg("B", 3), b"[DONE]"))])
    assert delta.generated_text == "AB" and delta.output_len == 3 and delta.itl == pytest.approx((0.1,))


def test_stream_errors_abort_and_missing_done() -> None:
    err = {"error": {"message": "This model's maximum context length is 8", "type": "BadRequestError", "code": 400}}
    rec = replay("sglang", [(0.1, sse(sg("A", 1))), (0.2, sse(err, b"[DONE]"))])
    assert not rec.success and rec.error.startswith("This model's maximum context length")
    aborted = {"type": "abort", "message": "drained"}
    abort = {"text": "", "meta_info": {"completion_tokens": 0, "finish_reason": aborted}}
    assert replay("sglang", [(0.1, sse(abort, b"[DONE]"))]).error == "drained"
    cut = replay("openai", [(0.1, sse({"choices": [{"text": "x", "finish_reason": None}]}))])
    assert not cut.success and "[DONE]" in cut.error
    assert "invalid JSON" in replay("openai", [(0.1, b"data: {oops\n\ndata: [DONE]\n\n")]).error
    assert http_error(503, json.dumps({"error": {"message": "overloaded", "code": 503}})) == "HTTP 503: overloaded"
    assert http_error(500, "plain text") == "HTTP 500: plain text"


def oa(text: str | None, finish: str | None = None, chat: bool = False) -> dict[str, Any]:
    choice = {"delta": {"content": text}} if chat else {"text": text}
    return {"choices": [{**choice, "index": 0, "finish_reason": finish}]}


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_openai_stream_usage_is_the_count(backend: str) -> None:
    chat = backend == "openai-chat"
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}
    first = [sse({"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})] if chat else []
    chunks = [(0.05, c) for c in first] + [
        (0.1, sse(oa("a", chat=chat))),
        (0.2, sse(oa("b", chat=chat))),
        (0.4, sse(oa("cd", "length", chat), usage, b"[DONE]")),
    ]
    rec = replay(backend, chunks)
    assert rec.success and rec.ttft == pytest.approx(0.1)  # the role-only chunk is not content
    assert rec.itl == pytest.approx((0.1, 0.2)) and rec.output_len == 5 and rec.prompt_len == 7
    assert rec.output_len_reported and rec.generated_text == "abcd" and rec.finish_reason == "length"
    # Continuous usage on every chunk tells how many tokens a chunk carried.
    cont = replay(
        backend,
        [
            (0.1, sse({**oa("a", chat=chat), "usage": {"completion_tokens": 1}})),
            (0.3, sse({**oa("bc", chat=chat), "usage": {"completion_tokens": 3}}, b"[DONE]")),
        ],
    )
    assert cont.itl == pytest.approx((0.1, 0.1)) and cont.output_len == 3
    # Without usage the count falls back to content chunks (the runner retokenizes when it can).
    bare = replay(backend, [(0.1, sse(oa("a", chat=chat))), (0.2, sse(oa("b", chat=chat), b"[DONE]"))])
    assert bare.output_len == 2 and not bare.output_len_reported


def test_payloads() -> None:
    ids = Prompt(None, (5, 6, 7), 3, 4)
    text = Prompt("hi there", None, 2, 4)
    assert build_payload(make_cfg(), None, ids) == {
        "input_ids": [5, 6, 7],
        "stream": True,
        "sampling_params": {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True},
    }
    assert build_payload(make_cfg(stream=False), None, text)["text"] == "hi there"
    oa_body = build_payload(make_cfg(backend="openai"), "m", ids)
    assert oa_body == {
        "model": "m",
        "prompt": [5, 6, 7],
        "max_tokens": 4,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    chat = build_payload(make_cfg(backend="openai-chat", ignore_eos=False, stream=False), "m", text)
    assert chat == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi there"}],
        "max_completion_tokens": 4,
        "temperature": 0.0,
        "stream": False,
    }


# ---------------------------------------------------------------- metrics and report


def rec(
    ttft: float, latency: float, out: int, itl: Sequence[float], prompt: int = 10, ok: bool = True
) -> RequestRecord:
    return RequestRecord(ok, "" if ok else "HTTP 500: boom", prompt, out, ttft, tuple(itl), latency)


def test_metrics_definitions_against_numpy() -> None:
    records = [
        rec(0.1, 1.0, 10, [0.1] * 9),
        rec(0.2, 0.5, 4, [0.05, 0.1, 0.15], prompt=20),
        rec(0.3, 0.3, 1, []),
        rec(0.0, 0.7, 0, [], ok=False),
    ]
    m = compute_metrics(records, duration=2.0)
    assert (m.completed, m.failed, m.total_input_tokens, m.total_output_tokens) == (3, 1, 40, 15)
    assert m.total_output_tokens_retokenized is None
    assert (m.request_throughput, m.input_throughput, m.output_throughput, m.total_throughput) == (1.5, 20, 7.5, 27.5)
    assert m.concurrency == pytest.approx((1.0 + 0.5 + 0.3) / 2.0)
    assert tpot_seconds(records[0]) == pytest.approx(0.1) and tpot_seconds(records[2]) is None
    tpots = np.array([0.9 / 9, 0.3 / 3]) * 1000
    assert m.tpot.count == 2 and m.tpot.mean == pytest.approx(tpots.mean())
    itl = np.array([0.1] * 9 + [0.05, 0.1, 0.15]) * 1000
    ttft = np.array([0.1, 0.2, 0.3]) * 1000
    for dist, ref in ((m.itl, itl), (m.ttft, ttft), (m.e2e_latency, np.array([1000.0, 500.0, 300.0]))):
        assert dist.median == pytest.approx(np.median(ref)) and dist.std == pytest.approx(ref.std())
        for q, got in ((90, dist.p90), (95, dist.p95), (99, dist.p99)):
            assert got == pytest.approx(np.percentile(ref, q))
        assert dist.max == pytest.approx(ref.max())
    none = compute_metrics([rec(0.0, 0.1, 0, [], ok=False)], duration=1.0)
    assert none.completed == 0 and none.ttft.mean is None and none.itl.p99 is None


def test_report_table_and_json_line(tmp_path: Path) -> None:
    records = [rec(0.1, 1.0, 10, [0.1] * 9), rec(0.0, 0.2, 0, [], ok=False)]
    m = compute_metrics(records, 2.0)
    errors = summarize_errors(records)
    assert errors == [{"message": "HTTP 500: boom", "count": 1}]
    table = format_table(make_cfg(), m, errors)
    for row in (
        "Successful requests:",
        "Failed requests:",
        "Mean TTFT (ms):",
        "P99 ITL (ms):",
        "Median TPOT (ms):",
        "Concurrency:",
        "Total token throughput (tok/s):",
    ):
        assert row in table
    assert "Mean TTFT (ms):                          100.00" in table
    out = tmp_path / "runs.jsonl"
    for _ in range(2):
        append_jsonl(out, result_json(make_cfg(), "m", m, errors))
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    row = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert row["request_rate"] == "inf" and row["model"] == "m" and row["completed"] == 1 and row["failed"] == 1
    assert row["mean_ttft_ms"] == pytest.approx(100.0) and row["mean_tpot_ms"] == pytest.approx(100.0)
    assert row["p99_itl_ms"] == pytest.approx(100.0) and row["max_e2e_latency_ms"] == pytest.approx(1000.0)
    assert row["errors"] == errors and row["output_throughput"] == 5.0


# ---------------------------------------------------------------- end to end against a test double


class TokenStreamTestDouble:
    """TEST DOUBLE, not the real server (which does not exist yet): an aiohttp app serving
    /generate, /v1/completions, /v1/chat/completions and /v1/models with fixed timing: the first
    chunk after ``ttft`` s, then one chunk of ``per_chunk`` tokens every ``per_chunk * itl`` s."""

    def __init__(self, ttft: float = 0.02, itl: float = 0.005, per_chunk: int = 1, fail: bool = False) -> None:
        self.ttft, self.itl, self.per_chunk, self.fail = ttft, itl, per_chunk, fail
        self.in_flight = self.max_in_flight = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0

    def __enter__(self) -> TokenStreamTestDouble:
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        assert ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._handle)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.loop.run_until_complete(web.SockSite(runner, sock).start())
        ready.set()
        self.loop.run_forever()

    @staticmethod
    async def _models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "double"}]})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.fail:
            return web.json_response({"error": {"message": "test double says no", "code": 503}}, status=503)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        kind = request.path
        sp = body.get("sampling_params", {})
        n = sp.get("max_new_tokens") or body.get("max_tokens") or body.get("max_completion_tokens")
        prompt = body.get("input_ids") or body.get("prompt") or body.get("text") or body["messages"][0]["content"]
        p_len = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        words = [f"w{i} " for i in range(n)]
        if not body.get("stream"):
            await asyncio.sleep(self.ttft + self.itl * (n - 1))
            return web.json_response(self._event(kind, "".join(words), n, p_len, "length", "".join(words)))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(self.ttft)
        sent = 0
        while sent < n:
            k = 1 if sent == 0 else min(self.per_chunk, n - sent)
            if sent:
                await asyncio.sleep(self.itl * k)
            sent += k
            finish = "length" if sent == n else None
            delta = "".join(words[sent - k : sent])
            await resp.write(sse(self._event(kind, "".join(words[:sent]), sent, p_len, finish, delta, stream=True)))
        if kind != "/generate":
            await resp.write(sse({"choices": [], "usage": {"prompt_tokens": p_len, "completion_tokens": n}}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    @staticmethod
    def _event(
        kind: str, text: str, n: int, p_len: int, finish: str | None, delta: str, stream: bool = False
    ) -> dict[str, Any]:
        if kind == "/generate":
            meta = {"prompt_tokens": p_len, "completion_tokens": n, "finish_reason": finish and {"type": finish}}
            return {"text": text, "output_ids": list(range(n)), "meta_info": meta}
        if kind == "/v1/chat/completions":
            choice: dict[str, Any] = {"delta" if stream else "message": {"content": delta}}
        else:
            choice = {"text": delta}
        out: dict[str, Any] = {"choices": [{**choice, "index": 0, "finish_reason": finish}]}
        if not stream:
            out["usage"] = {"prompt_tokens": p_len, "completion_tokens": n}
        return out


def run_cli(port: int, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    cmd = [
        sys.executable,
        str(BENCH_DIR / "serving.py"),
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--num-prompts",
        "12",
        "--random-input-len",
        "16",
        "--random-output-len",
        "8",
        "--random-range-ratio",
        "1.0",
        "--disable-tqdm",
        "--output-file",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = out.read_text().splitlines() if out.exists() else []
    return proc, (json.loads(lines[-1]) if lines else None)


@pytest.mark.parametrize("backend,per_chunk", [("sglang", 2), ("openai", 1)])
def test_cli_end_to_end_streaming(tmp_path: Path, backend: str, per_chunk: int) -> None:
    with TokenStreamTestDouble(ttft=0.03, itl=0.01, per_chunk=per_chunk) as server:
        proc, row = run_cli(server.port, tmp_path / "r.jsonl", "--backend", backend, "--max-concurrency", "4")
        assert server.max_in_flight <= 4
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout and "Successful requests:                     12" in proc.stdout
    assert row is not None and row["backend"] == backend and row["model"] == "double"
    assert (row["completed"], row["failed"], row["total_output_tokens"], row["total_input_tokens"]) == (12, 0, 96, 192)
    assert row["max_concurrency"] == 4 and row["stream"] and row["ignore_eos"]
    assert 25 <= row["median_ttft_ms"] <= 150  # 30 ms by construction; slack for a busy 2-core machine
    assert 8 <= row["median_itl_ms"] <= 40 and 8 <= row["median_tpot_ms"] <= 40  # 10 ms per token
    assert 0.5 < row["concurrency"] <= 4.05


def test_cli_chat_with_tokenizer_and_no_stream(tmp_path: Path, tokenizer: Any) -> None:
    with TokenStreamTestDouble() as server:
        proc, row = run_cli(
            server.port,
            tmp_path / "r.jsonl",
            "--backend",
            "openai-chat",
            "--tokenizer",
            tokenizer.path,
            "--request-rate",
            "50",
            "--disable-stream",
        )
    assert proc.returncode == 0, proc.stderr
    assert row is not None and row["dataset_name"] == "random" and row["request_rate"] == 50.0
    assert row["completed"] == 12 and row["total_output_tokens"] == 96 and not row["stream"]
    assert row["total_output_tokens_retokenized"] > 0 and "(retokenized)" in proc.stdout
    assert row["mean_itl_ms"] is None and row["mean_ttft_ms"] == pytest.approx(row["mean_e2e_latency_ms"])


def test_cli_all_failed_exits_nonzero(tmp_path: Path) -> None:
    with TokenStreamTestDouble(fail=True) as server:
        proc, row = run_cli(server.port, tmp_path / "r.jsonl", "--warmup-requests", "0")
        warm, _ = run_cli(server.port, tmp_path / "w.jsonl")
    assert proc.returncode == 1 and row is not None and row["completed"] == 0 and row["failed"] == 12
    assert row["errors"] == [{"message": "HTTP 503: test double says no", "count": 12}]
    assert "Failed requests:                         12" in proc.stdout
    assert warm.returncode == 1 and "warm-up failed: HTTP 503: test double says no" in warm.stderr
