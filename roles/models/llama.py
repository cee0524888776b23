"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV cache.

Owns the forward pass: embeddings, decoder layers (RMSNorm, RoPE, GQA attention,
SwiGLU MLP) and the logits head. It calls the kernel ops chosen at start-up
(Triton on CUDA, torch references on CPU) and never decides what to run: the
model runner passes the flattened tokens of one step and their AttentionMetadata.

Shapes: T = tokens in the step (all sequences back to back), H = hidden size,
nh / nkv = query / KV heads, hd = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from splitserve.kernels.linear import Linear
from splitserve.roles.models.config import ModelConfig

Tensor = torch.Tensor


@dataclass
class AttentionMetadata:
    """Where each token of a step reads and writes KV.

    Tokens are ordered: the ``num_decode`` single-token sequences first, then the
    prefill chunks back to back.
    """

    slot_mapping: Tensor  # [T] int64, cache slot of each token's K/V
    num_decode: int
    decode_block_tables: Tensor  # [num_decode, max_blocks] int32
    decode_context_lens: Tensor  # [num_decode] int32
    prefill_block_tables: Tensor  # [num_prefill, max_blocks] int32
    prefill_query_start_loc: Tensor  # [num_prefill + 1] int32, relative to num_decode
    prefill_context_lens: Tensor  # [num_prefill] int32

    @property
    def num_prefill_seqs(self) -> int:
        return self.prefill_context_lens.shape[0]


class LlamaLayer:
    """One decoder layer; weights are fused (QKV, gate|up) so each step runs four matmuls."""

    def __init__(self, cfg: ModelConfig, w: dict[str, Tensor], ops: ModuleType) -> None:
        self.cfg, self.ops = cfg, ops
        self.input_norm = w["input_layernorm.weight"]
        self.post_norm = w["post_attention_layernorm.weight"]
        biases = [w.get(f"self_attn.{p}_proj.bias") for p in "qkv"]
        self.qkv = Linear(  # [(nh + 2 nkv) * hd, H]
            torch.cat([w[f"self_attn.{p}_proj.weight"] for p in "qkv"]),
            torch.cat(biases) if all(b is not None for b in biases) else None,  # type: ignore[misc]
        )
        self.o_proj = Linear(w["self_attn.o_proj.weight"])
        self.gate_up = Linear(torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]))
        self.down = Linear(w["mlp.down_proj.weight"])
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        positions: Tensor,  # [T]
        hidden: Tensor,  # [T, H]
        residual: Tensor | None,  # [T, H]
        kv_cache: Tensor,  # [2, num_blocks, block_size, nkv, hd]
        cos_sin: Tensor,  # [max_pos, hd]
        meta: AttentionMetadata,
    ) -> tuple[Tensor, Tensor]:
        ops, eps = self.ops, self.cfg.rms_norm_eps
        if residual is None:
            residual = hidden
            hidden, _ = ops.rms_norm(hidden, self.input_norm, eps)
        else:
            hidden, residual = ops.rms_norm(hidden, self.input_norm, eps, residual)
        hidden = self._attention(positions, hidden, kv_cache, cos_sin, meta)
        hidden, residual = ops.rms_norm(hidden, self.post_norm, eps, residual)
        hidden = self.down(ops.silu_and_mul(self.gate_up(hidden)))
        return hidden, residual  # type: ignore[return-value]

    def _attention(
        self, positions: Tensor, hidden: Tensor, kv_cache: Tensor, cos_sin: Tensor,
        meta: AttentionMetadata,
    ) -> Tensor:
        cfg, ops = self.cfg, self.ops
        num_tokens = hidden.shape[0]
        qkv = self.qkv(hidden)
        q = qkv[:, : self.q_size].view(num_tokens, cfg.num_heads, cfg.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(num_tokens, cfg.num_kv_heads, -1)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, cfg.num_kv_heads, -1)
        q, k = ops.rotary_embedding(positions, q, k, cos_sin)
        ops.store_kv(k, v, kv_cache, meta.slot_mapping)
        d = meta.num_decode
        if d == num_tokens:  # decodes only (the common step): no staging copy
            out = ops.paged_decode_attention(
                q, kv_cache, meta.decode_block_tables, meta.decode_context_lens,
                self.scale, cfg.sliding_window,
            )
            return self.o_proj(out.reshape(num_tokens, self.q_size))
        out = torch.empty_like(q)  # [T, nh, hd]
        if d:
            out[:d] = ops.paged_decode_attention(
                q[:d], kv_cache, meta.decode_block_tables, meta.decode_context_lens,
                self.scale, cfg.sliding_window,
            )
        out[d:] = ops.prefill_attention(
            q[d:], kv_cache, meta.prefill_block_tables, meta.prefill_query_start_loc,
            meta.prefill_context_lens, self.scale, cfg.sliding_window,
        )
        return self.o_proj(out.view(num_tokens, self.q_size))


class LlamaModel:
    """Embeddings + layers + final norm + logits head."""

    def __init__(
        self, cfg: ModelConfig, weights: dict[str, Tensor], ops: ModuleType, device: torch.device
    ) -> None:
        self.cfg, self.ops = cfg, ops
        w = {k: v.to(device) for k, v in weights.items()}
        self.embed = w["model.embed_tokens.weight"]  # [V, H]
        self.norm = w["model.norm.weight"]
        self.lm_head = Linear(self.embed if cfg.tie_word_embeddings else w["lm_head.weight"])
        self.layers = [
            LlamaLayer(cfg, _layer_weights(w, i), ops) for i in range(cfg.num_layers)
        ]
        self.cos_sin = ops.rope_cos_sin_cache(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        ).to(device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def forward(
        self,
        input_ids: Tensor,  # [T]
        positions: Tensor,  # [T]
        kv_caches: list[Tensor],  # per layer [2, num_blocks, block_size, nkv, hd]
        meta: AttentionMetadata,
        inputs_embeds: Tensor | None = None,  # [T, H]: given when images replace some rows
    ) -> Tensor:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual: Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer.forward(positions, hidden, residual, kv_cache, self.cos_sin, meta)
        hidden, _ = self.ops.rms_norm(hidden, self.norm, self.cfg.rms_norm_eps, residual)
        return hidden  # [T, H]

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """[T] -> [T, H]."""
        return F.embedding(input_ids, self.embed)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """[N, H] -> [N, V] float32 logits."""
        return self.lm_head(hidden).float()


def _layer_weights(w: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    prefix = f"model.layers.{i}."
    return {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
