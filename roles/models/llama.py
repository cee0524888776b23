"""Llama family: Llama 2/3, Mistral, Qwen2, SmolLM (and LLaVA's language model).

Pre-norm layers of GQA attention (RoPE, optional QKV bias for Qwen2, optional sliding
window) and a SwiGLU MLP, under Hugging Face's tensor names. The shared pieces live in
``blocks.py``; this file only says how the family's config and tensors map onto them.
"""

from __future__ import annotations

from typing import Any

from splitserve.roles.models.blocks import (
    AttentionMetadata,
    DecoderModel,
    Layer,
    PreNormLayer,
    Tensor,
    Weights,
    dense_mlp,
    rope_table,
    standard_attention,
)
from splitserve.roles.models.config import (
    ModelConfig,
    base_fields,
    layer_windows_from,
    qwen_layer_windows,
)

__all__ = ["AttentionMetadata", "LlamaModel"]


class LlamaModel(DecoderModel):
    """Embeddings + pre-norm layers + final norm + logits head."""

    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    model_types = ("llama", "mistral", "qwen2")

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        fields = base_fields(hf, architecture)
        if architecture == "Qwen2ForCausalLM":
            fields["attention_bias"] = hf.get("attention_bias", True)
            window, windows = qwen_layer_windows(hf, fields["num_layers"])
        else:
            window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
            windows = layer_windows_from(hf, window)
        return ModelConfig(**fields, sliding_window=window, layer_windows=windows)

    def __init__(self, cfg, weights, ops, device) -> None:  # type: ignore[no-untyped-def]
        self.cos_sin = rope_table(cfg, ops, device, cfg.rope_theta, cfg.rope_scaling)
        super().__init__(cfg, weights, ops, device)

    def rotary_for(self, i: int) -> Tensor:
        """Layer ``i``'s rotary table (one for every layer here)."""
        return self.cos_sin

    def build_layer(self, i: int, w: Weights) -> Layer:
        cfg, ops = self.cfg, self.ops
        return PreNormLayer(
            standard_attention(cfg, i, w.sub("self_attn."), ops, self.rotary_for(i)),
            dense_mlp(cfg, w.sub("mlp."), ops),
            self.rms_norm(w.take("input_layernorm.weight", (cfg.hidden_size,))),
            self.rms_norm(w.take("post_attention_layernorm.weight", (cfg.hidden_size,))),
        )
