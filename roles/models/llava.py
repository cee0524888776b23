"""LLaVA glue: the CLIP vision tower + the multimodal projector = image embeddings.

Owns pixels -> language-model input embeddings ([N, num_image_tokens, H_text]) for
``LlavaForConditionalGeneration``-style models: select the vision feature layer(s),
drop CLS under the "default" strategy, project with linear -> act -> linear. The
language model itself is the plain Llama decoder (roles/models/llama.py), which takes
these rows in place of the placeholder tokens' embeddings. It must not know about
prompts, caches or requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.roles.models.config import LlavaConfig
from splitserve.roles.models.vision import ACTIVATIONS, ClipVisionTower

Tensor = torch.Tensor


class LlavaImageEncoder:
    """Vision tower + projector over weights named ``vision_tower.*`` and
    ``multi_modal_projector.*`` (the loader's names)."""

    def __init__(self, cfg: LlavaConfig, weights: dict[str, Tensor], device: torch.device) -> None:
        self.cfg = cfg
        w = {
            k: v.to(device)
            for k, v in weights.items()
            if k.startswith(("vision_tower.", "multi_modal_projector."))
        }
        self.tower = ClipVisionTower(cfg.vision, _strip(w, "vision_tower."))
        p = _strip(w, "multi_modal_projector.")
        self.linear_1 = (p["linear_1.weight"], p.get("linear_1.bias"))
        self.linear_2 = (p["linear_2.weight"], p.get("linear_2.bias"))
        self.act = ACTIVATIONS[cfg.projector_act]
        self.device = device

    @property
    def num_image_tokens(self) -> int:
        return self.cfg.num_image_tokens

    @property
    def hidden_size(self) -> int:
        return self.linear_2[0].shape[0]

    @torch.inference_mode()
    def encode(self, pixel_values: Tensor) -> Tensor:
        """[N, C, S, S] preprocessed pixels -> [N, num_image_tokens, H_text] embeddings."""
        feats = self.tower.forward(pixel_values.to(self.device), self.cfg.feature_layers)
        if self.cfg.select_strategy == "default":
            # drop CLS from each selected layer (they were concatenated on the last dim)
            feats = feats[:, 1:]
        return F.linear(self.act(F.linear(feats, *self.linear_1)), *self.linear_2)


def _strip(w: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
