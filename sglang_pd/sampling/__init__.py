"""Sampling: request parameters in, one token per row out.

params.SamplingParams      validated, frozen per-request parameters (SGLang names and defaults);
                           ``from_dict`` parses a request's ``sampling_params`` object
sampler.SamplingRow        what the scheduler fills per request per step (params, seed, step, ids)
sampler.SamplingBatchInfo  rows gathered into device tensors (``build``)
sampler.Sampler            logits [B, V] + batch info -> SampleOutput (token ids, logprobs)
noise                      counter-based Exp(1) noise keyed by (seed, step, token id): seeded
                           draws independent of batch composition, row order and preemption

Flow: scheduler -> SamplingRow per request -> SamplingBatchInfo.build -> Sampler(logits, info).
"""
