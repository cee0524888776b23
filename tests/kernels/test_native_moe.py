"""native.moe_silu (the CPU backend's mixture-of-experts experts in one C call) equals
reference.fused_moe, gives a token the same bits whatever its batch, and refuses a bad
expert id by name; the MoE block takes it only where it applies."""

from __future__ import annotations

import types

import pytest
import torch

from splitserve.kernels import cpu_ops, native, reference
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.quant import quantize_int8


def _case(tokens: int, hidden: int, inter: int, experts: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    logits = torch.randn(tokens, experts, generator=g)
    weights, ids = reference.moe_route(logits, k, renormalize=seed % 2 == 0)
    return x, w13, w2, weights, ids


def _stacked(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inter = w13.shape[1] // 2
    return native.pack_moe_experts([(w[:inter], w[inter:], d) for w, d in zip(w13, w2, strict=True)])


@pytest.fixture(autouse=True)
def _built() -> None:
    assert native.status().available, native.status().reason  # the suite installs gcc


@pytest.mark.parametrize("tokens,hidden,inter,experts,k", [
    (1, 32, 48, 4, 2), (37, 40, 24, 8, 2), (19, 64, 32, 6, 3), (5, 16, 16, 1, 1),
    (300, 64, 48, 8, 2),  # enough multiply-adds for the thread team
    (3, 20, 5, 3, 2),  # widths below one 16-float vector: the scalar tail only
])
def test_equals_the_reference(tokens, hidden, inter, experts, k) -> None:
    x, w13, w2, weights, ids = _case(tokens, hidden, inter, experts, k, seed=tokens)
    before = native.calls["moe_silu_f32"]
    got = native.moe_silu(x, *_stacked(w13, w2), weights, ids, inter)
    assert native.calls["moe_silu_f32"] == before + 1
    want = reference.fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_a_tokens_bits_do_not_depend_on_its_batch() -> None:
    """Each routed pair runs the same multiply-add chains whoever shares its expert's tile,
    and a token sums its slots in slot order: alone, in any batch, on 1 or 2 threads."""
    x, w13, w2, weights, ids = _case(130, 64, 48, 8, 2, seed=3)
    w13t, w2t = _stacked(w13, w2)
    whole = native.moe_silu(x, w13t, w2t, weights, ids, 48)
    for size in (1, 2, 5, 17, 64):
        for start in (0, 7, 130 - size):
            sl = slice(start, start + size)
            assert torch.equal(native.moe_silu(x[sl], w13t, w2t, weights[sl], ids[sl], 48),
                               whole[sl]), (size, start)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.moe_silu(x, w13t, w2t, weights, ids, 48), whole)
    finally:
        torch.set_num_threads(threads)


def test_bad_input_is_named() -> None:
    x, w13, w2, weights, ids = _case(4, 16, 8, 4, 2, seed=1)
    w13t, w2t = _stacked(w13, w2)
    bad = ids.clone()
    bad[2, 1] = 4
    with pytest.raises(KernelInputError, match=r"ids\[2, 1\] = 4 is not an expert \(num_experts = 4\)"):
        native.moe_silu(x, w13t, w2t, weights, bad, 8)
    bad[2, 1] = -1
    with pytest.raises(KernelInputError, match=r"ids\[2, 1\] = -1"):
        native.moe_silu(x, w13t, w2t, weights, bad, 8)
    with pytest.raises(KernelInputError, match="packed w13"):
        native.moe_silu(x, w13t[:, :-6], w2t, weights, ids, 8)
    with pytest.raises(KernelInputError, match="weights and ids"):
        native.moe_silu(x, w13t, w2t, weights[:3], ids, 8)


def test_the_moe_block_takes_it_only_where_it_applies() -> None:
    from splitserve.roles.models.blocks import MoE

    x, w13, w2, weights, ids = _case(6, 32, 16, 4, 2, seed=5)
    experts = [(w13[e, :16], w13[e, 16:], w2[e]) for e in range(4)]
    router = torch.randn(4, 32)
    cfg = types.SimpleNamespace(num_experts_per_tok=2, hidden_act="silu")
    block = MoE(cfg, router, experts, cpu_ops, renormalize=True)  # type: ignore[arg-type]
    grouped = MoE(cfg, router, experts, reference, renormalize=True)  # type: ignore[arg-type]
    assert block.native and not grouped.native and not block.experts
    before = native.calls["moe_silu_f32"]
    torch.testing.assert_close(block(x), grouped(x), rtol=1e-5, atol=1e-5)
    assert native.calls["moe_silu_f32"] == before + 1
    gelu = types.SimpleNamespace(num_experts_per_tok=2, hidden_act="gelu_pytorch_tanh")
    assert not MoE(gelu, router, experts, cpu_ops, renormalize=True).native  # type: ignore[arg-type]
    int8 = [(quantize_int8(g), quantize_int8(u), quantize_int8(d)) for g, u, d in experts]
    assert not MoE(cfg, router, int8, cpu_ops, renormalize=True).native  # type: ignore[arg-type]
    bf16 = [tuple(t.to(torch.bfloat16) for t in ex) for ex in experts]
    assert not MoE(cfg, router.to(torch.bfloat16), bf16, cpu_ops, renormalize=True).native  # type: ignore[arg-type]
