"""Write a tiny random HF checkpoint directory that transformers' Auto classes load offline.

    python -m sglang_pd.tools.make_tiny_model OUT_DIR --arch llama|mistral|qwen2|qwen3 [--seed N] [--shards K]

Contents: config.json (written by transformers' own config class), model.safetensors (or K shards
plus model.safetensors.index.json), generation_config.json (EOS ids), and a byte-level BPE tokenizer
trained on the text below (tokenizer.json + tokenizer_config.json with a ChatML chat template).
Everything is a pure function of (arch, seed, overrides): two runs write identical bytes.

Weights are "peaked": the LM head is scaled so logits have a standard deviation of ~``LOGIT_STD``,
which keeps greedy decoding far from near-ties (median top-1 margin of several units, minimum over
long greedy runs ~1e-2, against float32 noise of ~1e-5). LM-head rows of special tokens (except
EOS) and of non-printable byte fragments are scaled down so greedy output is mostly readable text,
and o_proj/down_proj are scaled up so the output depends on the context, not only the last token.
Sizes: hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128, context 2048; llama uses llama3
rope scaling, mistral a 4096 sliding window, qwen2 q/k/v bias, qwen3 q/k norm, head_dim 32 and
tied embeddings. Keyword overrides go to the transformers config class.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
BOS, PAD, IM_START, IM_END = "<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, PAD, IM_START, IM_END)  # ids 0..3, in this order
TOKENIZER_VOCAB_SIZE = 640
LOGIT_STD = 12.0  # std of a logit given a unit-RMS final hidden state
EMBED_STD = 1.0
OUT_PROJ_GAIN = 3.0  # o_proj/down_proj outputs outweigh the token's own embedding: output depends on context
QUIET_TOKEN_GAIN = 0.25  # LM-head rows of special/byte-fragment tokens: greedy output stays readable text
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A serving engine reads a prompt, splits it into tokens,
and runs the model over them once to fill its cache of keys and values. After that it produces one
token at a time, and each new token attends to everything that came before it. When many people send
requests at the same moment, the engine groups them into batches so that the hardware stays busy.
Some requests are long and some are short; some ask a question and some ask for a story.

Once upon a time there was a small village by the sea. Every morning the fishermen went out in their
boats, and every evening they came back with the day's catch. The children ran along the beach,
collecting shells and stones, and the old women sat by their doors telling stories about the storms
of years long past. One winter a stranger arrived with a map, a lantern, and a book full of numbers.
He said the numbers could predict the weather, and nobody believed him until the first storm came
exactly on the day he had written down.

Hello! How are you today? I am fine, thank you. What is the capital of France? The capital of France
is Paris. What is two plus two? Two plus two is four. Please write a short poem about the moon.
The moon is bright, the night is long, the river hums a quiet song. Can you explain how a computer
works? A computer follows instructions: it reads numbers from memory, changes them, and writes them
back, billions of times every second. Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024
appear in many texts, as do symbols such as (, ), [, ], {, }, <, >, =, +, -, *, /, %, #, @ and &.

The system answered every question politely. The user thanked the assistant and asked another one.
Good morning, good afternoon, good evening, and good night. Yes, no, maybe, always, never, sometimes.
Science, history, music, mathematics, language, cooking, travel, sports, weather, and the stars.
"""


def _train_tokenizer() -> Any:
    """A byte-level BPE (tokenizers library), special tokens first; deterministic for a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    return tok


def _is_plain_text(text: str) -> bool:
    return text != "" and text.isascii() and all(c.isprintable() or c == "\n" for c in text)


def quiet_token_ids(tok: Any) -> list[int]:
    """Ids greedy decoding should rarely pick: specials other than EOS, non-printable byte fragments."""
    eos = SPECIAL_TOKENS.index(IM_END)
    specials = [i for i in range(len(SPECIAL_TOKENS)) if i != eos]
    fragments = [i for i in range(len(SPECIAL_TOKENS), tok.get_vocab_size()) if not _is_plain_text(tok.decode([i]))]
    return specials + fragments


def write_tokenizer(out_dir: Path) -> tuple[int, list[int]]:
    """Writes tokenizer.json + tokenizer_config.json (with the chat template); returns
    (vocab size, quiet token ids)."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # never a model-specific class that rebuilds it
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)  # one copy: tokenizer_config.json's
    return len(fast), quiet_token_ids(tok)


def tiny_config_kwargs(arch: str, vocab_size: int) -> dict[str, Any]:
    """Config-class kwargs of the tiny model of ``arch`` (before user overrides)."""
    ids = {name: SPECIAL_TOKENS.index(tok) for name, tok in (("bos", BOS), ("pad", PAD), ("eos", IM_END))}
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if arch == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,  # low/high-frequency bands both exist at head_dim 16
        }
    elif arch == "mistral":
        common["sliding_window"] = 4096
    elif arch == "qwen3":
        common.update(head_dim=32, tie_word_embeddings=True, attention_bias=False)
    return {**common, "rope_parameters": rope}


def _config_class(arch: str) -> Any:
    import transformers

    names = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    return getattr(transformers, names[arch])


def init_tensor(name: str, shape: tuple[int, ...], config: Any, gen: torch.Generator) -> torch.Tensor:
    """Deterministic init by role: unit-scale projections, near-1 norms, a peaked LM head."""
    head_std = LOGIT_STD / math.sqrt(config.hidden_size)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if name == "model.embed_tokens.weight":  # a tied embedding doubles as the peaked head
        return (head_std if config.tie_word_embeddings else EMBED_STD) * torch.randn(shape, generator=gen)
    if name == "lm_head.weight":
        return head_std * torch.randn(shape, generator=gen)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return (OUT_PROJ_GAIN / math.sqrt(shape[1])) * torch.randn(shape, generator=gen)
    if name.endswith(".weight") and len(shape) == 2:
        return torch.randn(shape, generator=gen) / math.sqrt(shape[1])  # outputs ~ unit scale
    raise ValueError(f"no init rule for tensor {name} {shape}")


def random_state_dict(config: Any, seed: int, quiet_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors of the model ``config`` describes (names/shapes from the HF model)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    out = {name: init_tensor(name, shapes[name], config, gen).contiguous() for name in sorted(shapes)}
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    quiet = [i for i in quiet_ids or () if i < config.vocab_size]  # a vocab_size override may cut them
    if quiet:
        out[head][torch.tensor(quiet)] *= QUIET_TOKEN_GAIN
    return out


def write_weights(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """model.safetensors, or ``shards`` files model-0000i-of-0000K.safetensors + the index."""
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata=meta)
        return
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(out_dir / file), metadata=meta)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def make_tiny_model(
    out_dir: str | Path, arch: str = "llama", seed: int = 0, shards: int = 1, **config_overrides: Any
) -> Path:
    """Write the tiny ``arch`` checkpoint into ``out_dir`` (created if needed); returns its path."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size, quiet_ids = write_tokenizer(out)
    config = _config_class(arch)(**{**tiny_config_kwargs(arch, vocab_size), **config_overrides})
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.save_pretrained(str(out))
    eos = [config.eos_token_id, SPECIAL_TOKENS.index(PAD)]
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id
    ).save_pretrained(str(out))
    write_weights(out, random_state_dict(config, seed, quiet_ids), shards)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files (>1 writes an index)")
    args = parser.parse_args(argv)
    path = make_tiny_model(args.out_dir, arch=args.arch, seed=args.seed, shards=args.shards)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
