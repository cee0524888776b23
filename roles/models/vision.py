"""The CLIP vision tower of LLaVA-style models, in plain torch.

Owns pixels -> patch features: patch convolution, class + position embeddings,
pre-layernorm, encoder layers (LayerNorm, full self-attention, quick_gelu MLP), and
the hidden state(s) LLaVA reads (``vision_feature_layer``, by default the second to
last). Images are fixed-size after preprocessing, so there is no KV cache, no masking
and no position interpolation. It must not know about prompts or the projector.

Shapes: N = images, P = patches per image (+1 for CLS), D = vision hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.roles.models.config import VisionConfig

Tensor = torch.Tensor

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class ClipEncoderLayer:
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig, w: dict[str, Tensor]) -> None:
        self.cfg = cfg
        self.ln1 = (w["layer_norm1.weight"], w["layer_norm1.bias"])
        self.ln2 = (w["layer_norm2.weight"], w["layer_norm2.bias"])
        proj = [f"self_attn.{p}_proj" for p in "qkv"]
        self.qkv = torch.cat([w[p + ".weight"] for p in proj])  # [3 D, D]
        self.qkv_bias = torch.cat([w[p + ".bias"] for p in proj])
        self.out = (w["self_attn.out_proj.weight"], w["self_attn.out_proj.bias"])
        self.fc1 = (w["mlp.fc1.weight"], w["mlp.fc1.bias"])
        self.fc2 = (w["mlp.fc2.weight"], w["mlp.fc2.bias"])
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:  # [N, P, D]
        eps = self.cfg.layer_norm_eps
        x = x + self._attention(F.layer_norm(x, x.shape[-1:], *self.ln1, eps))
        h = F.layer_norm(x, x.shape[-1:], *self.ln2, eps)
        return x + F.linear(self.act(F.linear(h, *self.fc1)), *self.fc2)

    def _attention(self, x: Tensor) -> Tensor:
        n, p, d = x.shape
        heads = self.cfg.num_heads
        qkv = F.linear(x, self.qkv, self.qkv_bias).view(n, p, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, P, hd]
        # softmax(q k^T / sqrt(hd)) v by batched matmuls, not F.scaled_dot_product_attention:
        # torch's fused CPU kernel gave other bits at 1 and 2 threads (the image rows then
        # depended on the worker's thread count, and a sampled token on the topology)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (d // heads) ** -0.5
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return F.linear(out.transpose(1, 2).reshape(n, p, d), *self.out)


class ClipVisionTower:
    """Pixels [N, C, H, W] -> the selected hidden states [N, P, D * len(layers)]."""

    def __init__(self, cfg: VisionConfig, weights: dict[str, Tensor]) -> None:
        """``weights``: tensors named as in CLIPVisionModel's ``vision_model`` (no prefix)."""
        self.cfg = cfg
        self.patch_embed = weights["embeddings.patch_embedding.weight"]  # [D, C, ps, ps]
        self.class_embed = weights["embeddings.class_embedding"]  # [D]
        self.pos_embed = weights["embeddings.position_embedding.weight"]  # [P + 1, D]
        self.pre_norm = (weights["pre_layrnorm.weight"], weights["pre_layrnorm.bias"])
        self.layers = [
            ClipEncoderLayer(cfg, _prefixed(weights, f"encoder.layers.{i}."))
            for i in range(cfg.num_layers)
        ]

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.dtype

    def forward(self, pixel_values: Tensor, feature_layers: tuple[int, ...]) -> Tensor:
        """Hidden states numbered as Hugging Face's ``hidden_states`` (0 = embeddings after
        the pre-layernorm, i = after layer i; negative counts from the end), concatenated."""
        wanted = [i % (len(self.layers) + 1) for i in feature_layers]
        x = self._embed(pixel_values)
        states = {0: x}
        for i, layer in enumerate(self.layers[: max(wanted)], start=1):
            x = layer.forward(x)
            states[i] = x
        return torch.cat([states[i] for i in wanted], dim=-1)

    def _embed(self, pixel_values: Tensor) -> Tensor:
        patches = F.conv2d(
            pixel_values.to(self.dtype), self.patch_embed, stride=self.cfg.patch_size
        )
        patches = patches.flatten(2).transpose(1, 2)  # [N, P, D]
        cls = self.class_embed.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.pos_embed
        return F.layer_norm(x, x.shape[-1:], *self.pre_norm, self.cfg.layer_norm_eps)


def _prefixed(w: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
