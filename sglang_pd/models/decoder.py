"""One config-driven decoder for Llama, Mistral, Qwen2 and Qwen3 (``ModelConfig`` says which parts exist).

Module names mirror HF's (``model.layers.N.self_attn...``) except the fused projections
``qkv_proj`` (= [q; k; v] rows) and ``mlp.gate_up_proj`` (= [gate; up] rows), which the loader fills.
Op order per layer is HF LlamaDecoderLayer's: the residual stream stays in the model dtype, every
RMSNorm runs in float32. Weights are uninitialised (``torch.empty``) until ``load_model`` fills them.
"""

from __future__ import annotations

import torch
from torch import nn

from sglang_pd.attention.base import AttentionBackend, AttentionLayerSpec
from sglang_pd.attention.forward_batch import ForwardBatch
from sglang_pd.models.config import ModelConfig
from sglang_pd.models.layers import Device, Embedding, GatedMLP, Linear, LMHead, RMSNorm
from sglang_pd.models.ops import LayerOps, TorchOps
from sglang_pd.models.rope import RotaryEmbedding


class DecoderAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, dtype: torch.dtype, device: Device, ops: LayerOps) -> None:
        super().__init__()
        c = config
        self.ops = ops
        self.q_size, self.kv_size = c.q_size, c.kv_size
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.qkv_proj = Linear(c.hidden_size, c.q_size + 2 * c.kv_size, c.attention_bias, dtype, device)
        self.o_proj = Linear(c.q_size, c.hidden_size, c.o_proj_bias, dtype, device)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device, ops) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device, ops) if c.qk_norm else None
        self.spec = AttentionLayerSpec(
            layer_id=layer_id,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            scaling=c.head_dim**-0.5,
            sliding_window=c.sliding_windows[layer_id],
        )

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, attn: AttentionBackend
    ) -> torch.Tensor:
        """x [T, hidden], positions [T] -> [T, hidden]."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm.norm(q), self.k_norm.norm(k)  # per head, before rope (HF Qwen3)
        q, k = self.ops.rotary(q, k, positions, rope)
        out = attn.forward(q, k, v, self.spec)  # [T, num_heads, head_dim]
        return self.o_proj(out.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, dtype: torch.dtype, device: Device, ops: LayerOps) -> None:
        super().__init__()
        c = config
        self.self_attn = DecoderAttention(c, layer_id, dtype, device, ops)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, device, ops)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device, ops)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device, ops)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, residual stream before adding it); both [T, hidden]."""
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, positions, rope, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: Device, ops: LayerOps) -> None:
        super().__init__()
        c = config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(c, i, dtype, device, ops) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device, ops)
        self.rotary_emb = RotaryEmbedding(c.head_dim, c.rope, c.max_position_embeddings, device)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """input_ids, positions [T]; rows [N] -> final-normed hidden states of those rows [N, hidden]."""
        hidden = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, self.rotary_emb, attn)
        # The final norm is row-wise, so selecting rows first gives the same values for fewer rows.
        hidden = hidden[rows]
        residual = residual[rows] if residual is not None else None
        return self.norm(hidden, residual)[0]


class DecoderForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: Device, ops: LayerOps | None = None) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = DecoderModel(config, dtype, device, ops or TorchOps())
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, dtype, device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter, two names

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Hidden states after the final norm of rows ``batch.logits_indices``: [N, hidden]."""
        attn.begin_forward(batch)
        return self.model(batch.input_ids, batch.positions, batch.logits_indices, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 [N, vocab_size]."""
        return self.lm_head(hidden)
