"""PD with prefill and decode sharing one GPU (two processes): greedy output equals a colocated worker's,
over both KV paths: the direct push (CUDA IPC of D's pool, same device) and UCX data messages of device
buffers (``SGLANG_DISAGGREGATION_DIRECT_COPY=0``). The cluster runs signed (a fresh cluster secret), so this
also covers the signed link and bootstrap tokens on CUDA. Run with ``pytest -m gpu tests/gpu`` on any GPU host.
"""

from __future__ import annotations

import random

import pytest
import requests
import torch
from test_pd_gpu import Cluster, ServerProcess, greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]
# Two workers on one card: each takes a small fixed pool instead of a share of the card's memory.
COMMON = (
    "--page-size",
    "16",
    "--max-total-tokens",
    "65536",
    "--chunked-prefill-size",
    "1024",
    "--mem-fraction-static",
    "0.3",
    "--dtype",
    "float32",
)


@pytest.mark.parametrize("path", ["direct", "ucx"])
def test_pd_on_one_gpu_equals_colocated(path, tiny_model_dir):
    tiny = str(tiny_model_dir("llama"))
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 600) for _ in range(n)] for n in (3, 17, 200, 1500)]
    colo = ServerProcess(tiny, "--device", "cuda", *COMMON)
    try:
        want = greedy(colo.url, prompts, 24)
    finally:
        colo.stop()
    env = {"SGLANG_DISAGGREGATION_DIRECT_COPY": "1" if path == "direct" else "0"}
    c = Cluster(
        tiny,
        1,
        1,
        worker_args=COMMON,
        device="cuda",
        gpu_ids=(0, 0),
        env=env,
        router_args=("--health-check-interval-secs", "0.5", "--health-success-threshold", "1"),
    )
    try:
        got = greedy(c.url, prompts, 24)
        meta = requests.post(
            c.url + "/generate", json={"input_ids": prompts[-1], "sampling_params": {"max_new_tokens": 1}}, timeout=300
        ).json()["meta_info"]
    finally:
        c.stop()
    assert meta["kv_transfer"]["path"] == path, meta
    assert [g for g, _ in got] == [w for w, _ in want]  # float32 on the peaked tiny checkpoint: exact
