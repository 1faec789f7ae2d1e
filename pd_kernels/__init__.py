"""pd_kernels: Triton kernels, each beside a pure-torch reference. Imports only torch/triton.

One op per module; import the module you need (nothing is imported eagerly here, so importing the package
does not import triton):
    rmsnorm     rms_norm(x, weight, eps, residual=None) -> (normed, residual stream)   [+ rms_norm_ref]
    rotary      apply_rotary(q, k, positions, cos_cache, sin_cache) -> (q, k) new;
                apply_rotary_(...) in place                                           [+ apply_rotary_ref]
    activation  silu_and_mul(x [..., 2I]) -> [..., I]                                  [+ silu_and_mul_ref]
    kv_store    store_kv(k_cache, v_cache, slots, k, v) -> None (both in one launch)   [+ store_kv_ref]
    kv_pack     pack_pages(kv_buffer, page_idx, out) / unpack_pages(kv_buffer, page_idx, staging)
                (page gather/scatter for the KV transfer; used by transfer.pack on CUDA) [+ *_ref]
    kv_copy     whole pages from one pool into another in one launch (the direct handoff on one host)
    decode_attention  paged split-KV decode attention (two stages)             [+ reference]
    extend_attention  paged causal prefill/extend attention over a prefix     [+ reference]
Launchers check shapes/strides/dtypes on the host only (no device syncs: safe in CUDA-graph capture).
On a machine without a GPU, set ``TRITON_INTERPRET=1`` before importing a kernel module.

Named ``pd_kernels`` (not ``kernels``): Hugging Face's ``kernels`` package, which transformers depends on
and imports, must stay importable beside ours (tests/unit/test_packaging.py).
"""
