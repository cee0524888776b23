"""RMSNorm, SiLU-and-mul and rotary embedding (Triton) against their references."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import reference
from splitserve.kernels.activation import gelu_tanh_and_mul, silu_and_mul
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.rms_norm import rms_norm
from splitserve.kernels.rotary import rotary_embedding
from tests.kernels.cases import DEVICE, DTYPES, assert_close, generator, randn

Tensor = torch.Tensor

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _size_params(small: list[tuple], full: list[tuple]) -> list:
    """Small cases for every device, full-size ones marked ``gpu``, each crossed with dtypes."""
    cases = []
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        cases += [pytest.param(dtype, *c, id=f"{name}-{c}") for c in small]
        cases += [
            pytest.param(dtype, *c, id=f"full-{name}-{c}", marks=pytest.mark.gpu) for c in full
        ]
    return cases


# --------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize(
    "dtype,num_rows,hidden,use_residual",
    _size_params(
        [(1, 64, False), (7, 200, True), (0, 64, True)],
        [(4099, 4096, True), (333, 8192, False), (1, 576, True)],
    ),
)
def test_rms_norm(dtype: torch.dtype, num_rows: int, hidden: int, use_residual: bool) -> None:
    x = randn((num_rows, hidden), dtype, seed=hidden)
    weight = randn((hidden,), dtype, seed=1) * 0.5 + 1.0
    residual = randn((num_rows, hidden), dtype, seed=2) if use_residual else None
    x_before = x.clone()
    out, new_residual = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_residual = reference.rms_norm(x, weight, 1e-6, residual)
    assert_close(out, ref_out)
    assert torch.equal(x, x_before), "x must not be written"
    if use_residual:
        assert torch.equal(new_residual, ref_residual), "the residual sum is exact"
    else:
        assert new_residual is None


def test_rms_norm_rejects_bad_input() -> None:
    x = randn((3, 64), torch.float32, seed=0)
    weight = torch.ones(64, device=DEVICE)
    with pytest.raises(KernelInputError, match="dtypes must match"):
        rms_norm(x, weight.half(), 1e-6)
    with pytest.raises(KernelInputError, match="weight must have shape"):
        rms_norm(x, weight[:32], 1e-6)
    with pytest.raises(KernelInputError, match="residual must have shape"):
        rms_norm(x, weight, 1e-6, x[:2])
    with pytest.raises(KernelInputError, match="contiguous in its last dim"):
        rms_norm(x.t().contiguous().t(), weight, 1e-6)
    with pytest.raises(KernelInputError, match=r"x must be \[T, H\]"):
        rms_norm(x[None], weight, 1e-6)


# --------------------------------------------------------------------------- silu_and_mul


@pytest.mark.parametrize(
    "dtype,num_rows,intermediate", _size_params([(1, 64), (5, 1536), (0, 8)], [(4097, 14336)])
)
def test_silu_and_mul(dtype: torch.dtype, num_rows: int, intermediate: int) -> None:
    x = randn((num_rows, 2 * intermediate), dtype, seed=intermediate) * 3
    assert_close(silu_and_mul(x), reference.silu_and_mul(x))


@pytest.mark.parametrize(
    "dtype,num_rows,intermediate", _size_params([(1, 64), (5, 1536), (0, 8)], [(4097, 14336)])
)
def test_gelu_tanh_and_mul(dtype: torch.dtype, num_rows: int, intermediate: int) -> None:
    x = randn((num_rows, 2 * intermediate), dtype, seed=intermediate) * 3
    out = gelu_tanh_and_mul(x)
    assert_close(out, reference.gelu_tanh_and_mul(x))
    if num_rows and dtype == torch.float32:  # the GELU, not the SiLU, was applied
        assert not torch.allclose(out, reference.silu_and_mul(x), atol=1e-3)


def test_silu_and_mul_on_a_row_strided_view() -> None:
    x = randn((4, 300), torch.float32, seed=0)[:, :200]
    assert_close(silu_and_mul(x), reference.silu_and_mul(x))


def test_silu_and_mul_rejects_bad_input() -> None:
    with pytest.raises(KernelInputError, match="must be even"):
        silu_and_mul(randn((2, 7), torch.float32, seed=0))
    with pytest.raises(KernelInputError, match="contiguous in its last dim"):
        silu_and_mul(randn((2, 16), torch.float32, seed=0)[:, ::2])
    with pytest.raises(KernelInputError, match="must have dtype"):
        silu_and_mul(torch.ones((2, 8), dtype=torch.float64, device=DEVICE))


# --------------------------------------------------------------------------- rotary embedding


@pytest.mark.parametrize(
    "dtype,num_tokens,head_dim,ratio,rotary_dim,scaling",
    _size_params(
        [(1, 64, 1, 64, None), (9, 128, 3, 128, LLAMA3_SCALING), (5, 64, 8, 32, None)],
        [(4097, 128, 4, 128, LLAMA3_SCALING), (333, 64, 8, 64, None)],
    ),
)
def test_rotary_embedding(
    dtype: torch.dtype,
    num_tokens: int,
    head_dim: int,
    ratio: int,
    rotary_dim: int,
    scaling: dict | None,
) -> None:
    max_position = 8192
    table = reference.rope_cos_sin_cache(head_dim, max_position, 500000.0, scaling, rotary_dim)
    table = table.to(DEVICE)
    positions = torch.randint(0, max_position, (num_tokens,), generator=generator(1)).to(DEVICE)
    query = randn((num_tokens, 2 * ratio, head_dim), dtype, seed=2)
    key = randn((num_tokens, 2, head_dim), dtype, seed=3)
    q, k = rotary_embedding(positions, query, key, table)
    ref_q, ref_k = reference.rotary_embedding(positions, query, key, table)
    assert_close(q, ref_q)
    assert_close(k, ref_k)
    if rotary_dim < head_dim:
        assert torch.equal(q[..., rotary_dim:], query[..., rotary_dim:])


def test_rotary_on_views_of_fused_qkv() -> None:
    table = reference.rope_cos_sin_cache(64, 100, 10000.0).to(DEVICE)
    qkv = randn((6, (4 + 2 + 2) * 64), torch.float32, seed=0)
    query, key = qkv[:, : 4 * 64].view(6, 4, 64), qkv[:, 4 * 64 : 6 * 64].view(6, 2, 64)
    positions = torch.arange(6, device=DEVICE, dtype=torch.int32) * 7
    q, k = rotary_embedding(positions, query, key, table)
    ref_q, ref_k = reference.rotary_embedding(positions.long(), query, key, table)
    assert_close(q, ref_q)
    assert_close(k, ref_k)


def test_rotary_rejects_bad_input() -> None:
    table = reference.rope_cos_sin_cache(64, 16, 10000.0).to(DEVICE)
    query = randn((2, 4, 64), torch.float32, seed=0)
    key = randn((2, 2, 64), torch.float32, seed=1)
    positions = torch.tensor([0, 16], device=DEVICE)
    with pytest.raises(KernelInputError, match="positions holds 16"):
        rotary_embedding(positions, query, key, table)
    with pytest.raises(KernelInputError, match="cos_sin_cache must have dtype"):
        rotary_embedding(positions - 1, query, key, table.double())
    with pytest.raises(KernelInputError, match="dtypes must match"):
        rotary_embedding(positions - 1, query, key.half(), table)
    with pytest.raises(KernelInputError, match="rotary_dim"):
        rotary_embedding(positions - 1, query[..., :16], key[..., :16], table)
