"""Attention backends behind one interface (base.AttentionBackend), chosen by name at startup.

forward_batch.ForwardBatch  the flattened tokens + paged-KV metadata of one forward
base.AttentionBackend       store new K/V into the KV cache, attend over each sequence's pages
torch_backend               reference implementation in plain torch (CPU and GPU)
triton_backend              pd_kernels/ decode (split-KV) and extend attention; default on CUDA, graph-safe
registry                    name -> backend class (``--attention-backend``)
"""
