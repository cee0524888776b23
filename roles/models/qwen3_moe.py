"""Qwen3-MoE: Qwen3 attention (per-head q/k norms) with a mixture-of-experts MLP.

Router ``mlp.gate`` [E, H]; softmax over all experts, top ``num_experts_per_tok``,
renormalized only under ``norm_topk_prob``. Experts under ``mlp.experts.{e}.gate_proj /
up_proj / down_proj``. A layer is dense (``mlp.gate_proj``...) when listed in
``mlp_only_layers`` or off the ``decoder_sparse_step`` grid. Shared experts (Qwen2-MoE) and
other routing functions are refused at load.
"""

from __future__ import annotations

from typing import Any

from splitserve.errors import ModelLoadError
from splitserve.roles.models.blocks import (
    MoE,
    PreNormLayer,
    Weights,
    dense_mlp,
    moe_experts,
    standard_attention,
)
from splitserve.roles.models.config import ModelConfig
from splitserve.roles.models.qwen3 import Qwen3Model, qwen3_fields


def refuse_unsupported_routing(hf: dict[str, Any]) -> None:
    """MoE variants this block does not implement fail naming the field and value."""
    checks = {
        "scoring_func": lambda v: v in (None, "softmax"),
        "topk_method": lambda v: v in (None, "greedy"),
        "shared_expert_intermediate_size": lambda v: not v,
        "n_shared_experts": lambda v: not v,
        "n_group": lambda v: v in (None, 1),
    }
    for name, ok in checks.items():
        if not ok(hf.get(name)):
            raise ModelLoadError(
                f"unsupported mixture-of-experts setting {name}={hf[name]!r} "
                "(softmax top-k routing without shared experts only)"
            )


class Qwen3MoeModel(Qwen3Model):
    architectures = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        refuse_unsupported_routing(hf)
        fields = qwen3_fields(hf, architecture)
        experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        moe_layers = tuple(
            experts > 0 and i not in dense and (i + 1) % step == 0
            for i in range(fields["num_layers"])
        )
        return ModelConfig(
            **fields, num_experts=experts, num_experts_per_tok=hf.get("num_experts_per_tok", 0),
            moe_intermediate_size=hf.get("moe_intermediate_size", 0),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)), moe_layers=moe_layers,
        )

    def build_layer(self, i: int, w: Weights) -> PreNormLayer:
        cfg, ops = self.cfg, self.ops
        if cfg.is_moe_layer(i):
            h, inter = cfg.hidden_size, cfg.moe_intermediate_size
            experts = moe_experts(
                w.sub("mlp."), cfg.num_experts, ("gate_proj", "up_proj", "down_proj"),
                ((inter, h), (inter, h), (h, inter)),
            )
            router = w.take("mlp.gate.weight", (cfg.num_experts, h))
            mlp: Any = MoE(cfg, router, experts, ops, renormalize=cfg.norm_topk_prob)
        else:
            mlp = dense_mlp(cfg, w.sub("mlp."), ops)
        return PreNormLayer(
            standard_attention(cfg, i, w.sub("self_attn."), ops, self.cos_sin, norm_offset=0.0),
            mlp,
            self.rms_norm(w.take("input_layernorm.weight", (cfg.hidden_size,))),
            self.rms_norm(w.take("post_attention_layernorm.weight", (cfg.hidden_size,))),
        )
