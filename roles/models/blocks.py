"""Building blocks of every decoder: attention over the paged cache, gated MLPs, norms, rotary
tables, the mixture-of-experts block, the two layer shapes and the model skeleton.

An architecture file (``llama.py``, ``qwen3.py``, ``gemma2.py``...) composes these from its
checkpoint's tensor names; nothing here knows a family's names. Every projection goes
through ``kernels.linear.Linear`` (so a weight format chosen at load applies to every
architecture), every other op through the kernel module chosen at start-up (Triton on CUDA,
torch references on CPU). It must not decide what to run: the model runner passes the
flattened tokens of one step and their ``AttentionMetadata``.

Shapes: T = tokens in the step (all sequences back to back), H = hidden size,
nh / nkv = query / KV heads, hd = head dim, E = experts, k = experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from splitserve.errors import ModelLoadError
from splitserve.kernels import native
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
    keep: Tensor | None = None
    """[K] int64 ascending: the only rows whose output the step uses (its sampled rows), or
    None for all. The last layer then computes its attention (each kept row as a decode row),
    MLP and the final norm for these rows alone; every row still stores its K/V."""
    keep_block_tables: Tensor | None = None  # [K, max_blocks] int32, each kept row's sequence
    keep_context_lens: Tensor | None = None  # [K] int32: a kept row's position + 1

    @property
    def num_prefill_seqs(self) -> int:
        return self.prefill_context_lens.shape[0]


# --------------------------------------------------------------------------- weights


class Weights:
    """A checkpoint's tensors under Hugging Face names, taken by name and checked for shape."""

    def __init__(self, tensors: dict[str, Tensor], prefix: str = "") -> None:
        self.tensors, self.prefix = tensors, prefix

    def sub(self, prefix: str) -> Weights:
        return Weights(self.tensors, self.prefix + prefix)

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> Tensor | None:
        return self.take(name, shape) if self.has(name) else None

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
        """The tensor ``prefix + name``; a missing or mis-shaped one fails naming it."""
        full = self.prefix + name
        t = self.tensors.get(full)
        if t is None:
            raise ModelLoadError(f"tensor {full!r} is missing from the checkpoint")
        if shape is not None and tuple(t.shape) != shape:
            raise ModelLoadError(
                f"tensor {full!r} has shape {tuple(t.shape)}, expected {shape}"
            )
        return t


# --------------------------------------------------------------------------- norms, MLPs


class RMSNorm:
    """RMSNorm with optional fused residual add; ``offset=1`` gives Gemma's ``1 + weight``."""

    def __init__(self, weight: Tensor, eps: float, ops: ModuleType, offset: float = 0.0) -> None:
        self.weight = (weight.float() + offset).to(weight.dtype) if offset else weight
        self.eps, self.ops = eps, ops

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x [T, D] -> (normed [T, D], x + residual when a residual is given)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)  # type: ignore[no-any-return]


def gated_activation(ops: ModuleType, act: str):  # type: ignore[no-untyped-def]
    """[T, 2*I] = [gate | up] -> [T, I]: SwiGLU for ``silu``, GeGLU for the tanh gelus."""
    return ops.silu_and_mul if act == "silu" else ops.gelu_tanh_and_mul


class GatedMLP:
    """``down(act(gate) * up)`` with gate and up fused in one projection."""

    def __init__(self, gate_up: Tensor, down: Tensor, act: str, ops: ModuleType) -> None:
        self.gate_up = Linear(gate_up)  # [2 I, H]
        self.down = Linear(down)  # [H, I]
        self.act = gated_activation(ops, act)
        self.act_name = "silu" if act == "silu" else "gelu_tanh"

    def __call__(self, x: Tensor) -> Tensor:
        return self.down_gated(self.gate_up(x))

    def forward_normed(self, x: Tensor, residual: Tensor, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """``self(h)`` with ``h, residual = norm(x, residual)`` (fused where the kernels can)."""
        gate_up, residual = self.gate_up.normed(x, residual, norm)  # type: ignore[assignment]
        return self.down_gated(gate_up), residual

    def down_gated(self, gate_up: Tensor) -> Tensor:
        return self.down.gated(gate_up, self.act_name, self.act)


def dense_mlp(cfg: ModelConfig, w: Weights, ops: ModuleType, size: int | None = None) -> GatedMLP:
    """The MLP under ``gate_proj`` / ``up_proj`` / ``down_proj`` names."""
    inter, hidden = size or cfg.intermediate_size, cfg.hidden_size
    gate_up = torch.cat(
        [w.take("gate_proj.weight", (inter, hidden)), w.take("up_proj.weight", (inter, hidden))]
    )
    return GatedMLP(gate_up, w.take("down_proj.weight", (hidden, inter)), cfg.hidden_act, ops)


class MoE:
    """Mixture of experts: softmax router, top-k, experts as grouped matmuls.

    The routed (token, expert) pairs are sorted by expert, so each expert runs one gated
    MLP over all its rows; the results are weighted and summed back per token. On the Triton
    backend one fused kernel (``kernels/fused_moe.py``) does the same over stacked weights; on
    the CPU backend with float32 SiLU experts, one native call (``native.moe_silu``).
    """

    def __init__(
        self, cfg: ModelConfig, router: Tensor, experts: list[tuple[Tensor, Tensor, Tensor]],
        ops: ModuleType, renormalize: bool,
    ) -> None:
        self.router = Linear(router)  # [E, H]
        self.top_k, self.renormalize, self.ops = cfg.num_experts_per_tok, renormalize, ops
        self.act_name = cfg.hidden_act
        self.fused = ops.__name__.endswith("triton_ops")
        self.num_experts = len(experts)
        self.experts: list[GatedMLP] = []
        # the CPU backend's native kernel: every expert in one call (float32, SiLU)
        self.native = (ops.__name__.endswith("cpu_ops")
                       and native.moe_available([t for ex in experts for t in ex], self.act_name))
        if self.native:  # packed per expert, stacked: [E, 2I * H] and [E, H * I]
            self.inter = int(experts[0][0].shape[0])
            self.w13p, self.w2p = native.pack_moe_experts(experts)
        elif self.fused:  # stacked for the kernel (weights stay float: no Linear here)
            self.w13 = torch.stack([torch.cat([g, u]) for g, u, _ in experts])  # [E, 2 I, H]
            self.w2 = torch.stack([d for _, _, d in experts])  # [E, H, I]
        else:
            self.experts = [
                GatedMLP(torch.cat([g, u]), d, cfg.hidden_act, ops) for g, u, d in experts
            ]

    def forward_normed(self, x: Tensor, residual: Tensor, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        h, residual = norm(x, residual)  # type: ignore[assignment]
        return self(h), residual

    def __call__(self, x: Tensor) -> Tensor:
        """[T, H] -> [T, H]."""
        weights, ids = self.ops.moe_route(self.router(x), self.top_k, self.renormalize)
        if self.native:
            return native.moe_silu(x, self.w13p, self.w2p, weights, ids, self.inter)
        if self.fused:
            return self.ops.fused_moe(x, self.w13, self.w2, weights, ids, self.act_name)  # type: ignore[no-any-return]
        return self._grouped(x, weights, ids)

    def _grouped(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        order, counts = self.ops.moe_groups(ids, self.num_experts)
        routed = x[order // self.top_k]  # [T * k, H], the routed pairs grouped by expert
        ys, start = [], 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n:
                ys.append(expert(routed[start : start + n]))  # [n, H]
                start += n
        return self.ops.moe_combine(torch.cat(ys), weights, order).to(x.dtype)  # type: ignore[no-any-return]


def moe_experts(
    w: Weights, num_experts: int, names: tuple[str, str, str], shapes: tuple[tuple[int, int], ...]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(gate, up, down) weights of each expert under ``experts.{e}.{name}.weight`` names."""
    return [
        tuple(  # type: ignore[misc]
            w.take(f"experts.{e}.{name}.weight", shape)
            for name, shape in zip(names, shapes, strict=True)
        )
        for e in range(num_experts)
    ]


# --------------------------------------------------------------------------- rotary


def rope_table(
    cfg: ModelConfig, ops: ModuleType, device: torch.device, theta: float,
    scaling: dict | None,
) -> Tensor:
    """[max_position, rotary_dim] float32 [cos | sin] table for one rotary variant."""
    table = ops.rope_cos_sin_cache(
        cfg.head_dim, cfg.max_position_embeddings, theta, scaling, cfg.rotary_dim
    )
    return table.to(device)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- attention


class Attention:
    """GQA attention over the paged KV cache, with the per-family options as plain values:
    q/k norms (per head), the layer's window, logit soft-cap, scale, rotary table."""

    def __init__(
        self, cfg: ModelConfig, layer: int, ops: ModuleType, cos_sin: Tensor,
        qkv: tuple[Tensor, Tensor | None], o_proj: Tensor,
        qk_norms: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> None:
        self.ops, self.cos_sin = ops, cos_sin
        self.qk_norm: tuple[Tensor, Tensor, float] | None = None
        if qk_norms is not None:  # RMSNorm over each head's dims, before rotary
            if qk_norms[0].eps != qk_norms[1].eps:
                raise ValueError("q_norm and k_norm must share their epsilon")
            self.qk_norm = (qk_norms[0].weight, qk_norms[1].weight, qk_norms[0].eps)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = Linear(*qkv)  # [(nh + 2 nkv) * hd, H]
        self.o_proj = Linear(o_proj)  # [H, nh * hd]
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.attention_scale
        self.window = cfg.window(layer)
        self.soft_cap = cfg.attn_logit_softcap

    def __call__(
        self, positions: Tensor, hidden: Tensor, kv_cache: Tensor, meta: AttentionMetadata,
        pruned: bool = False,
    ) -> Tensor:
        """hidden [T, H] -> [T, H] ([K, H]: the kept rows, when ``pruned``); stores this
        step's K/V into kv_cache [2, num_blocks, block_size, nkv, hd] first."""
        return self._attend(positions, *self._project(hidden), kv_cache, meta, pruned)

    def forward_normed(
        self, positions: Tensor, hidden: Tensor, residual: Tensor | None, norm: RMSNorm,
        kv_cache: Tensor, meta: AttentionMetadata, pruned: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``self(h)`` with ``h, residual = norm(hidden, residual)`` (the first layer: no
        residual yet, hidden becomes it); the norm fused into the QKV projection where the
        kernels can. Returns (attention output, residual)."""
        qkv, new_residual = self.qkv.normed(hidden, residual, norm)
        residual = hidden if residual is None else new_residual
        assert residual is not None
        return self._attend(positions, *self._split(qkv), kv_cache, meta, pruned), residual

    def _attend(
        self, positions: Tensor, q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor,
        meta: AttentionMetadata, pruned: bool,
    ) -> Tensor:
        q = self.ops.rotary_store_kv(  # (q/k norms,) rotary, then K/V into the cache
            positions, q, k, v, self.cos_sin, kv_cache, meta.slot_mapping, self.qk_norm
        )
        if pruned:  # each kept row attends as a decode row of its own context
            assert meta.keep is not None and meta.keep_block_tables is not None
            kept = meta.keep.numel()
            if not kept:
                return q.new_empty((0, self.o_proj.out_features))
            out = self._decode(q.index_select(0, meta.keep), kv_cache, meta.keep_block_tables,
                               meta.keep_context_lens)
            return self.o_proj(out.reshape(kept, self.q_size))
        num_tokens, d = q.shape[0], meta.num_decode
        if d == num_tokens:  # decodes only (the common step): no staging copy
            out = self._decode(q, kv_cache, meta.decode_block_tables, meta.decode_context_lens)
            return self.o_proj(out.reshape(num_tokens, self.q_size))
        out = torch.empty_like(q)  # [T, nh, hd]
        if d:
            out[:d] = self._decode(q[:d], kv_cache, meta.decode_block_tables,
                                   meta.decode_context_lens)
        out[d:] = self.ops.prefill_attention(
            q[d:], kv_cache, meta.prefill_block_tables, meta.prefill_query_start_loc,
            meta.prefill_context_lens, self.scale, self.window, self.soft_cap,
        )
        return self.o_proj(out.view(num_tokens, self.q_size))

    def _project(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [T, nh, hd], k and v [T, nkv, hd]: strided views of one projection's output."""
        return self._split(self.qkv(hidden))

    def _split(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        num_tokens, hd = qkv.shape[0], self.head_dim
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, hd)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(num_tokens, self.num_kv_heads, hd)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, hd)
        return q, k, v

    def _decode(self, q: Tensor, kv_cache: Tensor, tables: Tensor, lens: Tensor | None) -> Tensor:
        """Each row of q attends as a decode row over its sequence's ``lens`` positions."""
        return self.ops.paged_decode_attention(  # type: ignore[no-any-return]
            q, kv_cache, tables, lens, self.scale, self.window, self.soft_cap,
        )


def standard_attention(
    cfg: ModelConfig, layer: int, w: Weights, ops: ModuleType, cos_sin: Tensor,
    norm_offset: float | None = None,
) -> Attention:
    """Attention under ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` (+ biases when
    present), with ``q_norm`` / ``k_norm`` when ``norm_offset`` is given."""
    hd, h = cfg.head_dim, cfg.hidden_size
    rows = {"q": cfg.num_heads * hd, "k": cfg.num_kv_heads * hd, "v": cfg.num_kv_heads * hd}
    weight = torch.cat([w.take(f"{p}_proj.weight", (n, h)) for p, n in rows.items()])
    biases = [w.get(f"{p}_proj.bias", (n,)) for p, n in rows.items()]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None  # type: ignore[misc, arg-type]
    norms = None
    if norm_offset is not None:
        norms = (
            RMSNorm(w.take("q_norm.weight", (hd,)), cfg.rms_norm_eps, ops, norm_offset),
            RMSNorm(w.take("k_norm.weight", (hd,)), cfg.rms_norm_eps, ops, norm_offset),
        )
    return Attention(
        cfg, layer, ops, cos_sin, (weight, bias), w.take("o_proj.weight", (h, rows["q"])), norms
    )


# --------------------------------------------------------------------------- layers


class Layer(Protocol):
    def forward(
        self, positions: Tensor, hidden: Tensor, residual: Tensor | None, kv_cache: Tensor,
        meta: AttentionMetadata, pruned: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """(hidden, residual) in and out; the residual stream is their sum. ``pruned``: out
        only for ``meta.keep``'s rows (the last layer)."""
        ...


def _kept(residual: Tensor, meta: AttentionMetadata, pruned: bool) -> Tensor:
    """The residual rows that go on past a pruned layer's attention."""
    return residual.index_select(0, meta.keep) if pruned and meta.keep is not None else residual


MLPLike = GatedMLP | MoE


class PreNormLayer:
    """Llama shape: ``x += attn(norm(x)); x += mlp(norm(x))`` (residual add fused in the norm)."""

    def __init__(self, attn: Attention, mlp: MLPLike, input_norm: RMSNorm, post_norm: RMSNorm) -> None:
        self.attn, self.mlp, self.input_norm, self.post_norm = attn, mlp, input_norm, post_norm
        self._one_call: native.DecodeLayerArgs | None | bool = None  # None: not looked at yet

    def forward(
        self, positions: Tensor, hidden: Tensor, residual: Tensor | None, kv_cache: Tensor,
        meta: AttentionMetadata, pruned: bool = False,
    ) -> tuple[Tensor, Tensor]:
        if not pruned and meta.num_decode == hidden.shape[0] > 0:
            done = self._decode_in_one_call(positions, hidden, residual, kv_cache, meta)
            if done is not None:
                return done
        hidden, residual = self.attn.forward_normed(
            positions, hidden, residual, self.input_norm, kv_cache, meta, pruned)
        residual = _kept(residual, meta, pruned)
        if not hidden.shape[0]:
            return hidden, residual
        return self.mlp.forward_normed(hidden, residual, self.post_norm)

    def _decode_in_one_call(
        self, positions: Tensor, hidden: Tensor, residual: Tensor | None, kv_cache: Tensor,
        meta: AttentionMetadata,
    ) -> tuple[Tensor, Tensor] | None:
        """A step of decode rows through ``native.decode_layer`` (the same kernels in the
        same order as the separate calls, so the same bits), or None where it does not apply
        (then the separate calls run; they also raise the errors the kernels report)."""
        if self._one_call is None:
            self._one_call = _decode_layer_args(self) or False
        args = self._one_call
        if args is False:
            return None
        assert isinstance(args, native.DecodeLayerArgs)
        tables, lens, m = meta.decode_block_tables, meta.decode_context_lens, hidden.shape[0]
        if not (hidden.dtype == self.input_norm.weight.dtype and hidden.is_contiguous()
                and hidden.dim() == 2 and hidden.shape[1] == args.H
                and (residual is None or (residual.is_contiguous()
                                          and residual.shape == hidden.shape))
                and kv_cache.dim() == 5 and kv_cache.dtype in native.KV_DTYPE_CODES
                and kv_cache.shape[0] == 2 and kv_cache.shape[3] == args.NKV
                and kv_cache.shape[4] == args.D and kv_cache.stride(4) == 1
                and tables.dtype == torch.int32 and tables.dim() == 2 and tables.stride(1) == 1
                and tables.shape[0] == m and tables.shape[1] > 0
                and lens.dtype == torch.int32 and lens.is_contiguous() and lens.shape == (m,)
                and positions.dtype == torch.int64 and positions.is_contiguous()
                and positions.shape == (m,) and meta.slot_mapping.dtype == torch.int64
                and meta.slot_mapping.is_contiguous() and meta.slot_mapping.shape == (m,)):
            return None
        out, res_out = torch.empty_like(hidden), torch.empty_like(hidden)
        args.M, args.threads = m, torch.get_num_threads()
        args.kv_dtype = native.KV_DTYPE_CODES[kv_cache.dtype]  # fp8 caches too
        args.positions, args.slots = positions.data_ptr(), meta.slot_mapping.data_ptr()
        args.k_cache, args.v_cache = native._cache_pointers(kv_cache)
        args.stride_block, args.stride_token, args.stride_head = kv_cache.stride()[1:4]
        args.num_blocks, args.block_size = kv_cache.shape[1], kv_cache.shape[2]
        args.block_tables, args.table_row_stride = tables.data_ptr(), tables.stride(0)
        args.max_blocks, args.context_lens = tables.shape[1], lens.data_ptr()
        args.x, args.residual = hidden.data_ptr(), None if residual is None else residual.data_ptr()
        args.out, args.res_out = out.data_ptr(), res_out.data_ptr()
        return (out, res_out) if native.decode_layer(args) else None


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _decode_layer_args(layer: PreNormLayer) -> native.DecodeLayerArgs | None:
    """The per-layer operands of ``native.decode_layer``, or None where it does not apply:
    quantized projections on the native kernels without biases, a gated MLP, the native norm,
    rotary and attention kernels, float32 / bf16 weights."""
    attn, mlp = layer.attn, layer.mlp
    if not isinstance(mlp, GatedMLP) or mlp.act_name not in native.PROLOGUES:
        return None
    projs = (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down)
    quant = [p._native for p in projs]
    if any(q is None for q in quant) or any(p.bias is not None for p in projs):
        return None
    norms = (layer.input_norm, layer.post_norm)
    dtype = layer.input_norm.weight.dtype
    ops = attn.ops
    if (any(n.ops.rms_norm is not native.rms_norm or n.weight.dtype != dtype
            or not n.weight.is_contiguous() for n in norms)
            or getattr(ops, "rotary_store_kv", None) is not native.rotary_store_kv
            or getattr(ops, "paged_decode_attention", None) is not native.paged_decode_attention
            or dtype not in _NATIVE_DTYPES or attn.head_dim % 16
            or attn.num_heads % attn.num_kv_heads
            or not (0 < attn.cos_sin.shape[1] <= attn.head_dim and attn.cos_sin.shape[1] % 2 == 0)
            or attn.cos_sin.dtype != torch.float32 or attn.cos_sin.stride(1) != 1
            or (attn.qk_norm is not None and any(
                w.dtype != dtype or not w.is_contiguous() for w in attn.qk_norm[:2]))):
        return None
    a = native.DecodeLayerArgs()
    a.H, a.I = attn.qkv.in_features, mlp.down.in_features
    a.NH, a.NKV, a.D, a.rot = attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.cos_sin.shape[1]
    a.dtype = a.kv_dtype = 1 if dtype == torch.bfloat16 else 0
    a.act = native.PROLOGUES[mlp.act_name]
    a.bits_qkv, a.bits_o, a.bits_gu, a.bits_down = (q.bits for q in quant)  # type: ignore[union-attr]
    a.w_qkv, a.w_o, a.w_gu, a.w_down = (q.packed.data_ptr() for q in quant)  # type: ignore[union-attr]
    a.norm1, a.norm2 = (n.weight.data_ptr() for n in norms)
    a.eps1, a.eps2 = (n.eps for n in norms)
    a.table, a.table_stride, a.max_pos = (attn.cos_sin.data_ptr(), attn.cos_sin.stride(0),
                                         attn.cos_sin.shape[0])
    if attn.qk_norm is not None:
        a.q_norm, a.k_norm, a.qk_eps = attn.qk_norm[0].data_ptr(), attn.qk_norm[1].data_ptr(), attn.qk_norm[2]
    a.scale, a.soft_cap, a.window = attn.scale, attn.soft_cap or 0.0, attn.window or 0
    return a


class SandwichLayer:
    """Gemma shape: every sub-block's output is normed again before its residual add:
    ``x += post_attn(attn(norm(x))); x += post_ff(mlp(pre_ff(x)))``."""

    def __init__(
        self, attn: Attention, mlp: MLPLike, norms: tuple[RMSNorm, RMSNorm, RMSNorm, RMSNorm]
    ) -> None:
        self.attn, self.mlp = attn, mlp
        self.input_norm, self.post_attn_norm, self.pre_ff_norm, self.post_ff_norm = norms

    def forward(
        self, positions: Tensor, hidden: Tensor, residual: Tensor | None, kv_cache: Tensor,
        meta: AttentionMetadata, pruned: bool = False,
    ) -> tuple[Tensor, Tensor]:
        hidden, residual = self.attn.forward_normed(
            positions, hidden, residual, self.input_norm, kv_cache, meta, pruned)
        residual = _kept(residual, meta, pruned)
        if not hidden.shape[0]:
            return hidden, residual
        hidden = self.post_attn_norm(hidden)[0]
        hidden, residual = self.mlp.forward_normed(hidden, residual, self.pre_ff_norm)
        return self.post_ff_norm(hidden)[0], residual


# --------------------------------------------------------------------------- the model


class DecoderModel:
    """Embeddings + layers + final norm + logits head; subclasses build the layers.

    A subclass names the ``architectures`` / ``model_types`` it serves, reads its family's
    config fields (``config_from_hf``) and builds layer ``i`` from that layer's tensors
    (``build_layer``). Gemma-style options (embedding scale, ``1 + weight`` norms, final
    logit soft-cap) are class attributes.
    """

    architectures: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    norm_offset: ClassVar[float] = 0.0
    """1.0 where the checkpoint stores norm weights as ``weight - 1`` (Gemma)."""
    scale_embeddings: ClassVar[bool] = False
    """Multiply embeddings by ``sqrt(hidden_size)`` (Gemma), or by ``embedding_multiplier``
    where the config sets one (Granite)."""

    @classmethod
    def config_from_hf(cls, hf: dict, architecture: str) -> ModelConfig:
        raise NotImplementedError

    @classmethod
    def checkpoint_tensors(cls, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The tensors one checkpoint tensor stands for, under the names ``build_layer`` takes
        (a family that stacks experts splits them here, before a weight format quantizes
        each); by default the tensor itself."""
        return [(name, tensor)]

    def __init__(
        self, cfg: ModelConfig, weights: dict[str, Tensor], ops: ModuleType, device: torch.device
    ) -> None:
        self.cfg, self.ops, self.device = cfg, ops, device
        w = Weights({k: v.to(device) for k, v in weights.items()})
        v, h = cfg.vocab_size, cfg.hidden_size
        self.embed = w.take("model.embed_tokens.weight", (v, h))  # [V, H]
        scale = h**0.5 if cfg.embedding_multiplier is None else cfg.embedding_multiplier
        self.embed_scale = torch.tensor(scale, dtype=self.embed.dtype, device=device)
        self.norm = self.rms_norm(w.take("model.norm.weight", (h,)))
        head = self.embed if cfg.tie_word_embeddings else w.take("lm_head.weight", (v, h))
        self.lm_head = Linear(head)
        self.layers: list[Layer] = [
            self.build_layer(i, w.sub(f"model.layers.{i}.")) for i in range(cfg.num_layers)
        ]

    def build_layer(self, i: int, w: Weights) -> Layer:
        raise NotImplementedError

    def rms_norm(self, weight: Tensor) -> RMSNorm:
        return RMSNorm(weight, self.cfg.rms_norm_eps, self.ops, self.norm_offset)

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
        on_layer: Callable[[int], None] | None = None,
    ) -> Tensor:
        """[T, H], or [K, H] for ``meta.keep``'s rows when it is set (the last layer's
        attention, MLP and the final norm then run for those rows only). ``on_layer(i)`` runs
        once layer ``i`` has stored its KV and returned (layer-wise KV streaming serves a layer
        group's KV while later layers compute)."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual: Tensor | None = None
        last = len(self.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            pruned = i == last and meta.keep is not None
            hidden, residual = layer.forward(positions, hidden, residual, kv_cache, meta, pruned)
            if on_layer is not None:
                on_layer(i)
        if not hidden.shape[0]:
            return hidden
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """[T] -> [T, H]."""
        embeds = F.embedding(input_ids, self.embed)
        return embeds * self.embed_scale if self.scale_embeddings else embeds

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """[N, H] -> [N, V] float32 logits (soft-capped where the family caps them)."""
        logits = self.lm_head(hidden).float()
        if self.cfg.logits_scaling != 1.0:
            logits = logits / self.cfg.logits_scaling
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else self.ops.softcap(logits, cap)  # type: ignore[no-any-return]
