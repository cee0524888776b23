"""kernels.fused_moe equals reference.fused_moe (interpreted on CPU at tiny sizes, native on a
GPU), and the grouping it relies on puts every routed pair in exactly one expert tile."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import reference
from splitserve.kernels.fused_moe import BLOCK_M, align_pairs, fused_moe
from tests.kernels.cases import DEVICE, assert_close, randn


def _case(tokens: int, hidden: int, inter: int, experts: int, k: int, dtype: torch.dtype, seed: int):
    x = randn((tokens, hidden), dtype, seed)
    w13 = randn((experts, 2 * inter, hidden), dtype, seed + 1) * hidden**-0.5
    w2 = randn((experts, hidden, inter), dtype, seed + 2) * inter**-0.5
    logits = randn((tokens, experts), torch.float32, seed + 3)
    weights, ids = reference.moe_route(logits, k, renormalize=seed % 2 == 0)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize(
    "tokens,hidden,inter,experts,k,activation",
    [(1, 32, 48, 4, 2, "silu"), (37, 40, 24, 8, 2, "silu"), (19, 64, 32, 6, 3, "gelu_pytorch_tanh"),
     (5, 16, 16, 1, 1, "silu")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_equals_reference(tokens, hidden, inter, experts, k, activation, dtype) -> None:
    x, w13, w2, weights, ids = _case(tokens, hidden, inter, experts, k, dtype, seed=tokens)
    got = fused_moe(x, w13, w2, weights, ids, activation)
    want = reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids, activation)
    assert_close(got, want.to(dtype))


def test_reference_equals_a_loop_over_tokens() -> None:
    """The grouped reference is the per-token definition: sum_k w_k * expert_k(x)."""
    x, w13, w2, weights, ids = _case(9, 16, 8, 4, 2, torch.float32, seed=2)
    want = torch.zeros_like(x)
    for t in range(9):
        for j in range(2):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            want[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(h[:8]) * h[8:]))
    torch.testing.assert_close(reference.fused_moe(x, w13, w2, weights, ids), want)


def test_align_pairs_puts_each_pair_in_one_tile_of_its_expert() -> None:
    ids = torch.tensor([[3, 0], [0, 1], [3, 3], [1, 0]], device=DEVICE)
    pairs, tile_expert = align_pairs(ids, 5, BLOCK_M)
    assert pairs.numel() == BLOCK_M * tile_expert.numel()
    assert tile_expert.tolist() == [0, 1, 3]  # experts with pairs only, one tile each here
    real = pairs[pairs >= 0]
    assert sorted(real.tolist()) == list(range(8))
    tiles = pairs.view(-1, BLOCK_M)
    for tile, expert in zip(tiles, tile_expert.tolist(), strict=True):
        for p in tile[tile >= 0].tolist():
            assert int(ids.view(-1)[p]) == expert


def test_fused_moe_rejects_bad_input() -> None:
    x, w13, w2, weights, ids = _case(4, 16, 8, 4, 2, torch.float32, seed=1)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, w13, w2, weights, ids + 4)
    with pytest.raises(ValueError, match="w2"):
        fused_moe(x, w13, w2[:, :, :4], weights, ids)
