"""Helpers shared by the kernel tests: the device parameter and a NaN-filling ``torch.empty``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)
DEVICES = ["cpu", CUDA]  # cpu runs the kernels in Triton's interpreter (tests/conftest.py)


@contextmanager
def nan_empty() -> Iterator[None]:
    """Inside, ``torch.empty`` fills floats with NaN, so an element the kernel never wrote shows up."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
