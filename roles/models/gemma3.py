"""Gemma 3 (text): Gemma 2's layer with per-head q/k norms, no soft-caps, and two rotary
tables.

From transformers' ``modeling_gemma3.py``: ``q_norm`` / ``k_norm`` ([head_dim], ``1 +
weight``) before RoPE; windowed layers (default: five of every six, ``sliding_window_pattern``)
use ``rope_local_base_freq`` (transformers 5: ``rope_parameters.sliding_attention``) without
scaling, global layers ``rope_theta`` with ``rope_scaling`` (``rope_parameters.
full_attention``). Only ``Gemma3ForCausalLM`` (``gemma3_text``); the multimodal
``Gemma3ForConditionalGeneration`` is not served.
"""

from __future__ import annotations

from typing import Any

from splitserve.errors import ModelLoadError
from splitserve.roles.models.blocks import rope_table
from splitserve.roles.models.config import ModelConfig, rope_scaling, rope_theta
from splitserve.roles.models.gemma2 import Gemma2Model, gemma_fields


class Gemma3Model(Gemma2Model):
    architectures = ("Gemma3ForCausalLM",)
    model_types = ("gemma3_text",)
    qk_norm = True

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        fields = gemma_fields(hf, architecture, pattern=hf.get("sliding_window_pattern", 6))
        params = hf.get("rope_parameters") or {}
        full, local = params.get("full_attention"), params.get("sliding_attention")
        if full is not None or local is not None:  # transformers 5: one dict per layer type
            full, local = full or {}, local or {}
            fields["rope_theta"] = rope_theta({}, full) if full.get("rope_theta") else 1e6
            fields["rope_scaling"] = rope_scaling(
                hf, full, "rope_parameters.full_attention"
            )
            local_theta = float(local.get("rope_theta", 10000.0))
            if rope_scaling(hf, local, "rope_parameters.sliding_attention") is not None:
                raise ModelLoadError(
                    "unsupported rope_parameters.sliding_attention scaling "
                    f"{local.get('rope_type')!r} (windowed layers use plain RoPE)"
                )
        else:
            fields["rope_theta"] = float(hf.get("rope_theta", 1e6))
            local_theta = float(hf.get("rope_local_base_freq", 10000.0))
        return ModelConfig(
            **fields, rope_local_theta=local_theta,
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )

    def __init__(self, cfg, weights, ops, device) -> None:  # type: ignore[no-untyped-def]
        self.local_cos_sin = rope_table(cfg, ops, device, cfg.rope_local_theta, None)
        super().__init__(cfg, weights, ops, device)

    def rotary_for(self, i: int):  # type: ignore[no-untyped-def]
        return self.cos_sin if self.cfg.window(i) is None else self.local_cos_sin
