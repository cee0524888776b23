"""Phi-3: the Llama layer shape with fused projections and its rotary variants.

``self_attn.qkv_proj`` holds Q, K and V rows back to back and ``mlp.gate_up_proj`` the gate
and up rows (the layout our blocks already use, so they load as they are). RoPE may be
partial (``partial_rotary_factor``) and scaled by LongRoPE (``rope_scaling.rope_type``
``longrope``, also spelled ``su``): short factors below ``original_max_position_embeddings``,
long factors beyond, cos/sin scaled by the attention factor. Transformers switches the whole
sequence to the long factors once it grows past the original length (recomputing nothing
already cached); here each position takes the factors of its own range, so the two agree on
every sequence shorter than the original length. A sliding window applies to every layer.
"""

from __future__ import annotations

from typing import Any

from splitserve.roles.models.blocks import (
    Attention,
    GatedMLP,
    PreNormLayer,
    Weights,
)
from splitserve.roles.models.config import ModelConfig, base_fields, layer_windows_from
from splitserve.roles.models.llama import LlamaModel


class Phi3Model(LlamaModel):
    architectures = ("Phi3ForCausalLM",)
    model_types = ("phi3",)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        fields = base_fields(hf, architecture)
        params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        scaling = fields["rope_scaling"]
        if scaling is not None and scaling["rope_type"] == "longrope":
            original = scaling.get("original_max_position_embeddings") or hf.get(
                "original_max_position_embeddings", fields["max_position_embeddings"]
            )
            scaling = {**scaling, "original_max_position_embeddings": original,
                       "max_position_embeddings": fields["max_position_embeddings"]}
        partial = hf.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0
        window = hf.get("sliding_window")
        return ModelConfig(
            **{**fields, "rope_scaling": scaling}, partial_rotary_factor=float(partial),
            sliding_window=window, layer_windows=layer_windows_from(hf, window),
        )

    def build_layer(self, i: int, w: Weights) -> PreNormLayer:
        cfg, ops = self.cfg, self.ops
        h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
        attn = Attention(
            cfg, i, ops, self.cos_sin,
            (w.take("self_attn.qkv_proj.weight", (qkv_rows, h)), None),
            w.take("self_attn.o_proj.weight", (h, cfg.num_heads * hd)),
        )
        mlp = GatedMLP(
            w.take("mlp.gate_up_proj.weight", (2 * inter, h)),
            w.take("mlp.down_proj.weight", (h, inter)), cfg.hidden_act, ops,
        )
        return PreNormLayer(
            attn, mlp,
            self.rms_norm(w.take("input_layernorm.weight", (h,))),
            self.rms_norm(w.take("post_attention_layernorm.weight", (h,))),
        )
