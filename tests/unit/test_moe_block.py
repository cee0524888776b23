"""The MoE block's two CPU paths: small float experts at few tokens run dense (every expert
over every token, each token's k picked), the rest grouped by expert; both give the same
result, and the dense path is taken only where it is meant to be."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from splitserve.kernels import cpu_ops
from splitserve.kernels.quant import quantize_int8
from splitserve.roles.models import blocks
from splitserve.roles.models.blocks import MoE


def _moe(experts: int, hidden: int, inter: int, k: int, renormalize: bool, act: str = "silu",
         quantized: bool = False) -> MoE:
    g = torch.Generator().manual_seed(experts + hidden)
    cfg = SimpleNamespace(num_experts_per_tok=k, hidden_act=act)
    router = torch.randn(experts, hidden, generator=g)
    weights = []
    for _ in range(experts):
        gate, up = (torch.randn(inter, hidden, generator=g) / hidden**0.5 for _ in range(2))
        down = torch.randn(hidden, inter, generator=g) / inter**0.5
        if quantized:
            gate, up, down = (quantize_int8(w) for w in (gate, up, down))  # type: ignore[assignment]
        weights.append((gate, up, down))
    return MoE(cfg, router, weights, cpu_ops, renormalize)  # type: ignore[arg-type]


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_dense_and_grouped_paths_agree(renormalize: bool, act: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    moe = _moe(experts=8, hidden=64, inter=48, k=2, renormalize=renormalize, act=act)
    assert moe.dense is not None
    for tokens in (1, 5, 16, 64):
        x = torch.randn(tokens, 64)
        monkeypatch.setattr(blocks, "_DENSE_MOE_ROWS", 64)
        monkeypatch.setattr(MoE, "_grouped", lambda *a: pytest.fail("grouped path taken"))
        dense = moe(x)
        monkeypatch.undo()
        monkeypatch.setattr(blocks, "_DENSE_MOE_ROWS", 0)
        monkeypatch.setattr(MoE, "_dense", lambda *a: pytest.fail("dense path taken"))
        grouped = moe(x)
        monkeypatch.undo()
        assert dense.shape == grouped.shape == (tokens, 64)
        torch.testing.assert_close(dense, grouped, rtol=1e-5, atol=1e-5)


def test_many_tokens_large_or_quantized_experts_stay_grouped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = _moe(experts=4, hidden=64, inter=128, k=2, renormalize=True)
    monkeypatch.setattr(MoE, "_dense", lambda *a: pytest.fail("dense path taken"))
    assert small(torch.randn(65, 64)).shape == (65, 64)  # past _DENSE_MOE_ROWS
    # 8 experts x 3 x 1024 x 384 float32 = 37.7 MB: past _DENSE_MOE_BYTES
    assert _moe(experts=8, hidden=1024, inter=384, k=2, renormalize=True).dense is None
    quantized = _moe(experts=4, hidden=64, inter=128, k=2, renormalize=True, quantized=True)
    assert quantized.dense is None and quantized(torch.randn(3, 64)).shape == (3, 64)
