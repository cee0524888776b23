"""Mixture-of-experts experts as grouped GEMMs over the tokens routed to each expert.

Owns ``_moe_gate_up_kernel`` (gathered token rows x one expert's [gate | up] rows, then the
gated activation) and ``_moe_down_kernel`` (x the expert's down rows, times the routing
weight), and the launcher ``fused_moe`` with the signature of ``reference.fused_moe``.

The launcher sorts the routed (token, slot) pairs by expert and pads each expert's run to a
multiple of BLOCK_M (padding pairs are -1), so every row tile of a program belongs to one
expert: the kernels read that expert's weights once per tile and gather the token rows
(vLLM's ``moe_align_block_size`` idea). Each pair's weighted output lands in its own row;
the k rows of a token are summed at the end. Routing (softmax, top-k) stays in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    check_dtype,
    check_runnable,
    check_same_device,
    check_same_dtype,
    check_shape,
    require,
)
from splitserve.kernels.paged import tile_dot

Tensor = torch.Tensor

BLOCK_M = 16  # routed pairs per tile (one expert per tile)
BLOCK_N = 32
BLOCK_K = 32


@triton.jit
def _moe_gate_up_kernel(
    hidden_ptr,  # [T, H]
    w13_ptr,  # [E, 2 * I, H]
    pairs_ptr,  # [P_pad] int64 routed pair ids sorted by expert, -1 = padding
    tile_expert_ptr,  # [P_pad / BLOCK_M] int64 expert of each row tile
    act_ptr,  # [P_pad, I] gated activations, float32
    hidden_dim,
    inter_dim,
    top_k,
    stride_w13_e,
    stride_w13_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_GELU: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + rows)
    valid = pairs >= 0
    tokens = tl.where(valid, pairs // top_k, 0).to(tl.int64)
    expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter_dim
    w_base = w13_ptr + expert * stride_w13_e
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden_dim
        x = tl.load(hidden_ptr + tokens[:, None] * hidden_dim + ks[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)  # [M, K]
        w_off = cols[None, :].to(tl.int64) * stride_w13_n + ks[:, None]  # [K, N]
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(w_base + w_off, mask=w_mask, other=0.0)
        wu = tl.load(w_base + inter_dim * stride_w13_n + w_off, mask=w_mask, other=0.0)
        gate += tile_dot(x, wg, UPCAST_DOT, IEEE_DOT)
        up += tile_dot(x, wu, UPCAST_DOT, IEEE_DOT)
    if USE_GELU:  # tanh-GELU with tanh written through sigmoid
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * inner))
    else:
        act = gate * tl.sigmoid(gate)
    out = act_ptr + rows[:, None].to(tl.int64) * inter_dim + cols[None, :]
    tl.store(out, act * up, mask=col_ok[None, :])


@triton.jit
def _moe_down_kernel(
    act_ptr,  # [P_pad, I] float32
    w2_ptr,  # [E, H, I]
    pairs_ptr,  # [P_pad] int64, -1 = padding
    tile_expert_ptr,  # [P_pad / BLOCK_M] int64
    weights_ptr,  # [T * k] float32 routing weight of each pair
    out_ptr,  # [T * k, H] float32 weighted expert output of each pair
    hidden_dim,
    inter_dim,
    stride_w2_e,
    stride_w2_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + rows)
    valid = pairs >= 0
    expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden_dim
    w_base = w2_ptr + expert * stride_w2_e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter_dim
        a = tl.load(act_ptr + rows[:, None].to(tl.int64) * inter_dim + ks[None, :],
                    mask=k_ok[None, :], other=0.0)  # [M, K] float32
        w = tl.load(w_base + cols[None, :].to(tl.int64) * stride_w2_n + ks[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [K, N]
        acc += tile_dot(a, w, UPCAST_DOT, IEEE_DOT)
    weight = tl.load(weights_ptr + tl.where(valid, pairs, 0), mask=valid, other=0.0)
    out = out_ptr + tl.where(valid, pairs, 0)[:, None].to(tl.int64) * hidden_dim + cols[None, :]
    tl.store(out, acc * weight[:, None], mask=valid[:, None] & col_ok[None, :])


def align_pairs(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Routed pair ids sorted by expert, each expert's run padded to a multiple of
    ``block_m`` with -1, and the expert of every tile: ([P_pad] int64, [P_pad / block_m])."""
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    tiles = padded // block_m
    total = int(padded.sum())
    pairs = torch.full((total,), -1, dtype=torch.int64, device=flat.device)
    starts = torch.cumsum(padded, 0) - padded  # [E] first padded row of each expert
    sorted_experts = flat[order]
    rank = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    pairs[starts[sorted_experts] + rank] = order
    tile_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), tiles)
    return pairs, tile_expert


def fused_moe(
    hidden: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    activation: str = "silu",
) -> Tensor:
    """Triton twin of ``reference.fused_moe``: hidden [T, H], w13 [E, 2I, H], w2 [E, H, I],
    topk_weights [T, k] float32, topk_ids [T, k] -> [T, H]."""
    _check_inputs(hidden, w13, w2, topk_weights, topk_ids)
    num_tokens, hidden_dim = hidden.shape
    num_experts, inter_dim = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return hidden.new_zeros(hidden.shape)
    pairs, tile_expert = align_pairs(topk_ids, num_experts, BLOCK_M)
    hidden, w13, w2 = hidden.contiguous(), w13.contiguous(), w2.contiguous()
    act = torch.empty((pairs.numel(), inter_dim), dtype=torch.float32, device=hidden.device)
    per_pair = torch.zeros((num_tokens * top_k, hidden_dim), dtype=torch.float32, device=hidden.device)
    num_tiles = tile_expert.numel()
    # float32 products throughout: the routed rows are few per expert, so exactness (equal
    # to the reference on every backend) costs little here
    dots = dict(UPCAST_DOT=True, IEEE_DOT=True)
    _moe_gate_up_kernel[(num_tiles, triton.cdiv(inter_dim, BLOCK_N))](
        hidden, w13, pairs, tile_expert, act, hidden_dim, inter_dim, top_k,
        w13.stride(0), w13.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        USE_GELU=activation.startswith("gelu"), **dots,
    )
    _moe_down_kernel[(num_tiles, triton.cdiv(hidden_dim, BLOCK_N))](
        act, w2, pairs, tile_expert, topk_weights.float().contiguous().reshape(-1), per_pair,
        hidden_dim, inter_dim, w2.stride(0), w2.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **dots,
    )
    return per_pair.view(num_tokens, top_k, hidden_dim).sum(1).to(hidden.dtype)


def _check_inputs(
    hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor
) -> None:
    require(hidden.dim() == 2, f"hidden must be [T, H], got {tuple(hidden.shape)}")
    check_dtype("hidden", hidden, FLOAT_DTYPES)
    check_runnable("hidden", hidden)
    check_same_dtype(hidden=hidden, w13=w13, w2=w2)
    check_same_device(hidden=hidden, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    require(w13.dim() == 3 and w13.shape[1] % 2 == 0, f"w13 must be [E, 2*I, H], got {tuple(w13.shape)}")
    num_experts, inter2, hidden_dim = w13.shape
    check_shape("hidden", hidden, (None, hidden_dim))
    check_shape("w2", w2, (num_experts, hidden_dim, inter2 // 2))
    require(topk_ids.dim() == 2 and topk_ids.shape[0] == hidden.shape[0],
            f"topk_ids must be [T, k], got {tuple(topk_ids.shape)}")
    check_shape("topk_weights", topk_weights, tuple(topk_ids.shape))
    if topk_ids.numel():
        low, high = int(topk_ids.min()), int(topk_ids.max())
        require(0 <= low and high < num_experts,
                f"topk_ids must be in [0, {num_experts}), got [{low}, {high}]")
