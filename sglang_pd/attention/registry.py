"""``--attention-backend`` name -> backend class."""

from __future__ import annotations

from sglang_pd.attention.base import AttentionBackend
from sglang_pd.attention.torch_backend import TorchAttentionBackend
from sglang_pd.attention.triton_backend import TritonAttentionBackend
from sglang_pd.mem.kv_cache import KVCache

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchAttentionBackend,
    "triton": TritonAttentionBackend,
}


def create_attention_backend(name: str, kv_cache: KVCache) -> AttentionBackend:
    try:
        cls = ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"attention_backend {name!r} is not available; choose one of {sorted(ATTENTION_BACKENDS)}"
        ) from None
    return cls(kv_cache)
