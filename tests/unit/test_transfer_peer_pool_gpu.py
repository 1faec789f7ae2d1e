"""The checks P makes before mapping a CUDA IPC pool offer, on one GPU with D in another process: a true offer
maps and P's copy lands in D's pool; an offer claiming more than its allocation, or a bad handle, is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]
DECODE = textwrap.dedent("""
    import json, sys, torch
    from transfer.peer_pool import export_pool
    kv = torch.zeros(2, 2, 64, 4, 2, 8, dtype=torch.bfloat16, device="cuda")
    offer = export_pool(kv).to_dict()
    offer["handle"] = offer["handle"].hex()
    print(json.dumps(offer), flush=True)
    sys.stdin.readline()  # P wrote pages 5 and 6
    torch.cuda.synchronize()
    print(json.dumps({"p5": kv[:, :, 5].float().sum().item(), "p6": kv[:, :, 6].float().sum().item(),
                      "rest": kv[:, :, 7:].float().abs().sum().item()}), flush=True)
""")


def test_cuda_ipc_offer_checks() -> None:
    from transfer.peer_pool import PeerPoolError, PoolOffer, open_pool

    d = subprocess.Popen(
        [sys.executable, "-c", DECODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), **__import__("os").environ},
    )
    assert d.stdin is not None and d.stdout is not None
    try:
        raw = json.loads(d.stdout.readline())
        raw["handle"] = bytes.fromhex(raw["handle"])
        offer = PoolOffer.from_dict(raw)
        kv = torch.ones(2, 2, 16, 4, 2, 8, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(PeerPoolError, match="exceeds the mapped allocation"):
            open_pool(replace(offer, offset=1 << 30), kv)  # far past the caching allocator's segment
        with pytest.raises(PeerPoolError, match="64 bytes"):
            open_pool(replace(offer, handle=offer.handle[:10]), kv)
        with pytest.raises(PeerPoolError, match="pages need"):
            open_pool(replace(offer, num_pages=offer.num_pages + 1), kv)
        pool = open_pool(offer, kv)
        pool.check([5, 6])
        pool.write(kv, [1, 2], torch.tensor([5, 6], device="cuda"))
        torch.cuda.synchronize()
        pool.close()
        d.stdin.write("go\n")
        d.stdin.flush()
        seen = json.loads(d.stdout.readline())
        per_page = 2 * 2 * 4 * 2 * 8
        assert seen == {"p5": per_page, "p6": per_page, "rest": 0.0}
    finally:
        d.kill()
        d.wait(10)
