"""The pointwise ops of a decoder layer behind one small interface: plain torch, or fused Triton kernels.

``TorchOps`` is the reference (HF Llama numerics, runs anywhere). ``TritonOps`` calls ``pd_kernels/``:
RMSNorm with the residual add fused in, rotary embedding on q and k in one launch, SiLU-and-mul. The
model picks one by name at construction (``--attention-backend triton`` selects the Triton kernels
throughout, see ``sglang_pd.runtime_config``); nothing else in the model branches on it.

Every op returns new tensors and never reads tensor values on the host, so a forward built from
them can be captured in a CUDA graph.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from sglang_pd.models.rope import RotaryEmbedding


class LayerOps(ABC):
    name: str

    @abstractmethod
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) over the last dim; without residual, (norm(x), x)."""

    @abstractmethod
    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D], positions [T] int64 -> rotated q, k."""

    @abstractmethod
    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2I] = [gate | up] -> silu(gate) * up [T, I]."""


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: float32 mean of squares over the last dim, rsqrt, cast back, times weight."""
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + eps)
    return weight * x32.to(input_dtype)


class TorchOps(LayerOps):
    name = "torch"

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = residual + x  # the residual stream in the model dtype, HF's ``residual + hidden_states``
        return torch_rms_norm(x, weight, eps), x

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rope(q, k, positions)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonOps(LayerOps):
    """Fused kernels that round where torch rounds (HF's bf16 arithmetic), so they track ``TorchOps`` closely."""

    name = "triton"

    def __init__(self) -> None:
        # Imported here: triton.jit reads TRITON_INTERPRET at import, and CPU-only runs never need it.
        from pd_kernels.activation import silu_and_mul
        from pd_kernels.rmsnorm import rms_norm
        from pd_kernels.rotary import apply_rotary

        self._rms_norm, self._rotary, self._silu_and_mul = rms_norm, apply_rotary, silu_and_mul

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rms_norm(x, weight, eps, residual)  # takes strided [T, H, D] q/k views as they are

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotary(q, k, positions, rope.cos_cache, rope.sin_cache)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._silu_and_mul(x)


LAYER_OPS: dict[str, type[LayerOps]] = {"torch": TorchOps, "triton": TritonOps}


def create_layer_ops(name: str) -> LayerOps:
    try:
        return LAYER_OPS[name]()
    except KeyError:
        raise ValueError(f"layer ops {name!r} are not available; choose one of {sorted(LAYER_OPS)}") from None
