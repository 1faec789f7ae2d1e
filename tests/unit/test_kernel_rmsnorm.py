"""pd_kernels.rmsnorm: fused residual add + RMSNorm vs the model's torch code, over awkward shapes and strides."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICES, nan_empty

from pd_kernels.rmsnorm import rms_norm, rms_norm_ref
from sglang_pd.models.layers import RMSNorm
from sglang_pd.models.ops import torch_rms_norm as model_rms_norm

EPS = 1e-6


def dtype_for(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def rand(*shape: int, device: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), "kernel left elements unwritten"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # one bf16 ulp at most, and nearly always bit-identical (same rounding steps as torch)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=1e-2)
        assert (out != ref).float().mean().item() < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,n", [(1, 128), (3, 80), (17, 200), (5, 1), (2, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(device: str, tokens: int, n: int, with_residual: bool) -> None:
    dtype = dtype_for(device)
    x = rand(tokens, n, device=device, dtype=dtype, seed=1)
    weight = rand(n, device=device, dtype=dtype, seed=2)
    residual = rand(tokens, n, device=device, dtype=dtype, seed=3) if with_residual else None
    with nan_empty():
        out, total = rms_norm(x, weight, EPS, residual)
    ref_out, ref_total = rms_norm_ref(x, weight, EPS, residual)
    assert_matches(out, ref_out)
    assert torch.equal(total, ref_total)  # the residual stream is bit-exact in every dtype
    if residual is None:
        assert total is x


@pytest.mark.parametrize("device", DEVICES)
def test_per_head_norm_of_strided_qkv_slice(device: str) -> None:
    """q/k norm: [T, H, D] views of a fused qkv output (rows are not uniformly strided)."""
    dtype = dtype_for(device)
    tokens, heads, kv_heads, head_dim = 3, 4, 2, 64
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype, seed=4)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    weight = rand(head_dim, device=device, dtype=dtype, seed=5)
    for x in (q, k):
        assert not x.is_contiguous()
        with nan_empty():
            out, same = rms_norm(x, weight, EPS)
        assert same is x
        assert_matches(out, model_rms_norm(x, weight, EPS))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_residual(device: str) -> None:
    dtype = dtype_for(device)
    wide = rand(7, 300, device=device, dtype=dtype, seed=6)
    x, residual = wide[:, :96], wide[:, 100:196]  # row stride 300, N = 96
    weight = rand(96, device=device, dtype=dtype, seed=7)
    with nan_empty():
        out, total = rms_norm(x, weight, EPS, residual)
    ref_out, ref_total = rms_norm_ref(x, weight, EPS, residual)
    assert_matches(out, ref_out)
    assert torch.equal(total, ref_total)


def test_float32_agrees_with_the_model_layer() -> None:
    """The existing torch RMSNorm (the engine's reference numerics) and the kernel agree to a few ulp."""
    layer = RMSNorm(200, EPS, torch.float32, "cpu")
    layer.weight.copy_(rand(200, device="cpu", dtype=torch.float32, seed=8))
    x = rand(9, 200, device="cpu", dtype=torch.float32, seed=9)
    residual = rand(9, 200, device="cpu", dtype=torch.float32, seed=10)
    ref_out, ref_total = layer(x, residual)
    out, total = rms_norm(x, layer.weight, EPS, residual)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(out, ref_out, rtol=4e-7, atol=4e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [4096, 5120, 8192, 16384])
def test_large_bf16_on_cuda(n: int) -> None:
    x = rand(4096, n, device="cuda", dtype=torch.bfloat16, seed=11)
    residual = rand(4096, n, device="cuda", dtype=torch.bfloat16, seed=12)
    weight = rand(n, device="cuda", dtype=torch.bfloat16, seed=13)
    with nan_empty():
        out, total = rms_norm(x, weight, EPS, residual)
    ref_out, ref_total = rms_norm_ref(x, weight, EPS, residual)
    assert_matches(out, ref_out)
    assert torch.equal(total, ref_total)


@pytest.mark.parametrize("bad", ["dtype", "weight_shape", "residual_shape", "int", "gather_rows"])
def test_checks(bad: str) -> None:
    x = torch.randn(4, 8)
    weight, residual = torch.randn(8), None
    expected: type[Exception] = ValueError
    if bad == "dtype":
        weight, expected = weight.half(), TypeError
    elif bad == "weight_shape":
        weight = torch.randn(9)
    elif bad == "residual_shape":
        residual = torch.randn(4, 9)
    elif bad == "int":
        x, expected = x.long(), TypeError
    else:
        x = torch.randn(4, 3, 8).transpose(0, 1)[:, ::2]  # [3, 2, 8]: leading dims do not collapse to 2
        x = x.unsqueeze(0).expand(2, 3, 2, 8)
    with pytest.raises(expected):
        rms_norm(x, weight, EPS, residual)
