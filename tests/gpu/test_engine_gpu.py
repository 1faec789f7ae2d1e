"""The engine on a GPU: Triton backend + CUDA graphs against transformers and against the torch backend.

Run on the device machine: ``pytest -m gpu tests/gpu/test_engine_gpu.py``.
- float32: the Triton path (kernels in IEEE fp32, decode from CUDA graphs) gives transformers'
  greedy tokens exactly, on all four architectures, for a mixed batch.
- bfloat16: every greedy choice of either backend is within ``BF16_TIE`` of the fp32 argmax
  (transformers' forward on the produced sequence); on Llama-3.1-8B shapes with dummy weights the
  Triton and torch backends agree token for token up to the first near-tie.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from oracle import ARCHS

sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))  # after the kernels/ package
from model_shapes import write_config  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16_TIE = 0.125  # nats
LENGTHS = (3, 17, 200, 700)


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in LENGTHS]


def run(path: Path, ids: list[list[int]], n: int, **kw: object) -> list[dict]:
    from sglang_pd import Engine

    engine = Engine(model_path=str(path), device="cuda", page_size=16, max_total_tokens=65536,
                    skip_tokenizer_init=True, **kw)
    try:
        sp = {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
        return engine.generate(input_ids=ids, sampling_params=sp, return_logprob=True, top_logprobs_num=2)
    finally:
        engine.shutdown()


def agreed_prefix(ref: dict) -> int:
    margins = [top[0][0] - top[1][0] for top in ref["meta_info"]["output_top_logprobs"]]
    return next((i for i, m in enumerate(margins) if m < BF16_TIE), len(margins))


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_fp32_equals_transformers(arch, tiny_model_dir, hf_oracle):
    path = tiny_model_dir(arch)
    ids = prompts(600)
    outs = run(path, ids, 12, dtype="float32", attention_backend="triton")
    for p, o in zip(ids, outs):
        assert o["output_ids"] == hf_oracle(path).greedy(p, 12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_greedy_is_near_fp32_argmax(backend, tiny_model_dir, hf_oracle):
    """Every bf16 greedy choice is within BF16_TIE of the best token under transformers' fp32 forward."""
    path = tiny_model_dir("llama")
    ids = prompts(600, seed=1)
    outs = run(path, ids, 16, dtype="bfloat16", attention_backend=backend)
    worst = 0.0
    for p, o in zip(ids, outs):
        logp = hf_oracle(path).logprobs(p + o["output_ids"])[len(p) - 1 : -1]  # rows predicting each output
        chosen = logp.gather(1, torch.tensor(o["output_ids"])[:, None])[:, 0]
        worst = max(worst, float((logp.max(dim=-1).values - chosen).max()))
    assert worst < BF16_TIE, worst


def test_triton_bf16_matches_torch_backend_llama8b(tmp_path):
    path = write_config(tmp_path / "llama8b")
    ids = prompts(128000, seed=1)
    want = run(path, ids, 16, dtype="bfloat16", attention_backend="torch", load_format="dummy")
    got = run(path, ids, 16, dtype="bfloat16", attention_backend="triton", load_format="dummy")
    for g, w in zip(got, want):
        k = agreed_prefix(w)
        assert g["output_ids"][:k] == w["output_ids"][:k], (k, g["output_ids"], w["output_ids"])
    assert sum(agreed_prefix(w) for w in want) >= len(want) * 4  # the comparison covered real tokens


def test_cuda_graph_equals_eager(tiny_model_dir):
    """Same tokens with and without graphs, for batch sizes that pad (3 -> 4) and that match."""
    path = tiny_model_dir("qwen3")
    for n in (3, 8):
        ids = prompts(600, seed=n) * 2
        ids = ids[:n]
        graphs = run(path, ids, 10, dtype="float32")
        eager = run(path, ids, 10, dtype="float32", disable_cuda_graph=True)
        assert [o["output_ids"] for o in graphs] == [o["output_ids"] for o in eager]
