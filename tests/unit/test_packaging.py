"""Packaging facts: the four import packages exist, and our top-level ``kernels`` does not break transformers."""

from __future__ import annotations

import subprocess
import sys


def test_import_packages_have_docstrings():
    import kernels
    import router
    import sglang_pd
    import transfer

    for mod in (sglang_pd, router, transfer, kernels):
        assert mod.__doc__ and len(mod.__doc__.strip()) > 20


def test_transformers_still_loads_models_with_our_kernels_package(tiny_model_dir):
    # A fresh interpreter, so transformers' availability probes run with our ``kernels`` importable.
    path = tiny_model_dir("llama")
    code = (
        "import kernels, transformers, torch;"
        "from transformers.utils import import_utils as iu;"
        "assert not iu.is_kernels_available(), 'transformers mistook our kernels package for HF kernels';"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r});"
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 3," in out.stdout
