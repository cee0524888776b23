"""Mixtral: the Mistral layer with a mixture-of-experts MLP.

Router ``block_sparse_moe.gate`` [E, H]; softmax over all experts, top
``num_experts_per_tok``, always renormalized. Experts under
``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down).
"""

from __future__ import annotations

from typing import Any

from splitserve.roles.models.blocks import (
    MoE,
    PreNormLayer,
    Weights,
    moe_experts,
    standard_attention,
)
from splitserve.roles.models.config import ModelConfig, base_fields, layer_windows_from
from splitserve.roles.models.llama import LlamaModel
from splitserve.roles.models.qwen3_moe import refuse_unsupported_routing


class MixtralModel(LlamaModel):
    architectures = ("MixtralForCausalLM",)
    model_types = ("mixtral",)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        refuse_unsupported_routing(hf)
        fields = base_fields(hf, architecture)
        window = hf.get("sliding_window")
        return ModelConfig(
            **fields, sliding_window=window, layer_windows=layer_windows_from(hf, window),
            num_experts=hf.get("num_local_experts") or 0,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0),
            moe_intermediate_size=fields["intermediate_size"], norm_topk_prob=True,
        )

    def build_layer(self, i: int, w: Weights) -> PreNormLayer:
        cfg, ops = self.cfg, self.ops
        h, inter = cfg.hidden_size, cfg.moe_intermediate_size
        experts = moe_experts(
            w.sub("block_sparse_moe."), cfg.num_experts, ("w1", "w3", "w2"),
            ((inter, h), (inter, h), (h, inter)),
        )
        router = w.take("block_sparse_moe.gate.weight", (cfg.num_experts, h))
        return PreNormLayer(
            standard_attention(cfg, i, w.sub("self_attn."), ops, self.cos_sin),
            MoE(cfg, router, experts, ops, renormalize=True),
            self.rms_norm(w.take("input_layernorm.weight", (h,))),
            self.rms_norm(w.take("post_attention_layernorm.weight", (h,))),
        )
