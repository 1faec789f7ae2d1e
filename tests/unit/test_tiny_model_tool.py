"""The tiny-checkpoint tool: transformers loads what it writes offline, deterministically, peaked."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sglang_pd.models.config import ModelConfig
from sglang_pd.models.loader import load_model
from sglang_pd.tools.make_tiny_model import ARCHS, CHAT_TEMPLATE, _train_tokenizer, make_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in ARCHS}


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_tokenizer_loads_round_trips_and_chats(tiny_dirs: dict[str, Path]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    path = tiny_dirs["llama"]
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == AutoConfig.from_pretrained(str(path)).vocab_size
    assert 512 <= len(tok) <= 1024
    for text in ["Hello, world! The capital of France is Paris.", "  two  spaces\nand a newline", "Ünïcödé 🙂 42"]:
        assert tok.decode(tok.encode(text)) == text
    specials = ["<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(specials) == [0, 1, 2, 3]
    assert tok.encode("<|im_start|>user")[0] == 2
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 3, 1)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    closed = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not closed.endswith("assistant\n")
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_tokenizer_training_is_fast() -> None:
    start = time.perf_counter()
    tok = _train_tokenizer()
    assert time.perf_counter() - start < 2.0 and tok.get_vocab_size() >= 512


def test_config_features_per_arch(tiny_dirs: dict[str, Path]) -> None:
    raw = {arch: json.loads((tiny_dirs[arch] / "config.json").read_text()) for arch in ARCHS}
    assert raw["llama"]["rope_parameters"]["rope_type"] == "llama3" and not raw["llama"]["tie_word_embeddings"]
    assert raw["mistral"]["sliding_window"] == 4096
    assert raw["qwen3"]["head_dim"] == 32 and raw["qwen3"]["tie_word_embeddings"]
    for arch in ARCHS:
        c = raw[arch]
        sizes = (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"])
        assert sizes == (64, 2, 4, 2)
        assert c["architectures"] == [ModelConfig.from_pretrained(str(tiny_dirs[arch])).architecture]
    assert "model.layers.0.self_attn.q_proj.bias" in load_file(str(tiny_dirs["qwen2"] / "model.safetensors"))
    qwen3 = load_file(str(tiny_dirs["qwen3"] / "model.safetensors"))
    assert "lm_head.weight" not in qwen3 and "model.layers.1.self_attn.k_norm.weight" in qwen3
    gen = json.loads((tiny_dirs["llama"] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [3, 1]


def test_deterministic_given_seed(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", arch="qwen2", seed=0)
    assert _digests(again) == _digests(tiny_dirs["qwen2"])
    other = _digests(make_tiny_model(tmp_path / "other", arch="qwen2", seed=1))
    assert other["model.safetensors"] != _digests(again)["model.safetensors"]
    assert other["tokenizer.json"] == _digests(again)["tokenizer.json"]


def test_config_overrides(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, arch="mistral", sliding_window=8, num_hidden_layers=3)
    config = ModelConfig.from_pretrained(str(path))
    assert config.sliding_windows == (8, 8, 8)
    names = load_file(str(path / "model.safetensors"))
    assert {k.split(".")[2] for k in names if k.startswith("model.layers.")} == {"0", "1", "2"}


def test_cli_writes_sharded_checkpoint(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "sglang_pd.tools.make_tiny_model", str(out), "--arch", "qwen3", "--shards", "3"]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, timeout=120, capture_output=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (out / "model.safetensors").exists()
    config = ModelConfig.from_pretrained(str(out))
    sharded = load_model(config, str(out), "auto", torch.float32, "cpu")
    single = load_model(config, str(tiny_dirs["qwen3"]), "auto", torch.float32, "cpu")
    for (name, a), (_, b) in zip(sharded.named_parameters(), single.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@torch.no_grad()
def test_greedy_top1_margin_is_well_above_float_noise(tiny_dirs: dict[str, Path]) -> None:
    """Greedy decoding with HF's float32 model: no step has a near-tie between the top-2 logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for arch in ARCHS:
        path = str(tiny_dirs[arch])
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        margins = []
        for text in ["Hello, how are you?", "The capital of France is", "Once upon a time"]:
            ids = tok(text, return_tensors="pt").input_ids
            out = model.generate(
                ids,
                do_sample=False,
                max_new_tokens=24,
                output_logits=True,
                return_dict_in_generate=True,
                eos_token_id=None,
                pad_token_id=tok.pad_token_id,
            )
            top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values
            margins.append(top2[:, 0] - top2[:, 1])
        margins_t = torch.cat(margins)
        assert margins_t.min() > 5e-3, (arch, margins_t.min())  # float32 noise here is ~1e-5
        assert margins_t.median() > 0.5, (arch, margins_t.median())
