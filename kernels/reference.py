"""Pure-torch reference of every kernel: the engine's CPU path and the kernels' test oracle.

Each function here has the signature of its Triton twin (one file per kernel in
this folder). They favour clarity, but they run the engine on CPU, so the hot
ones (decode attention, store_kv) are batched rather than looped per sequence.

KV cache layout (one tensor per layer), as moved by the transfer layer:
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)
read through its strides: the engine's caches are views of one block-major pool
(kernels/kv_cache.py), so only each block's [block_size, num_kv_heads, head_dim] is packed.
A slot is ``block_id * block_size + offset``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

from splitserve.kernels.kv_cache import FP8_KV_DTYPES, to_cache_dtype, widen_kv

Tensor = torch.Tensor
T = TypeVar("T")


# --------------------------------------------------------------------------- per-step memo

_memo = threading.local()


def _step_memo(
    name: str, tensors: tuple[Tensor, ...], extra: tuple, build: Callable[[], T], same: tuple = ()
) -> T:
    """``build()``, reused while called again with tensors equal to these, the same ``extra``
    and the very objects in ``same`` (held, so no other object can take their identity).

    Every layer of a step passes the same metadata (block tables, context lengths, positions),
    so what is derived from it alone is computed once per step; comparing a few small index
    tensors costs far less than the derivation. Keyed by content (a snapshot), so a tensor
    changed in place or a new one at a freed one's address is never mistaken for the old.
    Each name keeps an entry per ``extra`` and ``same`` (up to ``_MEMO_SLOTS``), so layers
    that alternate (windowed and global attention, local and global rotary bases) each keep
    theirs. Per thread (engines on different threads never share one).
    """
    entries: dict[tuple, tuple] | None = getattr(_memo, name, None)
    if entries is None:
        entries = {}
        setattr(_memo, name, entries)
    key = (extra, tuple(id(o) for o in same))
    entry = entries.get(key)
    if entry is not None:
        held, held_same, value = entry
        if all(a is b for a, b in zip(held_same, same, strict=True)) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
            for a, b in zip(held, tensors, strict=True)
        ):
            return value
    value = build()
    if key not in entries and len(entries) >= _MEMO_SLOTS:
        del entries[next(iter(entries))]  # the oldest
    entries[key] = (tuple(t.clone() for t in tensors), same, value)
    return value


_MEMO_SLOTS = 4
"""Entries kept per memo name (a model has at most a few attention / rotary variants)."""


# --------------------------------------------------------------------------- norms, activations


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """RMSNorm with optional fused residual add.

    x, residual: [T, H]; weight: [H]. With a residual, ``x + residual`` is both
    normalized and returned as the new residual (the pre-norm Llama pattern).
    The statistics are computed in float32 whatever the dtype.
    """
    if residual is not None:
        x = x + residual
        residual = x
    if x.dtype == torch.float32:  # the fused op is bit-identical to the steps below in fp32
        return F.rms_norm(x, (x.shape[-1],), weight, eps), residual
    # xf * rsqrt(mean(xf^2) + eps) in float32 (the fused op, as above), rounded to the
    # input dtype, then times the weight: transformers' order of roundings
    out = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight
    return out, residual


def silu_and_mul(x: Tensor) -> Tensor:
    """SwiGLU activation: x [T, 2*I] = [gate | up] -> silu(gate) * up, [T, I]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_tanh_and_mul(x: Tensor) -> Tensor:
    """GeGLU activation (Gemma): x [T, 2*I] = [gate | up] -> gelu_tanh(gate) * up, [T, I]."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]


def softcap(x: Tensor, cap: float) -> Tensor:
    """Logit soft-capping (Gemma 2): ``cap * tanh(x / cap)``, out of place."""
    return cap * torch.tanh(x / cap)


# --------------------------------------------------------------------------- rotary embedding


def rope_cos_sin_cache(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None = None,
    rotary_dim: int | None = None,
) -> Tensor:
    """Table of [cos | sin] per position: [max_position, rotary_dim] float32.

    ``rope_scaling`` supports Llama-3 frequency scaling
    (``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}``), linear scaling (``factor``) and Phi-3's LongRoPE
    (``{"rope_type": "longrope", "short_factor", "long_factor",
    "original_max_position_embeddings", "max_position_embeddings"}``: positions below the
    original length use the short factors, the rest the long ones, both scaled by the
    attention factor).
    """
    rotary_dim = rotary_dim or head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    cfg = rope_scaling or {}
    rope_type = cfg.get("rope_type", cfg.get("type"))
    positions = torch.arange(max_position, dtype=torch.float64)
    if rope_type == "longrope":
        return _longrope_table(inv_freq, positions, cfg)
    if rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, cfg)
    elif rope_type == "linear":
        positions = positions / float(cfg["factor"])
    elif rope_type not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}")
    freqs = torch.outer(positions, inv_freq)  # [max_position, rotary_dim / 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


def _longrope_table(inv_freq: Tensor, positions: Tensor, cfg: dict) -> Tensor:
    original = int(cfg["original_max_position_embeddings"])
    factor = cfg.get("factor") or float(cfg.get("max_position_embeddings", original)) / original
    attention = cfg.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = torch.tensor(cfg["short_factor"], dtype=torch.float64)
    long = torch.tensor(cfg["long_factor"], dtype=torch.float64)
    if short.shape != inv_freq.shape or long.shape != inv_freq.shape:
        raise ValueError(
            f"longrope short_factor / long_factor must have {inv_freq.numel()} entries "
            f"(rotary_dim / 2), got {short.numel()} / {long.numel()}"
        )
    ext = torch.where(positions[:, None] < original, short[None, :], long[None, :])
    freqs = positions[:, None] * (inv_freq[None, :] / ext)  # [max_position, rotary_dim / 2]
    return (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention).float()


def _llama3_scale(inv_freq: Tensor, cfg: dict) -> Tensor:
    factor = float(cfg["factor"])
    low, high = float(cfg.get("low_freq_factor", 1.0)), float(cfg.get("high_freq_factor", 4.0))
    old_len = float(cfg.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary_embedding(
    positions: Tensor, query: Tensor, key: Tensor, cos_sin_cache: Tensor
) -> tuple[Tensor, Tensor]:
    """Neox-style rotary embedding (rotate halves), out of place.

    positions: [T] int64; query: [T, num_heads, head_dim]; key: [T, num_kv_heads, head_dim];
    cos_sin_cache: [max_position, rotary_dim] float32 with rotary_dim <= head_dim.
    """
    cos2, sin2 = _step_memo(
        "rotary", (positions,), (), lambda: _rotary_tables(positions, cos_sin_cache),
        same=(cos_sin_cache,),
    )
    heads = query.shape[1]
    if _adjacent_heads(query, key):  # q and k side by side in one projection's output: one pass
        both = _rotate(query.as_strided((query.shape[0], heads + key.shape[1], query.shape[2]),
                                        query.stride()), cos2, sin2)
        return both[:, :heads], both[:, heads:]
    return _rotate(query, cos2, sin2), _rotate(key, cos2, sin2)


def _adjacent_heads(query: Tensor, key: Tensor) -> bool:
    """True when ``key``'s heads follow ``query``'s in memory with the same strides (the
    q and k columns of one fused qkv output), so both are one strided tensor of heads."""
    return (
        query.dim() == 3 and key.dim() == 3 and query.dtype == key.dtype
        and query.shape[0] == key.shape[0] and query.shape[2] == key.shape[2]
        and query.stride() == key.stride() and query.stride(2) == 1
        and query.untyped_storage().data_ptr() == key.untyped_storage().data_ptr()
        and key.storage_offset() == query.storage_offset() + query.shape[1] * query.stride(1)
    )


def _rotary_tables(positions: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """[cos | cos] and [-sin | sin] at each position, [T, 1, rotary_dim]: with them,
    x * [cos | cos] + [x2 | x1] * [-sin | sin] is, element for element, the textbook
    [x1 cos - x2 sin | x2 cos + x1 sin] (same products, same sums), in fewer ops."""
    cos_sin = cos_sin_cache.index_select(0, positions)  # [T, rotary_dim]
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def _rotate(x: Tensor, cos2: Tensor, sin2: Tensor) -> Tensor:
    rot = cos2.shape[-1]
    xr = x[..., :rot].float()
    swapped = torch.cat([xr[..., rot // 2 :], xr[..., : rot // 2]], dim=-1)
    out = (xr * cos2 + swapped * sin2).to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat([out, x[..., rot:]], dim=-1)


# --------------------------------------------------------------------------- paged KV cache


def store_kv(key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write new K/V rows into the paged cache, in place.

    key, value: [T, num_kv_heads, head_dim]; kv_cache: [2, num_blocks, block_size, kv_heads,
    head_dim]; slot_mapping: [T] int64, ``-1`` skips the token (padding).
    """
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    keep, slots, blocks, offsets = _step_memo(  # every layer of a step stores to the same slots
        "store_kv", (slot_mapping,), (block_size,), lambda: _store_plan(slot_mapping, block_size)
    )
    if keep is not None:
        key, value = key[keep], value[keep]
    key, value = to_cache_dtype(key, kv_cache.dtype), to_cache_dtype(value, kv_cache.dtype)
    if kv_cache.dtype in FP8_KV_DTYPES:  # torch's index ops take no fp8 on CPU: move bytes
        kv_cache, key, value = (t.view(torch.uint8) for t in (kv_cache, key, value))
    if kv_cache.stride(1) == block_size * kv_cache.stride(2):  # blocks back to back
        flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
        flat[0].index_copy_(0, slots, key)
        flat[1].index_copy_(0, slots, value)
        return
    # strided blocks (a view of the block-major pool): address (block, offset) pairs
    kv_cache[0].index_put_((blocks, offsets), key)
    kv_cache[1].index_put_((blocks, offsets), value)


def _compose_rotary_store_kv(
    rms_norm_fn: Callable[..., tuple[Tensor, Tensor | None]],
    rotary_fn: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
    store_fn: Callable[[Tensor, Tensor, Tensor, Tensor], None],
) -> Callable[..., Tensor]:
    """``rotary_store_kv`` built from a backend's own norm, rotary and store kernels."""

    def rotary_store_kv(
        positions: Tensor, query: Tensor, key: Tensor, value: Tensor, cos_sin_cache: Tensor,
        kv_cache: Tensor, slot_mapping: Tensor,
        qk_norm: tuple[Tensor, Tensor, float] | None = None,
    ) -> Tensor:
        """An attention layer's step between its projection and its attention: RMSNorm of
        each query and key head when ``qk_norm = (q_weight, k_weight, eps)`` is given, the
        rotary embedding of both, then the keys and ``value`` stored into the paged cache.

        query: [T, num_heads, head_dim]; key, value: [T, num_kv_heads, head_dim] (strided
        views of one projection's output are fine); the rest as in ``rotary_embedding`` and
        ``store_kv``. Returns the rotated queries [T, num_heads, head_dim].
        """
        if qk_norm is not None:
            q_weight, k_weight, eps = qk_norm
            t, hd = query.shape[0], query.shape[2]
            query = rms_norm_fn(query.reshape(-1, hd), q_weight, eps)[0].view(t, -1, hd)
            key = rms_norm_fn(key.reshape(-1, hd), k_weight, eps)[0].view(t, -1, hd)
        query, key = rotary_fn(positions, query, key, cos_sin_cache)
        store_fn(key, value, kv_cache, slot_mapping)
        return query

    return rotary_store_kv


rotary_store_kv = _compose_rotary_store_kv(rms_norm, rotary_embedding, store_kv)


def _store_plan(
    slot_mapping: Tensor, block_size: int
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """(rows kept or None when all are, their slots, blocks, offsets in block)."""
    keep: Tensor | None = None
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping = slot_mapping[keep]
    return keep, slot_mapping, slot_mapping // block_size, slot_mapping % block_size


def _window_mask(
    q_pos: Tensor, k_pos: Tensor, context_len: Tensor, sliding_window: int | None
) -> Tensor:
    """True where query position may attend key position (causal, in context, in window)."""
    allowed = (k_pos <= q_pos) & (k_pos < context_len)
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def _masked_softmax(
    scores: Tensor, scale: float, soft_cap: float | None, allowed: Tensor
) -> Tensor:
    """``softmax(cap * tanh(scores * scale / cap))`` (no cap: ``scores * scale``) over the
    allowed keys, in place on the float32 ``scores``: one buffer for the whole chain (these
    are a step's largest tensors). Same ops in the same order as transformers' eager
    attention. Every row must allow at least one key (a query always sees itself)."""
    scores.mul_(scale)
    if soft_cap is not None:
        scores.div_(soft_cap).tanh_().mul_(soft_cap)
    scores.masked_fill_(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1)


def paged_decode_attention(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Tensor:
    """Attention of one new query token per sequence over its paged context.

    query: [B, num_heads, head_dim]; block_tables: [B, max_blocks] int32 (unused entries any
    valid id); context_lens: [B] int32, tokens in context including the query's own
    (already stored). Returns [B, num_heads, head_dim]; a sequence with no context gets zeros.

    Sequences are grouped by their context length rounded up to ``_decode_granule``: each
    group gathers its blocks once, padded to that length. A sequence's padded length depends
    on its own length only, so its result does not depend on what it is batched with (batch
    invariance), and padding stays under one granule. The grouping, block ids and masks
    depend only on the metadata, so every layer of a step shares them (``_step_memo``).
    """
    if query.shape[0] == 0:
        return query.new_zeros(query.shape)
    block_size = kv_cache.shape[2]
    plan = _step_memo(
        "decode", (block_tables, context_lens), (block_size, sliding_window),
        lambda: _decode_plan(block_tables, context_lens, block_size, sliding_window),
    )
    if len(plan) == 1:
        return _decode_group(query, kv_cache, plan[0], scale, soft_cap)
    out = torch.empty_like(query)
    for group in plan:
        out[group.rows] = _decode_group(query[group.rows], kv_cache, group, scale, soft_cap)
    return out


class _DecodeGroup:
    """Sequences of one padded length: their rows, block ids and mask, as the layers use them.

    ``tables``: each sequence's block ids for the gathered span, from column ``first`` of its
    block table (``first``: [b] block index of the span's start; None for 0), so key ``j`` of
    the span sits at position ``first * block_size + j``."""

    def __init__(
        self, rows: Tensor | None, tables: Tensor, context_lens: Tensor, padded: int,
        block_size: int, sliding_window: int | None, first: Tensor | None = None,
    ) -> None:
        cols = padded // block_size
        tables = tables[:, :cols].long()
        if tables.shape[1] < cols:  # same padded width whatever the batch: pad with block 0
            tables = F.pad(tables, (0, cols - tables.shape[1]))
        self.rows = rows
        self.batch, self.length = tables.shape[0], padded
        self.ids = tables.reshape(-1)
        k_pos = torch.arange(padded, device=tables.device)[None, None, :]
        if first is not None:
            k_pos = k_pos + (first.long() * block_size)[:, None, None]
        ctx = context_lens.long()[:, None, None]
        self.allowed = _window_mask(ctx - 1, k_pos, ctx, sliding_window)  # [b, 1, L]
        empty = context_lens <= 0
        self.empty = empty if bool(empty.any()) else None


def _decode_plan(
    block_tables: Tensor, context_lens: Tensor, block_size: int, sliding_window: int | None
) -> list[_DecodeGroup]:
    """Sequences grouped by their context length rounded up to the granule; in a windowed
    layer, a sequence whose window is shorter than that padded length gathers only the
    window's blocks (``_window_span`` of them, ending at its last block): one group of the
    same length for all such sequences, whatever their context."""
    granule = _decode_granule(block_size)
    span = _window_span(sliding_window, block_size)
    groups: dict[int, list[int]] = {}
    windowed: list[int] = []
    for i, n in enumerate(context_lens.tolist()):
        padded = max(1, -(-n // granule)) * granule
        if span is not None and padded > span * block_size and n > (span - 1) * block_size:
            windowed.append(i)  # (its span starts at a block >= 0)
        else:
            groups.setdefault(padded, []).append(i)
    plan = []
    if windowed:
        rows = torch.tensor(windowed, device=block_tables.device)
        ctx = context_lens[rows].long()
        assert span is not None
        first = torch.div(ctx - 1, block_size, rounding_mode="floor") - (span - 1)
        cols = first[:, None] + torch.arange(span, device=first.device)[None, :]
        tables = torch.gather(block_tables[rows].long(), 1, cols)
        plan.append(_DecodeGroup(None if len(windowed) == len(context_lens) else rows, tables,
                                 ctx, span * block_size, block_size, sliding_window, first))
    for padded, idx in groups.items():
        if len(idx) == len(context_lens):
            return [_DecodeGroup(None, block_tables, context_lens, padded, block_size,
                                 sliding_window)]
        rows = torch.tensor(idx, device=block_tables.device)
        plan.append(_DecodeGroup(rows, block_tables[rows], context_lens[rows], padded, block_size,
                                 sliding_window))
    return plan


def _decode_granule(block_size: int) -> int:
    return max(64, block_size)


def _window_span(sliding_window: int | None, block_size: int) -> int | None:
    """Blocks a window of ``sliding_window`` keys can touch (its first and last partly)."""
    if sliding_window is None:
        return None
    return (sliding_window - 1) // block_size + 2


def _decode_group(
    query: Tensor,  # [b, num_heads, head_dim]
    kv_cache: Tensor,  # [2, num_blocks, block_size, kv_heads, head_dim]
    group: _DecodeGroup,
    scale: float,
    soft_cap: float | None,
) -> Tensor:
    b, num_heads, head_dim = query.shape
    num_blocks, num_kv_heads = kv_cache.shape[1], kv_cache.shape[3]
    heads_per_kv = num_heads // num_kv_heads
    # A block is one row of [num_blocks, block_elems]: index_select copies whole rows, several
    # times faster than advanced indexing of the 5-D cache.
    shape = (b, group.length, num_kv_heads, head_dim)
    keys = torch.index_select(kv_cache[0].view(num_blocks, -1), 0, group.ids).view(shape)
    values = torch.index_select(kv_cache[1].view(num_blocks, -1), 0, group.ids).view(shape)
    keys, values = widen_kv(keys, query.dtype), widen_kv(values, query.dtype)
    q = query.view(b, num_kv_heads, heads_per_kv, head_dim)
    if soft_cap is not None or query.dtype != keys.dtype:
        # float32 math (no-op in float32): soft-capped scores, or a query of another dtype
        q, keys, values = q.float(), keys.float(), values.float()
    if soft_cap is None:
        # A KV head's query heads are a short query sequence with no causal mask: torch's
        # fused CPU kernel reads the strided keys and values in place. In a bf16/fp16 cache
        # it runs in that dtype, as prefill does: scores, maxima and sums accumulate in
        # float32 inside the kernel, the probabilities meet the values in the cache's dtype
        # (converting the gathered context to float32 first cost 3-4x the attention).
        out = F.scaled_dot_product_attention(
            q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=group.allowed[:, None],
            scale=scale,
        )
        if group.empty is not None:  # no key at all: zeros, as documented
            out[group.empty] = 0.0
    else:  # soft-capped scores (Gemma 2): no fused kernel takes them; all KV heads at once
        scores = torch.matmul(q, keys.permute(0, 2, 3, 1))  # [b, kv_heads, heads_per_kv, L]
        probs = _masked_softmax(scores, scale, soft_cap, group.allowed[:, None])
        out = torch.matmul(probs, values.transpose(1, 2))  # [b, kv_heads, heads_per_kv, hd]
        if group.empty is not None:
            out[group.empty] = 0.0
    return out.reshape(b, num_heads, head_dim).to(query.dtype)


def prefill_attention(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    context_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Tensor:
    """Causal attention of a varlen batch of query chunks over each sequence's paged cache.

    query: [T, num_heads, head_dim], the chunks of S sequences back to back;
    query_start_loc: [S + 1] int32 (chunk s is rows ``start[s]:start[s+1]``);
    context_lens: [S] int32, tokens in context after this chunk (cached prefix + chunk, all
    already stored). Chunk token i of sequence s sits at position
    ``context_lens[s] - q_len + i`` and attends to every position up to its own.
    Returns [T, num_heads, head_dim].
    """
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    for s, ctx in enumerate(lens):
        lo, hi = starts[s], starts[s + 1]
        if hi > lo:
            out[lo:hi] = _prefill_one(
                query[lo:hi], kv_cache, block_tables[s], ctx, scale, sliding_window, soft_cap
            )
    return out


def _prefill_one(
    q: Tensor,
    kv_cache: Tensor,
    block_table: Tensor,
    ctx: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> Tensor:
    q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    blocks = block_table[: -(-ctx // block_size)].long()
    keys = kv_cache[0][blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]  # [ctx, kv_heads, hd]
    values = kv_cache[1][blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
    keys, values = widen_kv(keys, q.dtype), widen_kv(values, q.dtype)
    qt, kt, vt = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)
    if soft_cap is None and q.dtype == keys.dtype:
        # 4-D operands (a batch of one): torch's fused CPU flash kernel takes only those;
        # 3-D ones fall to the unfused math path, 2-3x slower.
        qt, kt, vt = qt[None], kt[None], vt[None]
        if ctx == q_len and sliding_window is None:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
        else:  # a query always sees itself, so no row of the mask is empty
            q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            k_pos = torch.arange(ctx, device=q.device)[None, :]
            mask = _window_mask(q_pos, k_pos, torch.tensor(ctx), sliding_window)
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)
    # Each KV head's query heads as one row block: [kv_heads, group * q_len, hd] against
    # [kv_heads, hd, ctx], no repeated keys.
    group = num_heads // num_kv_heads
    qg = qt.reshape(num_kv_heads, group * q_len, head_dim).float()
    scores = torch.bmm(qg, kt.float().transpose(1, 2))  # [kv_heads, group * q_len, ctx]
    q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
    k_pos = torch.arange(ctx, device=q.device)[None, :]
    allowed = _window_mask(q_pos, k_pos, torch.tensor(ctx), sliding_window)  # [q_len, ctx]
    probs = _masked_softmax(scores.view(num_kv_heads, group, q_len, ctx), scale, soft_cap, allowed)
    out = torch.bmm(probs.view(num_kv_heads, group * q_len, ctx), vt.float())
    return out.view(num_heads, q_len, head_dim).transpose(0, 1).to(q.dtype)


# --------------------------------------------------------------------------- mixture of experts


def moe_route(
    router_logits: Tensor, top_k: int, renormalize: bool
) -> tuple[Tensor, Tensor]:
    """Softmax routing: router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64).

    Softmax in float32 over all experts, then the top-k; ``renormalize`` rescales the k
    weights to sum to one (Mixtral always, Qwen3-MoE under ``norm_topk_prob``).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_groups(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, list[int]]:
    """Rows of the routed (token, slot) pairs grouped by expert.

    topk_ids: [T, k]. Returns (order [T*k]: flat pair indices sorted by expert, stable;
    counts: pairs per expert). Pair ``p`` is token ``p // k``, slot ``p % k``.
    """
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, counts


def fused_moe(
    hidden: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    activation: str = "silu",
) -> Tensor:
    """Experts of a mixture-of-experts layer as grouped matmuls over the tokens routed to each.

    hidden: [T, H]; w13: [E, 2*I, H] ([gate | up] rows of each expert); w2: [E, H, I];
    topk_weights: [T, k] float32; topk_ids: [T, k]. Returns [T, H]: for each token the sum
    over its k experts of ``weight * w2 @ act(gate) * up``. Tokens are sorted by expert so
    each expert runs one matmul over its rows (no loop per token).
    """
    k = topk_ids.shape[1]
    act = gelu_tanh_and_mul if activation.startswith("gelu") else silu_and_mul
    order, counts = moe_groups(topk_ids, w13.shape[0])
    routed = hidden[order // k]  # [T * k, H], grouped by expert
    ys, start = [], 0
    for expert, n in enumerate(counts):
        if n:
            ys.append(act(routed[start : start + n] @ w13[expert].T) @ w2[expert].T)  # [n, H]
            start += n
    return moe_combine(torch.cat(ys), topk_weights, order).to(hidden.dtype)


def moe_combine(expert_out: Tensor, topk_weights: Tensor, order: Tensor) -> Tensor:
    """Each token's weighted sum of its k experts' outputs, float32 [T, H].

    expert_out: [T * k, H], the routed pairs in ``order`` (grouped by expert, as
    ``moe_groups`` sorts them); topk_weights: [T, k] float32. The pairs go back to token
    order and each token sums its k slots in slot order, as transformers' grouped experts
    do (no scatter-add: deterministic and independent of how the batch was grouped).
    """
    num_tokens, k = topk_weights.shape
    weighted = expert_out.float() * topk_weights.reshape(-1)[order, None]  # [T * k, H]
    pairs = torch.empty_like(weighted).index_copy_(0, order, weighted)  # token-major
    return pairs.view(num_tokens, k, -1).sum(dim=1)


# --------------------------------------------------------------------------- block copies


def gather_blocks(kv_caches: list[Tensor], block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """Pack blocks of every layer into one contiguous staging buffer.

    kv_caches: per layer [2, num_blocks, block_size, kv_heads, head_dim]; block_ids: [n] int64.
    Returns (or fills) out: [num_layers, 2, n, block_size, kv_heads, head_dim].
    """
    ids = block_ids.long()
    if out is None:
        shape = (len(kv_caches), 2, ids.numel(), *kv_caches[0].shape[2:])
        out = torch.empty(shape, dtype=kv_caches[0].dtype, device=kv_caches[0].device)
    for layer, cache in enumerate(kv_caches):
        torch.index_select(cache, 1, ids, out=out[layer])
    return out


def scatter_blocks(staging: Tensor, kv_caches: list[Tensor], block_ids: Tensor) -> None:
    """Unpack a staging buffer (see gather_blocks) into ``block_ids`` of every layer, in place."""
    ids = block_ids.long()
    if staging.dtype in FP8_KV_DTYPES:  # index_copy_ takes no fp8 on CPU: copy the bytes
        staging, kv_caches = staging.view(torch.uint8), [c.view(torch.uint8) for c in kv_caches]
    for layer, cache in enumerate(kv_caches):
        for kv in range(2):  # index_copy_ along dim 1 would touch the whole cache
            cache[kv].index_copy_(0, ids, staging[layer, kv])


def int4_weight_only_mm(
    x: Tensor, qdata: Tensor, scales: Tensor, zeros: Tensor, group_size: int
) -> Tensor:
    """Reference of ``kernels/int4_gemm.py``: x [M, K] @ W.T -> [M, N] in x's dtype, with
    ``W[n, k] = (q[n, k] - 8) * scales[n, k // G] + zeros[n, k // G]`` and qdata uint8
    [N, K // 2] holding column 2j in the low nibble, 2j + 1 in the high one."""
    n = qdata.shape[0]
    codes = torch.stack([qdata & 0x0F, qdata >> 4], dim=-1).reshape(n, -1).float()  # [N, K]
    k = codes.shape[1]
    w = (codes.view(n, k // group_size, group_size) - 8) * scales[..., None] + zeros[..., None]
    return (x.float() @ w.reshape(n, k).T).to(x.dtype)
