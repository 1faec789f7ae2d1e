"""Settings that depend on the machine and the checkpoint, resolved once at startup from ServerArgs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from sglang_pd.models.config import ModelConfig
from sglang_pd.server_args import ServerArgs

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_BYTES_DEFAULT = 2 << 30  # default CPU pool: at most 2 GiB of KV ...
CPU_KV_TOKENS_DEFAULT = 65536  # ... and at most this many tokens


@dataclass(frozen=True)
class RuntimeConfig:
    device: torch.device
    dtype: torch.dtype
    context_length: int
    attention_backend: str  # also names the pointwise ops (sglang_pd.models.ops): torch or triton
    cuda_graph_max_bs: int  # 0: decode runs eagerly


def resolve_runtime(args: ServerArgs, model_config: ModelConfig) -> RuntimeConfig:
    device = _resolve_device(args)
    dtype = _resolve_dtype(args.dtype, device, model_config)
    ctx = args.context_length or model_config.max_position_embeddings
    if ctx > model_config.max_position_embeddings:
        raise ValueError(
            f"context_length {ctx} exceeds the model's max_position_embeddings "
            f"({model_config.max_position_embeddings}); rope tables end there"
        )
    backend = _resolve_attention_backend(args.attention_backend, device)
    graphs = device.type == "cuda" and backend == "triton" and not args.disable_cuda_graph
    if device.type == "cuda" and backend == "torch" and not args.disable_cuda_graph:
        logger.info("CUDA graphs are off: the torch attention backend sizes its tensors on the host per batch")
    return RuntimeConfig(
        device=device,
        dtype=dtype,
        context_length=ctx,
        attention_backend=backend,
        cuda_graph_max_bs=args.cuda_graph_max_bs if graphs else 0,
    )


def _resolve_attention_backend(name: str | None, device: torch.device) -> str:
    """triton on CUDA, torch on CPU; triton on CPU only inside Triton's interpreter (tests)."""
    backend = name or ("triton" if device.type == "cuda" else "torch")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "attention_backend 'triton' needs a CUDA device; on CPU use 'torch' "
            "(or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter, slowly)"
        )
    return backend


def _resolve_device(args: ServerArgs) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    if args.base_gpu_id >= torch.cuda.device_count():
        raise ValueError(f"base_gpu_id {args.base_gpu_id} is out of range: {torch.cuda.device_count()} GPU(s) visible")
    return torch.device("cuda", args.base_gpu_id)


def _resolve_dtype(name: str, device: torch.device, model_config: ModelConfig) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    ckpt = model_config.torch_dtype
    return ckpt if ckpt in (torch.bfloat16, torch.float16) else torch.bfloat16


def kv_pool_tokens(args: ServerArgs, runtime: RuntimeConfig, bytes_per_token: int) -> int:
    """Pool capacity in tokens: --max-total-tokens, else what memory allows."""
    if args.max_total_tokens is not None:
        return args.max_total_tokens
    if runtime.device.type == "cpu":
        return min(CPU_KV_TOKENS_DEFAULT, CPU_KV_BYTES_DEFAULT // bytes_per_token)
    free, total = torch.cuda.mem_get_info(runtime.device)
    used = total - free
    budget = int(total * args.mem_fraction_static) - used
    if budget <= 0:
        raise ValueError(
            f"mem_fraction_static={args.mem_fraction_static} leaves no room for the KV pool "
            f"({used / 2**30:.1f} GiB of {total / 2**30:.1f} GiB already in use)"
        )
    return budget // bytes_per_token
