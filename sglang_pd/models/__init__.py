"""Models: one config-driven decoder for the Llama family, loaded from an HF checkpoint directory.

config.ModelConfig      config.json (+ generation_config.json) -> frozen architecture facts
                        (Llama, Mistral, Qwen2, Qwen3; rope from rope_parameters or rope_scaling)
rope                    RopeConfig, inverse frequencies per rope type (as transformers computes them),
                        RotaryEmbedding (float32 cos/sin cache, rotate-half)
ops                     the pointwise ops of a layer: TorchOps (reference) or TritonOps (fused)
layers                  Linear, RMSNorm (+ fused residual add), gated SiLU MLP, embedding, LM head
decoder                 DecoderForCausalLM: ForwardBatch + AttentionBackend -> hidden rows -> logits
loader.load_model       build on the target device/dtype, fill from safetensors ("auto") or seeded
                        random weights ("dummy")

Data flow: ModelConfig.from_pretrained(path) -> load_model(config, path, ...) -> model(batch, attn)
-> model.compute_logits(hidden) (float32 [N, vocab]).
"""
