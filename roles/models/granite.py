"""Granite (IBM Granite 3.x dense and MoE): the Llama layer with four scalar multipliers.

From transformers' ``modeling_granite.py``: embeddings times ``embedding_multiplier``, each
attention and MLP output times ``residual_multiplier`` before its residual add, attention
scores times ``attention_multiplier`` (in place of ``head_dim ** -0.5``) and the logits
divided by ``logits_scaling``. The residual multiplier is folded into ``o_proj`` and
``down_proj`` at load (a quantized weight's scales and zeros), so every kernel path stays
Llama's; it is the same product in another order, equal to float32 rounding.

Granite MoE (``GraniteMoeForCausalLM``, ``modeling_granitemoe.py``): the same multipliers with
a mixture of experts in place of the MLP, under ``block_sparse_moe``: router
``router.layer`` [E, H], softmax over the top ``num_experts_per_tok`` logits (the same
weights as a softmax over all experts renormalized over the top k, which ``MoE`` computes),
and the experts stacked: ``input_linear`` [E, 2I, H] (gate rows, then up) and
``output_linear`` [E, H, I], split per expert as the checkpoint is read (so a weight format
quantizes each expert's projections; the residual multiplier is folded into each down). A
GGUF file (llama.cpp's ``granitemoe``) holds them as ``ffn_gate_exps`` / ``ffn_up_exps`` /
``ffn_down_exps``, which ``gguf_map`` reads under the same per-expert names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from splitserve.errors import ModelLoadError
from splitserve.kernels.quant import QuantizedWeight
from splitserve.roles.models.blocks import (
    Layer,
    MoE,
    PreNormLayer,
    Tensor,
    Weights,
    moe_experts,
    standard_attention,
)
from splitserve.roles.models.config import ModelConfig, base_fields
from splitserve.roles.models.llama import LlamaModel
from splitserve.roles.models.qwen3_moe import refuse_unsupported_routing

_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                "logits_scaling")


def _multiplier(hf: dict[str, Any], name: str) -> float:
    value = hf.get(name, 1.0)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value <= 0):
        raise ModelLoadError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _scaled(weight: Tensor | QuantizedWeight, factor: float) -> Tensor | QuantizedWeight:
    if factor == 1.0:
        return weight
    if isinstance(weight, QuantizedWeight):
        zeros = None if weight.zeros is None else weight.zeros * factor
        return dataclasses.replace(weight, scales=weight.scales * factor, zeros=zeros)
    return (weight.float() * factor).to(weight.dtype)


class GraniteModel(LlamaModel):
    architectures = ("GraniteForCausalLM",)
    model_types = ("granite",)
    scale_embeddings = True

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        fields = base_fields(hf, architecture)
        if hf.get("mlp_bias"):
            raise ModelLoadError("mlp_bias: true is not supported (Granite's MLP has no biases)")
        m = {name: _multiplier(hf, name) for name in _MULTIPLIERS}
        return ModelConfig(
            **fields,
            attention_multiplier=m["attention_multiplier"],
            embedding_multiplier=m["embedding_multiplier"],
            residual_multiplier=m["residual_multiplier"], logits_scaling=m["logits_scaling"],
        )

    def build_layer(self, i: int, w: Weights) -> Layer:
        self._fold_residual(w, ("self_attn.o_proj.weight", "mlp.down_proj.weight"))
        return super().build_layer(i, w)

    def _fold_residual(self, w: Weights, names: tuple[str, ...]) -> None:
        """The residual multiplier folded into these projections of the layer."""
        for name in names:
            w.tensors[w.prefix + name] = _scaled(w.take(name), self.cfg.residual_multiplier)


class GraniteMoeModel(GraniteModel):
    architectures = ("GraniteMoeForCausalLM",)
    model_types = ("granitemoe",)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        refuse_unsupported_routing(hf)
        cfg = super().config_from_hf(hf, architecture)
        experts = hf.get("num_local_experts") or 0
        top_k = hf.get("num_experts_per_tok") or 0
        if not 0 < top_k <= experts:
            raise ModelLoadError(f"num_experts_per_tok must be in [1, num_local_experts="
                                 f"{experts}], got {top_k!r}")
        return dataclasses.replace(
            cfg, num_experts=experts, num_experts_per_tok=top_k,
            moe_intermediate_size=cfg.intermediate_size, norm_topk_prob=True)

    @classmethod
    def checkpoint_tensors(cls, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The stacked experts split per expert (gate and up rows apart), the router renamed:
        the names Mixtral-style experts take, each expert's projection quantizable alone."""
        m = _STACKED.fullmatch(name)
        if m is None:
            return [(name, tensor)]
        prefix, kind = m[1], m[2]
        if kind == "router.layer":
            return [(f"{prefix}gate.weight", tensor)]
        if tensor.dim() != 3 or (kind == "input_linear" and tensor.shape[1] % 2):
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                                 "[experts, rows, hidden] (input_linear: 2 x intermediate rows)")
        if kind == "output_linear":
            return [(f"{prefix}experts.{e}.down_proj.weight", tensor[e].contiguous())
                    for e in range(tensor.shape[0])]
        half = tensor.shape[1] // 2
        return [(f"{prefix}experts.{e}.{proj}.weight", part.contiguous())
                for e in range(tensor.shape[0])
                for proj, part in (("gate_proj", tensor[e, :half]), ("up_proj", tensor[e, half:]))]

    def build_layer(self, i: int, w: Weights) -> Layer:
        cfg, ops = self.cfg, self.ops
        h, inter, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self._fold_residual(w, ("self_attn.o_proj.weight",) + tuple(
            f"block_sparse_moe.experts.{x}.down_proj.weight" for x in range(e)))
        experts = moe_experts(w.sub("block_sparse_moe."), e, ("gate_proj", "up_proj", "down_proj"),
                              ((inter, h), (inter, h), (h, inter)))
        return PreNormLayer(
            standard_attention(cfg, i, w.sub("self_attn."), ops, self.rotary_for(i)),
            MoE(cfg, w.take("block_sparse_moe.gate.weight", (e, h)), experts,  # type: ignore[arg-type]
                ops, renormalize=True),
            self.rms_norm(w.take("input_layernorm.weight", (h,))),
            self.rms_norm(w.take("post_attention_layernorm.weight", (h,))),
        )


_STACKED = re.compile(r"(model\.layers\.\d+\.block_sparse_moe\.)(input_linear|output_linear|router\.layer)\.weight")
"""Granite MoE's stacked experts and router, as its checkpoints name them."""
