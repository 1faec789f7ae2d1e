"""kernels: Triton kernels, each beside a pure-torch reference. Imports only torch/triton.

Note: a Hugging Face package is also called ``kernels`` and transformers probes for it; a test keeps
checking that transformers still imports and loads models with this package installed.
"""
