"""RMSNorm over the last dim, optionally fused with the residual add: one read of x (and residual), one write each.

Layout: ``x [..., N]`` with a unit last-dim stride whose leading dims collapse to at most two strided dims,
viewed as rows ``[A, B, N]`` with strides ``(sa, sb, 1)``: a contiguous ``[T, N]``, a ``[T, N]`` row slice of a
wider tensor, or a ``[T, H, D]`` per-head view of a fused qkv slice (q/k norm). ``residual`` has x's shape,
its own strides. Outputs are new contiguous tensors shaped like x. ``N <= MAX_N``; weight is ``[N]``.

Numerics equal ``sglang_pd.models.ops.torch_rms_norm`` / ``RMSNorm.forward`` (HF Llama), step for step:
  s   = residual + x, rounded to the dtype            (torch's add in the dtype)
  n   = float32 s * rsqrt(mean(float32 s^2) + eps), rounded to the dtype
  out = n * weight, rounded to the dtype              (torch's multiply in the dtype)
Only the order of the float32 sum of squares and rsqrt's rounding differ from torch, so float32 results
agree to a few ulp, and s is bit-identical in every dtype.

No host syncs: safe inside CUDA-graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_N = 65536
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    num_rows,
    inner,
    n_cols,
    x_sa,
    x_sb,
    r_sa,
    r_sb,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program p owns rows [p * BLOCK_R, (p + 1) * BLOCK_R) of the flattened [A * B] rows; row = a * inner + b
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < num_rows)[:, None] & col_ok[None, :]
    a = rows // inner
    b = rows % inner
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + (a * x_sa + b * x_sb)[:, None] + cols[None, :], mask=mask, other=0.0)
    out_off = rows[:, None] * n_cols + cols[None, :]
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + (a * r_sa + b * r_sb)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + out_off, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    normed = (xf * inv_rms[:, None]).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_off, (normed * w[None, :]).to(dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(norm(residual + x), residual + x)``; without residual, ``(norm(x), x)`` (x itself).

    x ``[..., N]`` float32/float16/bfloat16, weight ``[N]`` in x's dtype, residual like x (see the module
    docstring for the accepted strides). The sum is a new contiguous tensor; residual is not modified.
    """
    _check(x, weight, residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if residual is not None else out
    if x.numel() == 0:
        return out, (total if residual is not None else x)
    x3 = _rows(x, "x")
    r3 = _rows(residual, "residual") if residual is not None else x3
    num_a, inner, n = x3.shape
    block_n = triton.next_power_of_2(n)
    block_r = max(1, min(64, 4096 // block_n))
    num_rows = num_a * inner
    _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
        x3,
        r3,
        weight,
        out,
        total,
        num_rows,
        inner,
        n,
        x3.stride(0),
        x3.stride(1),
        r3.stride(0),
        r3.stride(1),
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        num_warps=min(16, max(1, block_r * block_n // 512)),
    )
    return out, (total if residual is not None else x)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_N:
        raise ValueError(f"x must be [..., N] with 1 <= N <= {MAX_N}, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight is {weight.dtype} on {weight.device}; x is {x.dtype} on {x.device}")
    if weight.shape != (n,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous [{n}], got shape {tuple(weight.shape)}")
    if residual is None:
        return
    if residual.dtype != x.dtype or residual.device != x.device:
        raise TypeError(f"residual is {residual.dtype} on {residual.device}; x is {x.dtype} on {x.device}")
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t [..., N]`` as a ``[A, B, N]`` view (no copy); ValueError when its strides do not allow it."""
    n = t.shape[-1]
    if t.stride(-1) != 1 and n > 1:
        raise ValueError(f"{name} must have a unit stride in its last dim, got strides {t.stride()}")
    try:
        return t.view(-1, 1, n)
    except RuntimeError:
        pass
    try:
        return t.view(-1, t.shape[-2], n)
    except RuntimeError:
        raise ValueError(
            f"{name}'s leading dims must collapse to at most two strided dims, got shape "
            f"{tuple(t.shape)} strides {t.stride()}"
        ) from None


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch code the kernel replaces (``RMSNorm.forward`` in sglang_pd.models.layers)."""
    input_dtype = x.dtype
    if residual is not None:
        x = residual + x
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(input_dtype), x
