"""Qwen3: the Llama layer shape with an RMSNorm over each query and key head (before RoPE)
and an explicit ``head_dim`` (not hidden / heads); no QKV bias.

Tensor names are Llama's plus ``self_attn.q_norm`` / ``self_attn.k_norm`` ([head_dim]).
"""

from __future__ import annotations

from typing import Any

from splitserve.roles.models.blocks import (
    DecoderModel,
    Layer,
    PreNormLayer,
    Weights,
    dense_mlp,
    rope_table,
    standard_attention,
)
from splitserve.roles.models.config import ModelConfig, base_fields, qwen_layer_windows


def qwen3_fields(hf: dict[str, Any], architecture: str) -> dict[str, Any]:
    """Config fields shared by Qwen3 and Qwen3-MoE."""
    fields = base_fields(hf, architecture)
    window, windows = qwen_layer_windows(hf, fields["num_layers"])
    return {**fields, "sliding_window": window, "layer_windows": windows}


class Qwen3Model(DecoderModel):
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        return ModelConfig(**qwen3_fields(hf, architecture))

    def __init__(self, cfg, weights, ops, device) -> None:  # type: ignore[no-untyped-def]
        self.cos_sin = rope_table(cfg, ops, device, cfg.rope_theta, cfg.rope_scaling)
        super().__init__(cfg, weights, ops, device)

    def build_layer(self, i: int, w: Weights) -> Layer:
        cfg, ops = self.cfg, self.ops
        return PreNormLayer(
            standard_attention(cfg, i, w.sub("self_attn."), ops, self.cos_sin, norm_offset=0.0),
            dense_mlp(cfg, w.sub("mlp."), ops),
            self.rms_norm(w.take("input_layernorm.weight", (cfg.hidden_size,))),
            self.rms_norm(w.take("post_attention_layernorm.weight", (cfg.hidden_size,))),
        )
