"""Granite (IBM Granite 3.x dense): the Llama layer with four scalar multipliers.

From transformers' ``modeling_granite.py``: embeddings times ``embedding_multiplier``, each
attention and MLP output times ``residual_multiplier`` before its residual add, attention
scores times ``attention_multiplier`` (in place of ``head_dim ** -0.5``) and the logits
divided by ``logits_scaling``. The residual multiplier is folded into ``o_proj`` and
``down_proj`` at load (a quantized weight's scales and zeros), so every kernel path stays
Llama's; it is the same product in another order, equal to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from splitserve.errors import ModelLoadError
from splitserve.kernels.quant import QuantizedWeight
from splitserve.roles.models.blocks import Layer, Tensor, Weights
from splitserve.roles.models.config import ModelConfig, base_fields
from splitserve.roles.models.llama import LlamaModel

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
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            w.tensors[w.prefix + name] = _scaled(w.take(name), self.cfg.residual_multiplier)
        return super().build_layer(i, w)
