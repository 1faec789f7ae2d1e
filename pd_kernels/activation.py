"""SiLU-and-mul of a fused gate/up projection: ``x [..., 2I] = [gate | up] -> silu(gate) * up [..., I]``.

Layout: x's leading dims collapse to rows ``[T, 2I]`` with a unit last-dim stride and any row stride (a
row slice of a wider buffer is fine); the output is a new contiguous ``[..., I]``.

Numerics follow torch's ``F.silu(gate) * up`` in the dtype, rounding for rounding: silu is computed in
float32 (``g / (1 + exp(-g))``) and rounded to the dtype, then the product is computed in float32 and
rounded. Only ``exp``'s last ulp may differ from torch's.

Grid: (T, blocks of BLOCK columns of I). No host syncs: safe inside CUDA-graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, x_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    src = x_ptr + row * x_row_stride + cols
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2I]`` (float32/float16/bfloat16) -> ``silu(x[..., :I]) * x[..., I:]`` as a new ``[..., I]``."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x must be [..., 2I], got shape {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        raise ValueError(f"x must have a unit last-dim stride, got strides {x.stride()}")
    try:
        rows = x.view(-1, 2 * inter)
    except RuntimeError:
        raise ValueError(f"x's leading dims must collapse to one, got strides {x.stride()}") from None
    block = min(2048, triton.next_power_of_2(inter))
    grid = (rows.shape[0], triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](rows, out, inter, rows.stride(0), BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """The torch code the kernel replaces (``GatedMLP.forward`` in sglang_pd.models.layers)."""
    gate, up = x.split(x.shape[-1] // 2, dim=-1)
    return torch.nn.functional.silu(gate) * up
