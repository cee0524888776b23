"""SmolLM3: the Llama layer with rotary embedding left out of some layers (NoPE).

From transformers' ``modeling_smollm3.py``: ``no_rope_layers[i]`` is 1 where layer ``i``
rotates q and k, 0 where it does not (default: every ``no_rope_layer_interval``-th layer,
counting from 1, has none); windowed layers by ``layer_types`` (whose default, under
``use_sliding_window``, windows the NoPE layers), as transformers' attention masks are built.
A NoPE layer here runs the same kernels over an identity table (cos 1, sin 0: ``x * 1 - y * 0``
is ``x`` exactly), so every kernel path and the KV layout stay the Llama ones.
"""

from __future__ import annotations

from typing import Any

import torch

from splitserve.errors import ModelLoadError
from splitserve.roles.models.blocks import Tensor
from splitserve.roles.models.config import ModelConfig, base_fields, layer_windows_from
from splitserve.roles.models.llama import LlamaModel


def rope_layers(hf: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """Per layer, whether it applies rotary (``no_rope_layers``, or its default)."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = hf.get("no_rope_layer_interval", 4)
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ModelLoadError(f"no_rope_layer_interval must be an integer >= 1, got {interval!r}")
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if (not isinstance(flags, list) or len(flags) != num_layers
            or any(f not in (0, 1) or isinstance(f, float) for f in flags)):
        raise ModelLoadError(
            f"no_rope_layers must be a list of {num_layers} values 0 or 1 (one per layer), "
            f"got {flags!r}")
    return tuple(bool(f) for f in flags)


class SmolLM3Model(LlamaModel):
    architectures = ("SmolLM3ForCausalLM",)
    model_types = ("smollm3",)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], architecture: str) -> ModelConfig:
        fields = base_fields(hf, architecture)
        if hf.get("mlp_bias"):
            raise ModelLoadError("mlp_bias: true is not supported (SmolLM3's MLP has no biases)")
        rope = rope_layers(hf, fields["num_layers"])
        # transformers masks a layer to the window where layer_types says sliding_attention
        # (use_sliding_window only chooses the default layer_types: the NoPE layers)
        window = hf.get("sliding_window")
        windows = None
        if window is not None:
            types = hf.get("layer_types") or [
                "sliding_attention" if hf.get("use_sliding_window") and not r
                else "full_attention" for r in rope]
            windows = layer_windows_from({"layer_types": types}, window)
            if not any(w is not None for w in windows):
                window, windows = None, None
        return ModelConfig(**fields, sliding_window=window, layer_windows=windows,
                           rope_layers=rope)

    def rotary_for(self, i: int) -> Tensor:
        rope = self.cfg.rope_layers
        if rope is None or rope[i]:
            return self.cos_sin
        identity: Tensor | None = getattr(self, "_identity", None)
        if identity is None:  # [cos | sin] -> [1 | 0], shared by the NoPE layers
            half = self.cos_sin.shape[-1] // 2
            identity = self._identity = torch.cat(
                [torch.ones_like(self.cos_sin[:, :half]), torch.zeros_like(self.cos_sin[:, half:])], -1)
        return identity
