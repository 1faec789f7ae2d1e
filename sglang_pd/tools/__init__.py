"""Developer tools (command-line entry points, no engine state).

make_tiny_model   write a tiny random HF checkpoint (config, safetensors, tokenizer with chat template)
                  for llama / mistral / qwen2 / qwen3; tests and local runs use it instead of the hub
"""
