"""Gemma 2: sandwich-normed layers, GeGLU, soft-capped attention and logits, alternating
sliding-window and global layers.

Differences from Llama, all from transformers' ``modeling_gemma2.py``: embeddings scaled by
``sqrt(hidden_size)``; RMSNorm weights stored as ``weight - 1`` (we add the 1 at load); four
norms per layer (``input``, ``post_attention``, ``pre_feedforward``, ``post_feedforward``);
the MLP gate uses tanh-GELU (``hidden_activation``); attention scale
``query_pre_attn_scalar ** -0.5``; scores capped by ``attn_logit_softcapping`` and logits by
``final_logit_softcapping``; ``layer_types`` (default: even layers windowed) picks the layers
that attend inside ``sliding_window``; embeddings tied.
"""

from __future__ import annotations

from typing import Any

from splitserve.errors import ModelLoadError
from splitserve.roles.models.blocks import (
    DecoderModel,
    Layer,
    SandwichLayer,
    Weights,
    dense_mlp,
    rope_table,
    standard_attention,
)
from splitserve.roles.models.config import ModelConfig, base_fields, layer_windows_from


def gemma_fields(hf: dict[str, Any], architecture: str, pattern: int) -> dict[str, Any]:
    """Config fields shared by Gemma 2 and Gemma 3 text (``pattern``: every ``pattern``-th
    layer is global when ``layer_types`` is absent)."""
    if hf.get("use_bidirectional_attention"):
        raise ModelLoadError("unsupported use_bidirectional_attention=True (causal decoders only)")
    fields = base_fields(hf, architecture)
    fields["hidden_act"] = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    fields["tie_word_embeddings"] = hf.get("tie_word_embeddings", True)
    fields["rms_norm_eps"] = hf.get("rms_norm_eps", 1e-6)
    window = hf.get("sliding_window")
    windows = layer_windows_from(hf, window)
    if windows is None:
        windows = tuple(
            window if (i + 1) % pattern else None for i in range(fields["num_layers"])
        )
    return {
        **fields, "sliding_window": window, "layer_windows": windows,
        "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar", fields["head_dim"])),
    }


class Gemma2Model(DecoderModel):
    architectures = ("Gemma2ForCausalLM",)
    model_types = ("gemma2",)
    norm_offset = 1.0
    scale_embeddings = True
    qk_norm = False

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        return ModelConfig(
            **gemma_fields(hf, architecture, pattern=2),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )

    def __init__(self, cfg, weights, ops, device) -> None:  # type: ignore[no-untyped-def]
        self.cos_sin = rope_table(cfg, ops, device, cfg.rope_theta, cfg.rope_scaling)
        super().__init__(cfg, weights, ops, device)

    def rotary_for(self, i: int):  # type: ignore[no-untyped-def]
        return self.cos_sin

    def build_layer(self, i: int, w: Weights) -> Layer:
        cfg, ops, h = self.cfg, self.ops, self.cfg.hidden_size
        offset = self.norm_offset if self.qk_norm else None
        norms = tuple(
            self.rms_norm(w.take(f"{name}_layernorm.weight", (h,)))
            for name in ("input", "post_attention", "pre_feedforward", "post_feedforward")
        )
        return SandwichLayer(
            standard_attention(cfg, i, w.sub("self_attn."), ops, self.rotary_for(i), offset),
            dense_mlp(cfg, w.sub("mlp."), ops),
            norms,  # type: ignore[arg-type]
        )
