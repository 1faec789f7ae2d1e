"""Packaging facts: the import packages exist, and ours never shadow Hugging Face's ``kernels`` package.

transformers (>= 5.2x) depends on HF ``kernels`` and imports it at model-load time; our Triton kernels
live in ``pd_kernels`` so that both can be installed side by side (a top-level ``kernels`` of ours
broke every model load when transformers began requiring HF's).
"""

from __future__ import annotations

import subprocess
import sys


def test_import_packages_have_docstrings():
    import pd_kernels
    import router
    import sglang_pd
    import transfer

    for mod in (sglang_pd, router, transfer, pd_kernels):
        assert mod.__doc__ and len(mod.__doc__.strip()) > 20


def test_transformers_loads_models_beside_our_packages(tiny_model_dir):
    # A fresh interpreter started in the repo root (our packages importable from the working directory too),
    # so transformers' availability probes see exactly what a server process sees.
    path = tiny_model_dir("llama")
    code = (
        "import pd_kernels, transfer, sglang_pd, transformers, torch;"
        "import importlib.util as u;"
        "spec = u.find_spec('kernels');"
        "assert spec is None or 'pd_kernels' not in (spec.origin or ''), spec;"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r});"
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 3," in out.stdout
