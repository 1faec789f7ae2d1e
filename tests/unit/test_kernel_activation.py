"""pd_kernels.activation: silu_and_mul vs torch's ``F.silu(gate) * up`` over odd shapes and strided rows."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICES, nan_empty

from pd_kernels.activation import silu_and_mul, silu_and_mul_ref


def rand(*shape: int, device: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(device=device, dtype=dtype)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), "kernel left elements unwritten"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:  # torch's two roundings, reproduced: an ulp apart only where exp's last bit differs
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=1e-2)
        assert (out != ref).float().mean().item() < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,inter", [(1, 128), (3, 80), (17, 200), (2, 2500)])
def test_matches_reference(device: str, tokens: int, inter: int) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    x = rand(tokens, 2 * inter, device=device, dtype=dtype)
    with nan_empty():
        out = silu_and_mul(x)
    assert_matches(out, silu_and_mul_ref(x))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_leading_dims(device: str) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    wide = rand(5, 400, device=device, dtype=dtype, seed=1)
    x = wide[:, 16:176]  # row stride 400, 2I = 160
    with nan_empty():
        out = silu_and_mul(x)
    assert_matches(out, silu_and_mul_ref(x))
    x3 = rand(2, 3, 96, device=device, dtype=dtype, seed=2)
    with nan_empty():
        out3 = silu_and_mul(x3)
    assert out3.shape == (2, 3, 48)
    assert_matches(out3, silu_and_mul_ref(x3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_large_on_cuda(dtype: torch.dtype) -> None:
    x = rand(4096, 2 * 14336, device="cuda", dtype=dtype, seed=3)
    with nan_empty():
        out = silu_and_mul(x)
    ref = silu_and_mul_ref(x)
    if dtype == torch.float32:  # the GPU's exp is not torch's to the last ulp
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert_matches(out, ref)


def test_checks() -> None:
    with pytest.raises(TypeError):
        silu_and_mul(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="2I"):
        silu_and_mul(torch.randn(2, 5))
    with pytest.raises(ValueError, match="unit last-dim"):
        silu_and_mul(torch.randn(2, 8)[:, ::2])
    with pytest.raises(ValueError, match="collapse"):
        silu_and_mul(torch.randn(4, 3, 8).transpose(0, 1))
    assert silu_and_mul(torch.randn(0, 8)).shape == (0, 4)
