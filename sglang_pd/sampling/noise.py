"""Counter-based random noise: a pure function of (seed, step, token id), bit-identical on any device.

Seeded sampling must not depend on a global generator, on the batch a request lands in, or on
its row within it: a request that is preempted and recomputed must draw the same tokens. So the
uniform for token ``v`` of a row is ``hash(seed, step, v)``, computed with integer tensor ops.

Invariant: every intermediate value is a non-negative int64 below 2**49, so no operation can
overflow (signed overflow is UB in C++; CPU and CUDA kernels agree only without it). 32-bit words
live in int64 tensors; a 32x32-bit multiply mod 2**32 is split into two 32x16-bit products.
The mixer is the murmur3 32-bit finaliser; a token's word is mixed twice with two 32-bit row
keys, which together depend on all 63 seed bits and 32 step bits.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_FMIX_MUL_1 = 0x85EBCA6B
_FMIX_MUL_2 = 0xC2B2AE35
_KEY_SALT_1 = 0x9E3779B9
_KEY_SALT_2 = 0x7F4A7C15
_STEP_MUL = 0x2545F491  # odd: a bijection on 32-bit step counters
_UNIFORM_BITS = 23  # (k + 0.5) / 2**23 is exact in float32 and lies strictly inside (0, 1)


def _mul32_(x: torch.Tensor, c: int, tmp: torch.Tensor) -> None:
    """x <- (x * c) mod 2**32 in place, for x in [0, 2**32), c in [0, 2**32); intermediates < 2**49.

    ``tmp`` is scratch of x's shape; in-place ops keep large CPU batches off the allocator.
    """
    torch.mul(x, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    x.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(_MASK32)


def _fmix32_(h: torch.Tensor, tmp: torch.Tensor) -> None:
    """h <- murmur3 finaliser of h, in place: a bijection on [0, 2**32) with full avalanche."""
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))
    _mul32_(h, _FMIX_MUL_1, tmp)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 13, out=tmp))
    _mul32_(h, _FMIX_MUL_2, tmp)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """Out-of-place ``_fmix32_`` (h is not modified)."""
    out = h.clone()
    _fmix32_(out, torch.empty_like(out))
    return out


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    out = x.clone()
    _mul32_(out, c, torch.empty_like(out))
    return out


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row from ``seeds`` [S] in [0, 2**63) and ``steps`` [S] >= 0 (int64)."""
    seed_lo = seeds & _MASK32
    seed_hi = seeds >> 32  # < 2**31
    step = steps & _MASK32
    a = _fmix32(_fmix32(seed_hi ^ _KEY_SALT_1) ^ seed_lo)
    b = _fmix32(_fmix32(seed_lo ^ _KEY_SALT_2) ^ seed_hi)
    k1 = _fmix32(a ^ step)
    k2 = _fmix32(b ^ _mul32(step, _STEP_MUL))
    return k1, k2


def uniform_from_keys(k1: torch.Tensor, k2: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[S, K] float32 uniforms in (0, 1) for row keys ``k1``, ``k2`` [S] (from ``row_keys``)."""
    h = torch.bitwise_and(token_ids, _MASK32).bitwise_xor_(k1[:, None])
    tmp = torch.empty_like(h)
    _fmix32_(h, tmp)
    _fmix32_(h.bitwise_xor_(k2[:, None]), tmp)
    bits = h.bitwise_right_shift_(32 - _UNIFORM_BITS).to(torch.float32)  # < 2**23: exact
    return bits.add_(0.5).mul_(2.0**-_UNIFORM_BITS)


def exponential_from_keys(k1: torch.Tensor, k2: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[S, K] float32 Exp(1) draws, strictly positive and finite (inverse CDF of the uniforms)."""
    return uniform_from_keys(k1, k2, token_ids).log_().neg_()


def uniform(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[S, K] float32 uniforms in (0, 1); entry (i, j) depends only on seeds[i], steps[i], token_ids[i, j]."""
    return uniform_from_keys(*row_keys(seeds, steps), token_ids)


def exponential(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``exponential_from_keys`` for ``row_keys(seeds, steps)``."""
    return exponential_from_keys(*row_keys(seeds, steps), token_ids)
