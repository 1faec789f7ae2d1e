"""What the mock worker answers: SGLang-/OpenAI-shaped bodies and SSE events made of fake tokens.

Token t of an answer is id ``100 + t`` with text ``"w{t} "``; a text prompt's ids are its
characters (``ord(c) % 500 + 1``). Prompt logprobs are ``-0.5 - 0.01 * i`` (None for the first
token), except on a decode worker, which has none ([] / null values), as the PD contract says.
"""

from __future__ import annotations

import json
import time
from typing import Any

PROMPT_LP = -0.5


def sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def prompt_ids(prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        return [ord(c) % 500 + 1 for c in prompt]
    return [int(t) for t in prompt]  # ids may come as integral floats (1.0): JSON numbers, as the worker takes them


def _is_ids(raw: Any) -> bool:
    return isinstance(raw, list) and bool(raw) and isinstance(raw[0], (int, float))


def prompt_logprobs(ids: list[int], role: str) -> list[float | None]:
    if role == "decode":
        return [None] * len(ids)
    return [None] + [PROMPT_LP - 0.01 * i for i in range(1, len(ids))]


def _items(body: dict[str, Any]) -> tuple[list[Any], bool]:
    raw = body.get("input_ids", body.get("text", body.get("prompt")))
    if isinstance(raw, str) or _is_ids(raw):
        return [raw], False
    return list(raw or ()), True


def _per(body: dict[str, Any], name: str, i: int) -> Any:
    v = body.get(name)
    return v[i] if isinstance(v, list) else v


def generate_answers(
    body: dict[str, Any], count: int, name: str, role: str, aborted: bool, abort_message: str = "aborted"
) -> dict[str, Any]:
    items, is_batch = _items(body)
    outs: list[list[dict[str, Any]]] = []  # per choice: its cumulative states
    for i, item in enumerate(items):
        sp = _per(body, "sampling_params", i) or {}
        n = int(sp.get("n") or 1)
        base = _per(body, "rid", i) or f"mock{i}"
        ids = prompt_ids(item)
        for c in range(n):
            rid = base if n == 1 else f"{base}-{c}"
            outs.append(
                _generate_states(
                    rid, ids, count, name, role, aborted, bool(_per(body, "return_logprob", i)), abort_message
                )
            )
    multi = is_batch or len(outs) > 1
    whole = [states[-1] for states in outs]
    events: list[bytes] = []
    for k, states in enumerate(outs):
        for state in states:
            events.append(sse({**state, "index": k} if multi else state))
    return {"whole": whole if multi else whole[0], "events": events}


def _generate_states(
    rid: str,
    ids: list[int],
    count: int,
    name: str,
    role: str,
    aborted: bool,
    logprob: bool,
    abort_message: str = "aborted",
) -> list[dict[str, Any]]:
    count = 1 if aborted else count
    states = []
    for t in range(1, count + 1):
        done = t == count
        finish = (
            ({"type": "abort", "message": abort_message} if aborted else {"type": "length", "length": count})
            if done
            else None
        )
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "completion_tokens": t,
            "cached_tokens": 0,
            "e2e_latency": 0.0,
            "served_by": name,
        }
        if logprob:
            meta["input_token_logprobs"] = (
                [] if role == "decode" else [[v, tok, None] for v, tok in zip(prompt_logprobs(ids, role), ids)]
            )
            meta["output_token_logprobs"] = [[-0.1, 100 + s, None] for s in range(t)]
        states.append(
            {"text": "".join(f"w{s} " for s in range(t)), "output_ids": [100 + s for s in range(t)], "meta_info": meta}
        )
    return states


def completion_answers(
    path: str, body: dict[str, Any], count: int, name: str, role: str, aborted: bool
) -> dict[str, Any]:
    chat = path.endswith("chat/completions")
    if chat:
        prompts: list[Any] = ["".join(str(m.get("content", "")) for m in body.get("messages", []))]
    else:
        p = body.get("prompt")
        prompts = [p] if isinstance(p, str) or _is_ids(p) else list(p or ())
    n = int(body.get("n") or 1)
    rid = body.get("rid") or "mock"
    total = len(prompts) * n
    meta = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
        "created": int(time.time()),
        "model": body.get("model") or "mock-model",
        "system_fingerprint": name,
    }
    obj = "chat.completion" if chat else "text_completion"
    count = 1 if aborted else count
    finish = "abort" if aborted else "length"
    echo, lp_k = bool(body.get("echo")), body.get("logprobs")
    choices, events = [], []
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(prompt)
        for j in range(n):
            k = i * n + j
            text = "".join(f"w{s} " for s in range(count))
            if chat:
                choices.append(
                    {
                        "index": k,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                )
                events.append(
                    sse(
                        {
                            **meta,
                            "object": "chat.completion.chunk",
                            "choices": [
                                {"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            ],
                        }
                    )
                )
                for s in range(count):
                    events.append(
                        sse(
                            {
                                **meta,
                                "object": "chat.completion.chunk",
                                "choices": [
                                    {
                                        "index": k,
                                        "delta": {"content": f"w{s} "},
                                        "finish_reason": finish if s == count - 1 else None,
                                    }
                                ],
                            }
                        )
                    )
                continue
            prefix = (prompt if isinstance(prompt, str) else "") if echo else ""
            lp = _legacy_logprobs(ids if echo else [], count, role) if lp_k is not None else None
            choices.append({"index": k, "text": prefix + text, "logprobs": lp, "finish_reason": finish})
            for s in range(count):
                piece_lp = None
                if lp is not None:
                    lo = 0 if s == 0 else len(ids if echo else []) + s
                    hi = len(ids if echo else []) + s + 1
                    piece_lp = {key: v[lo:hi] for key, v in lp.items()}
                piece = (prefix if s == 0 else "") + f"w{s} "
                events.append(
                    sse(
                        {
                            **meta,
                            "object": obj,
                            "choices": [
                                {
                                    "index": k,
                                    "text": piece,
                                    "logprobs": piece_lp,
                                    "finish_reason": finish if s == count - 1 else None,
                                }
                            ],
                        }
                    )
                )
    usage = {
        "prompt_tokens": sum(len(prompt_ids(p)) for p in prompts),
        "completion_tokens": total * count,
        "total_tokens": sum(len(prompt_ids(p)) for p in prompts) + total * count,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(sse({**meta, "object": obj + (".chunk" if chat else ""), "choices": [], "usage": usage}))
    return {"whole": {**meta, "object": obj, "choices": choices, "usage": usage}, "events": events}


def _legacy_logprobs(prompt: list[int], count: int, role: str) -> dict[str, list[Any]]:
    values = prompt_logprobs(prompt, role) + [-0.1] * count
    tokens = [f"p{t}" for t in prompt] + [f"w{s} " for s in range(count)]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": [None] * len(values), "text_offset": offsets}
