"""Build a DecoderForCausalLM on the target device/dtype and fill it from safetensors (or dummy weights).

``auto``: read ``model.safetensors.index.json`` (sharded) or ``model.safetensors`` (else every
``*.safetensors``) one tensor at a time on CPU and copy it into its (slice of a) parameter, so peak
host memory is one tensor, never a model copy. HF names map onto ours; q/k/v land in row ranges of
``qkv_proj``, gate/up in ``gate_up_proj``. Every parameter must be covered exactly, else ValueError.
``dummy``: seeded random weights from config.json alone (benchmarks on real shapes).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from sglang_pd.models.config import ModelConfig
from sglang_pd.models.decoder import DecoderForCausalLM
from sglang_pd.models.layers import Device
from sglang_pd.models.ops import create_layer_ops

logger = logging.getLogger(__name__)

LOAD_FORMATS: tuple[str, ...] = ("auto", "dummy")
DUMMY_STD = 0.02  # small enough that activations of real-size models stay finite in bf16
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # buffers some old checkpoints carry
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)$")


@dataclass(frozen=True)
class ParamSlice:
    """Destination of one checkpoint tensor: rows [start, start + length) of parameter ``name``."""

    name: str
    start: int | None = None  # None: the whole parameter
    length: int | None = None


def load_model(
    config: ModelConfig,
    model_path: str,
    load_format: str = "auto",
    dtype: torch.dtype = torch.bfloat16,
    device: Device = "cpu",
    seed: int = 0,
    ops: str = "torch",
) -> DecoderForCausalLM:
    """The model with weights from ``model_path`` (``auto``) or seeded random ones (``dummy``).

    ``ops`` names the pointwise-op implementation (``sglang_pd.models.ops``): torch or triton.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported; choose one of {list(LOAD_FORMATS)}")
    with torch.no_grad():
        model = DecoderForCausalLM(config, dtype, device, create_layer_ops(ops))
        if load_format == "dummy":
            init_dummy_weights(model, seed)
        else:
            load_safetensors_weights(model, Path(model_path))
    return model.eval()


def init_dummy_weights(model: DecoderForCausalLM, seed: int = 0, std: float = DUMMY_STD) -> None:
    """Norm weights = 1, everything else ~ N(0, std), drawn on the parameter's device."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)


def weight_files(model_path: Path) -> list[Path]:
    """The safetensors files of a checkpoint; FileNotFoundError if there are none."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        with index.open() as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return [model_path / name for name in sorted(set(weight_map.values()))]
    single = model_path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors weights in {model_path} (looked for model.safetensors.index.json, "
            "model.safetensors, *.safetensors); use load_format='dummy' for random weights"
        )
    return files


def map_hf_name(hf_name: str, config: ModelConfig) -> ParamSlice | None:
    """Where HF tensor ``hf_name`` goes in our model; None = not ours (e.g. a tied lm_head)."""
    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
        return None  # HF ties lm_head to the embedding after loading: the embedding wins
    match = _LAYER_NAME.match(hf_name)
    if match is None:
        return ParamSlice(hf_name)
    layer, block, proj, kind = match.groups()
    prefix = f"model.layers.{layer}.{block}"
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    fused = {
        "q": ("qkv_proj", 0, q),
        "k": ("qkv_proj", q, kv),
        "v": ("qkv_proj", q + kv, kv),
        "gate": ("gate_up_proj", 0, inter),
        "up": ("gate_up_proj", inter, inter),
    }
    if proj not in fused:
        return ParamSlice(hf_name)
    target, start, length = fused[proj]
    return ParamSlice(f"{prefix}.{target}.{kind}", start, length)


def load_safetensors_weights(model: DecoderForCausalLM, model_path: Path) -> None:
    config = model.config
    params = dict(model.named_parameters())
    loaded: set[ParamSlice] = set()
    for file in weight_files(model_path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                dest = map_hf_name(hf_name, config)
                if dest is None or _IGNORED.search(hf_name):
                    continue
                if dest.name not in params:
                    logger.warning("ignoring unexpected checkpoint tensor %s (%s)", hf_name, file.name)
                    continue
                _copy(params[dest.name], dest, f.get_tensor(hf_name), hf_name)
                loaded.add(dest)
    lm_head = ParamSlice("lm_head.weight")
    if "lm_head.weight" in params and lm_head not in loaded:
        logger.warning("%s has no lm_head.weight: using the input embedding as the LM head", model_path)
        params["lm_head.weight"].copy_(params["model.embed_tokens.weight"])
        loaded.add(lm_head)
    missing = [hf for name in params for hf in hf_sources(name) if map_hf_name(hf, config) not in loaded]
    if missing:
        raise ValueError(f"checkpoint {model_path} lacks tensor(s): {', '.join(missing)}")


def hf_sources(name: str) -> list[str]:
    """The HF tensor names that together fill our parameter ``name``."""
    if ".qkv_proj." in name:
        return [name.replace("qkv_proj", f"{p}_proj") for p in "qkv"]
    if ".gate_up_proj." in name:
        return [name.replace("gate_up_proj", f"{p}_proj") for p in ("gate", "up")]
    return [name]


def _copy(param: torch.Tensor, dest: ParamSlice, tensor: torch.Tensor, hf_name: str) -> None:
    target = param if dest.start is None else param.narrow(0, dest.start, dest.length or 0)
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
    target.copy_(tensor)
