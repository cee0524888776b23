"""OLMo 2: post-normed layers and an RMSNorm over the whole query and key projections.

Differences from Llama, all from transformers' ``modeling_olmo2.py``: no norm before attention
or the MLP; each sub-block's output is normed before its residual add
(``x = x + post_attention_layernorm(attn(x)); x = x + post_feedforward_layernorm(mlp(x))``);
``q_norm`` / ``k_norm`` normalize the whole projection (``[num_heads * head_dim]`` and
``[num_kv_heads * head_dim]``, not each head as Qwen3's do) before rotary. Embeddings are not
scaled or tied by default; SwiGLU MLP.
"""

from __future__ import annotations

from typing import Any

from splitserve.roles.models.blocks import (
    Attention,
    AttentionMetadata,
    DecoderModel,
    Layer,
    MLPLike,
    RMSNorm,
    Tensor,
    Weights,
    _kept,
    dense_mlp,
    rope_table,
    standard_attention,
)
from splitserve.roles.models.config import ModelConfig, base_fields, layer_windows_from


class WholeProjectionNormAttention:
    """``attn`` with ``q_norm`` / ``k_norm`` over the whole projection of each token (all heads
    together), applied to q and k before rotary and the K/V store."""

    def __init__(self, attn: Attention, q_norm: RMSNorm, k_norm: RMSNorm) -> None:
        self.attn, self.q_norm, self.k_norm = attn, q_norm, k_norm

    def __call__(self, positions: Tensor, hidden: Tensor, kv_cache: Tensor,
                 meta: AttentionMetadata, pruned: bool = False) -> Tensor:
        a = self.attn
        q, k, v = a._project(hidden)
        tokens = q.shape[0]
        q = self.q_norm(q.reshape(tokens, a.q_size))[0].view(tokens, a.num_heads, a.head_dim)
        k = self.k_norm(k.reshape(tokens, a.kv_size))[0].view(tokens, a.num_kv_heads, a.head_dim)
        return a._attend(positions, q, k, v, kv_cache, meta, pruned)


class PostNormLayer:
    """OLMo 2 shape: ``x += post_attn(attn(x)); x += post_ff(mlp(x))``. The stream is carried
    whole in ``residual`` (``hidden`` is the last sub-block's normed output), so the model's
    final norm adds them as after any other layer."""

    def __init__(self, attn: WholeProjectionNormAttention, mlp: MLPLike, post_attn_norm: RMSNorm,
                 post_ff_norm: RMSNorm) -> None:
        self.attn, self.mlp = attn, mlp
        self.post_attn_norm, self.post_ff_norm = post_attn_norm, post_ff_norm

    def forward(
        self, positions: Tensor, hidden: Tensor, residual: Tensor | None, kv_cache: Tensor,
        meta: AttentionMetadata, pruned: bool = False,
    ) -> tuple[Tensor, Tensor]:
        stream = hidden if residual is None else residual + hidden
        out = self.attn(positions, stream, kv_cache, meta, pruned)
        stream = _kept(stream, meta, pruned)
        if not out.shape[0]:
            return out, stream
        stream = stream + self.post_attn_norm(out)[0]
        return self.post_ff_norm(self.mlp(stream))[0], stream


class Olmo2Model(DecoderModel):
    architectures = ("Olmo2ForCausalLM",)
    model_types = ("olmo2",)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        fields = base_fields(hf, architecture)
        window = hf.get("sliding_window")
        return ModelConfig(**fields, sliding_window=window,
                           layer_windows=layer_windows_from(hf, window))

    def __init__(self, cfg, weights, ops, device) -> None:  # type: ignore[no-untyped-def]
        self.cos_sin = rope_table(cfg, ops, device, cfg.rope_theta, cfg.rope_scaling)
        super().__init__(cfg, weights, ops, device)

    def build_layer(self, i: int, w: Weights) -> Layer:
        cfg, ops, h = self.cfg, self.ops, self.cfg.hidden_size
        attn_w = w.sub("self_attn.")
        attn = WholeProjectionNormAttention(
            standard_attention(cfg, i, attn_w, ops, self.cos_sin),
            self.rms_norm(attn_w.take("q_norm.weight", (cfg.num_heads * cfg.head_dim,))),
            self.rms_norm(attn_w.take("k_norm.weight", (cfg.num_kv_heads * cfg.head_dim,))),
        )
        return PostNormLayer(
            attn, dense_mlp(cfg, w.sub("mlp."), ops),
            self.rms_norm(w.take("post_attention_layernorm.weight", (h,))),
            self.rms_norm(w.take("post_feedforward_layernorm.weight", (h,))),
        )
