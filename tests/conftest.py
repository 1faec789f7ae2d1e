"""Shared fixtures: tiny checkpoints per architecture and transformers' greedy decoding as the oracle."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from oracle import HFOracle

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; triton.jit reads this when a kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_model_dir(arch, seed=0, **overrides) -> directory of a checkpoint made by our tool (cached)."""
    from sglang_pd.tools.make_tiny_model import make_tiny_model

    made: dict[tuple, Path] = {}

    def get(arch: str = "llama", seed: int = 0, **overrides: object) -> Path:
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[key] = make_tiny_model(out, arch=arch, seed=seed, **overrides)
        return made[key]

    return get


@pytest.fixture(scope="session")
def hf_oracle() -> Callable[[Path], HFOracle]:
    made: dict[Path, HFOracle] = {}

    def get(path: Path) -> HFOracle:
        if path not in made:
            made[path] = HFOracle(path)
        return made[path]

    return get
