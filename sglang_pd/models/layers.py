"""Building blocks of the decoder: Linear, RMSNorm (+ fused residual add), gated SiLU MLP, embedding.

Every parameter is allocated with ``torch.empty`` directly on the target device and dtype (no init
pass, no CPU float32 staging); the loader fills them. Parameters never require grad.
Numerics follow HF Llama: RMSNorm in float32, cast back, then times the weight in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang_pd.models.ops import LayerOps, TorchOps

Device = torch.device | str | None


def empty_param(shape: tuple[int, ...], dtype: torch.dtype, device: Device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x @ weight.T + bias; weight [out_features, in_features] like nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = empty_param((out_features, in_features), dtype, device)
        self.bias = empty_param((out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(
        self, hidden_size: int, eps: float, dtype: torch.dtype, device: Device, ops: LayerOps | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_param((hidden_size,), dtype, device)
        self.ops = ops or TorchOps()

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Plain RMSNorm over the last dim (q_norm/k_norm use it on [T, heads, head_dim])."""
        return self.ops.rms_norm(x, self.weight, self.eps)[0]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); without residual, (norm(x), x).

        The sum is the residual stream in the model dtype, exactly HF's ``residual + hidden_states``.
        """
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused: gate_up_proj.weight = [gate; up]."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool,
        dtype: torch.dtype,
        device: Device,
        ops: LayerOps | None = None,
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.ops = ops or TorchOps()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias, dtype, device)
        self.down_proj = Linear(intermediate_size, hidden_size, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class Embedding(nn.Module):
    """Token embedding, weight [vocab_size, hidden_size]; also the LM head when embeddings are tied."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.weight = empty_param((vocab_size, hidden_size), dtype, device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects final hidden states [N, hidden] to float32 logits [N, vocab_size]."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.weight = empty_param((vocab_size, hidden_size), dtype, device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight).float()
