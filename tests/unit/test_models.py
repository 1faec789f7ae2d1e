"""Our config-driven decoder against HF transformers' float32 forward on the same checkpoints.

Every comparison runs several sequences in one ForwardBatch over a paged KV cache whose pages are
handed out in a shuffled order, so page-table and slot bugs show up as logit mismatches.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_pd.attention.forward_batch import ForwardBatch
from sglang_pd.attention.torch_backend import TorchAttentionBackend
from sglang_pd.mem.kv_cache import KVCache, KVCacheShape
from sglang_pd.models.config import ModelConfig
from sglang_pd.models.decoder import DecoderForCausalLM
from sglang_pd.models.layers import RMSNorm
from sglang_pd.models.loader import load_model
from sglang_pd.models.rope import RopeConfig, RotaryEmbedding, compute_inv_freq
from sglang_pd.tools.make_tiny_model import ARCHS, init_tensor, make_tiny_model

ATOL = 1e-4
PROMPT_LENS = (5, 9, 1, 13)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class PagedSeqs:
    """Page bookkeeping for B sequences: shuffled page ids, one growing page list per sequence."""

    def __init__(self, num_seqs: int, page_size: int, num_pages: int, seed: int = 0) -> None:
        self.page_size = page_size
        self.free = list(range(1, num_pages))  # page 0 is the null page
        random.Random(seed).shuffle(self.free)
        self.pages: list[list[int]] = [[] for _ in range(num_seqs)]
        self.lens = [0] * num_seqs

    def batch(self, chunks: list[torch.Tensor], last_only: bool = False) -> ForwardBatch:
        """Extend sequence i by chunks[i] (>= 1 token each) and describe that forward."""
        ps = self.page_size
        positions, slots = [], []
        for i, chunk in enumerate(chunks):
            start, end = self.lens[i], self.lens[i] + len(chunk)
            while len(self.pages[i]) * ps < end:
                self.pages[i].append(self.free.pop())
            positions += list(range(start, end))
            slots += [self.pages[i][p // ps] * ps + p % ps for p in range(start, end)]
            self.lens[i] = end
        ext = [len(c) for c in chunks]
        table = torch.zeros(len(chunks), max(len(p) for p in self.pages), dtype=torch.int32)
        for i, pages in enumerate(self.pages):
            table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        starts = [sum(ext[:i]) for i in range(len(ext))]
        rows = [s + n - 1 for s, n in zip(starts, ext, strict=True)] if last_only else list(range(sum(ext)))
        return ForwardBatch(
            input_ids=torch.cat(chunks).to(torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            out_cache_loc=torch.tensor(slots, dtype=torch.int64),
            seq_lens=torch.tensor(self.lens, dtype=torch.int32),
            extend_lens=torch.tensor(ext, dtype=torch.int32),
            extend_starts=torch.tensor(starts, dtype=torch.int32),
            page_table=table,
            logits_indices=torch.tensor(rows, dtype=torch.int64),
            seq_lens_cpu=tuple(self.lens),
            extend_lens_cpu=tuple(ext),
            page_size=ps,
        )


def _backend(config: ModelConfig, page_size: int, num_pages: int) -> TorchAttentionBackend:
    shape = KVCacheShape(config.num_hidden_layers, num_pages, page_size, config.num_key_value_heads, config.head_dim)
    return TorchAttentionBackend(KVCache(shape, torch.float32, "cpu"))


def _hf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _sequences(vocab_size: int, prompt_lens: tuple[int, ...], extra: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n + extra,), generator=g) for n in prompt_lens]


@torch.no_grad()
def _check_against_hf(path: Path, page_sizes: tuple[int, ...], prompt_lens: tuple[int, ...] = PROMPT_LENS) -> None:
    """Prefill + decode, then 2-chunk prefill, per page size; every logit row vs HF's full-sequence forward."""
    config = ModelConfig.from_pretrained(str(path))
    ours = load_model(config, str(path), "auto", torch.float32, "cpu")
    extra = 3
    seqs = _sequences(config.vocab_size, prompt_lens, extra, seed=1)
    ref = [_hf_model(path)(s[None]).logits[0] for s in seqs]  # [len, V] per sequence
    for ps in page_sizes:
        num_pages = sum(len(s) for s in seqs) // ps + len(seqs) + 2
        # one prefill of every prompt, then `extra` decode steps
        paged, attn = PagedSeqs(len(seqs), ps, num_pages), _backend(config, ps, num_pages)
        steps = [[s[:n] for s, n in zip(seqs, prompt_lens, strict=True)]]
        steps += [[s[n + j : n + j + 1] for s, n in zip(seqs, prompt_lens, strict=True)] for j in range(extra)]
        _run_steps(ours, attn, paged, steps, ref)
        # two chunks: the second attends to the first's cached KV; last-row logits only
        paged, attn = PagedSeqs(len(seqs), ps, num_pages, seed=ps), _backend(config, ps, num_pages)
        cut = [max(1, n // 2) for n in prompt_lens]
        steps = [[s[:c] for s, c in zip(seqs, cut, strict=True)], [s[c:] for s, c in zip(seqs, cut, strict=True)]]
        _run_steps(ours, attn, paged, steps, ref, last_only=True)


def _run_steps(
    model: DecoderForCausalLM,
    attn: TorchAttentionBackend,
    paged: PagedSeqs,
    steps: list[list[torch.Tensor]],
    ref: list[torch.Tensor],
    last_only: bool = False,
) -> None:
    for chunks in steps:
        batch = paged.batch(chunks, last_only=last_only)
        hidden = model(batch, attn)
        assert hidden.shape == (len(batch.logits_indices), model.config.hidden_size)
        logits = model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        row = 0
        for i, chunk in enumerate(chunks):
            end = paged.lens[i]
            want = ref[i][end - 1 : end] if last_only else ref[i][end - len(chunk) : end]
            got = logits[row : row + len(want)]
            row += len(want)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch=arch, seed=0) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_match_hf(tiny_dirs: dict[str, Path], arch: str) -> None:
    _check_against_hf(tiny_dirs[arch], page_sizes=(4, 1))


def test_tiny_model_configs(tiny_dirs: dict[str, Path]) -> None:
    llama = ModelConfig.from_pretrained(str(tiny_dirs["llama"]))
    assert llama.architecture == "LlamaForCausalLM" and llama.rope.rope_type == "llama3"
    assert llama.rope.original_max_position_embeddings == 256 and llama.rope.factor == 8.0
    assert llama.eos_token_ids == (3, 1) and llama.bos_token_id == 0 and llama.pad_token_id == 1
    assert llama.torch_dtype == torch.float32 and llama.context_len == 2048
    assert not (llama.attention_bias or llama.o_proj_bias or llama.qk_norm or llama.tie_word_embeddings)
    qwen2 = ModelConfig.from_pretrained(str(tiny_dirs["qwen2"]))
    assert qwen2.attention_bias and not qwen2.o_proj_bias and qwen2.sliding_windows == (None, None)
    qwen3 = ModelConfig.from_pretrained(str(tiny_dirs["qwen3"]))
    assert qwen3.qk_norm and qwen3.tie_word_embeddings and qwen3.head_dim == 32 and qwen3.hidden_size == 64
    mistral = ModelConfig.from_pretrained(str(tiny_dirs["mistral"]))
    assert mistral.sliding_windows == (4096, 4096) and mistral.head_dim == 16


def _save_hf(tmp_path: Path, config: Any, seed: int = 0, **save_kwargs: Any) -> Path:
    """Save a transformers-built model with well-scaled random weights (HF's own init is near-silent)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(init_tensor(name, tuple(tensor.shape), config, gen))
    model.save_pretrained(str(tmp_path), **save_kwargs)
    return tmp_path


def _hf_configs() -> dict[str, Any]:
    import transformers as tf

    small = dict(vocab_size=301, hidden_size=48, intermediate_size=80, num_hidden_layers=3, max_position_embeddings=512)
    return {
        "llama_linear_bias": tf.LlamaConfig(
            **small,
            num_attention_heads=6,
            num_key_value_heads=3,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
        ),
        "llama3_tied_headdim": tf.LlamaConfig(
            **small,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=24,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "mistral_window3": tf.MistralConfig(**small, num_attention_heads=4, num_key_value_heads=2, sliding_window=3),
        "qwen2_yarn_sliding": tf.Qwen2Config(
            **small,
            num_attention_heads=4,
            num_key_value_heads=4,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 128,
            },
        ),
        "qwen3_bias_mqa": tf.Qwen3Config(
            **small,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            attention_bias=True,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        ),
    }


@pytest.mark.parametrize("name", sorted(_hf_configs()))
def test_transformers_written_checkpoints_match_hf(tmp_path: Path, name: str) -> None:
    config = _hf_configs()[name]
    shard = {"max_shard_size": "40KB"} if name.startswith(("qwen3", "llama3")) else {}
    path = _save_hf(tmp_path, config, **shard)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
    _check_against_hf(path, page_sizes=(4,) if name != "mistral_window3" else (1, 4))


def test_sliding_windows_follow_transformers() -> None:
    configs = _hf_configs()
    assert _parse(configs["mistral_window3"]).sliding_windows == (3, 3, 3)
    assert _parse(configs["qwen2_yarn_sliding"]).sliding_windows == (None, 4, 4)
    assert _parse(configs["qwen3_bias_mqa"]).sliding_windows == (None, None, None)
    parsed = _parse(configs["llama_linear_bias"])
    assert parsed.attention_bias and parsed.o_proj_bias and parsed.mlp_bias


def _parse(hf_config: Any) -> ModelConfig:
    from sglang_pd.models.config import _from_hf

    arch = type(hf_config).__name__.replace("Config", "ForCausalLM")
    return _from_hf(hf_config, arch, Path("/nonexistent"))


def _write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    return path


_OLD_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
    "rope_theta": 50000.0,
    "eos_token_id": [5, 6],
    "transformers_version": "4.44.0",
}


@pytest.mark.parametrize(
    "rope_scaling, expect",
    [
        (None, RopeConfig(theta=50000.0)),
        ({"type": "linear", "factor": 2.0}, RopeConfig(theta=50000.0, rope_type="linear", factor=2.0)),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
            RopeConfig(
                50000.0,
                "llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            ),
        ),
        (
            {"type": "yarn", "factor": 4.0},
            RopeConfig(50000.0, "yarn", factor=4.0, original_max_position_embeddings=1024),
        ),
    ],
)
def test_old_rope_scaling_spelling(tmp_path: Path, rope_scaling: dict[str, Any] | None, expect: RopeConfig) -> None:
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    path = _write_config(tmp_path, {**_OLD_LLAMA, "rope_scaling": rope_scaling})
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    config = ModelConfig.from_pretrained(str(path))
    assert config.rope == expect
    assert config.torch_dtype == torch.bfloat16 and config.eos_token_ids == (5, 6, 7)
    hf_rope = LlamaRotaryEmbedding(AutoConfig.from_pretrained(str(path)))
    inv_freq, factor = compute_inv_freq(config.rope, config.head_dim, config.max_position_embeddings)
    assert torch.equal(inv_freq, hf_rope.inv_freq) and factor == hf_rope.attention_scaling


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 3.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "truncate": False},
    ],
)
def test_rope_matches_transformers_bitwise(params: dict[str, Any]) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        max_position_embeddings=256,
        rope_parameters={**params, "rope_theta": 10000.0},
    )
    config = _parse(hf_config)
    hf_rope = LlamaRotaryEmbedding(hf_config)
    ours = RotaryEmbedding(config.head_dim, config.rope, config.max_position_embeddings)
    inv_freq, factor = compute_inv_freq(config.rope, config.head_dim, config.max_position_embeddings)
    assert torch.equal(inv_freq, hf_rope.inv_freq) and factor == hf_rope.attention_scaling
    positions = torch.tensor([0, 1, 7, 63, 64, 200, 255])
    q, k = torch.randn(7, 2, 64), torch.randn(7, 1, 64)
    hf_cos, hf_sin = hf_rope(q, positions[None])
    cos, sin = ours.cos_sin(positions, torch.float32)
    torch.testing.assert_close(cos[:, 0], hf_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:, 0], hf_sin[0], atol=1e-6, rtol=0)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), hf_cos[0], hf_sin[0], unsqueeze_dim=0)
    got_q, got_k = ours(q, k, positions)
    torch.testing.assert_close(got_q, want_q.transpose(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_k, want_k.transpose(0, 1), atol=1e-5, rtol=0)


def test_partial_rotary_rotates_only_the_first_channels() -> None:
    partial = RotaryEmbedding(32, RopeConfig(partial_rotary_factor=0.5), 64)
    full16 = RotaryEmbedding(16, RopeConfig(), 64)
    q, k, pos = torch.randn(5, 2, 32), torch.randn(5, 1, 32), torch.tensor([0, 3, 9, 17, 63])
    got_q, got_k = partial(q, k, pos)
    want_q, want_k = full16(q[..., :16], k[..., :16], pos)
    assert torch.equal(got_q[..., 16:], q[..., 16:]) and torch.equal(got_k[..., 16:], k[..., 16:])
    assert torch.equal(got_q[..., :16], want_q) and torch.equal(got_k[..., :16], want_k)


def test_unsupported_rope_type_is_named() -> None:
    with pytest.raises(ValueError, match="longrope"):
        compute_inv_freq(RopeConfig(rope_type="longrope"), 64, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_hf_bitwise(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    ours = RMSNorm(48, 1e-6, dtype, "cpu")
    with torch.no_grad():
        hf.weight.copy_(torch.randn(48))
        ours.weight.copy_(hf.weight)
    x, residual = torch.randn(6, 48).to(dtype), torch.randn(6, 48).to(dtype)
    normed, new_residual = ours(x, residual)
    assert torch.equal(new_residual, residual + x) and torch.equal(normed, hf(residual + x))
    normed, same = ours(x)
    assert torch.equal(normed, hf(x)) and same is x


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    raw = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 64, "n_embd": 32}
    path = _write_config(tmp_path, raw)
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        ModelConfig.from_pretrained(str(path))
    assert "LlamaForCausalLM" in str(err.value) and "Qwen3ForCausalLM" in str(err.value)


def test_dummy_load_needs_only_config(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(tiny_dirs["qwen3"] / "config.json", tmp_path / "config.json")
    config = ModelConfig.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(config, str(tmp_path), "auto", torch.float32, "cpu")
    a = load_model(config, str(tmp_path), "dummy", torch.bfloat16, "cpu")
    b = load_model(config, str(tmp_path), "dummy", torch.bfloat16, "cpu")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert pa.dtype == torch.bfloat16 and torch.equal(pa, pb), name
    paged = PagedSeqs(2, 4, 16)
    batch = paged.batch(_sequences(config.vocab_size, (6, 3), 0, seed=0), last_only=True)
    logits = a.compute_logits(a(batch, _backend(config, 4, 16)))
    assert logits.shape == (2, config.vocab_size) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="load_format"):
        load_model(config, str(tmp_path), "pt", torch.float32, "cpu")


def test_missing_and_misshaped_tensors_are_named(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_dirs["llama"]
    config = ModelConfig.from_pretrained(str(src))
    tensors = load_file(str(src / "model.safetensors"))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    bad = dict(tensors)
    del bad["model.layers.1.self_attn.k_proj.weight"]
    save_file(bad, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(config, str(tmp_path), "auto", torch.float32, "cpu")
    bad = dict(tensors)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)
    save_file(bad, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(3, 64\)"):
        load_model(config, str(tmp_path), "auto", torch.float32, "cpu")
