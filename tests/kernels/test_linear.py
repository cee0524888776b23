"""kernels.linear.Linear: the oneDNN-packed CPU projection equals F.linear to fp32 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels.linear import Linear, packed_linear_available


def _weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)


def test_packed_on_cpu_float32() -> None:
    w, _ = _weights(96, 64)
    assert packed_linear_available(w) == torch.backends.mkldnn.is_available()
    assert Linear(w).packed == packed_linear_available(w)
    assert not Linear(w.to(torch.bfloat16)).packed  # float32 only


@pytest.mark.parametrize("rows", [0, 1, 3, 17, 64, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_f_linear(rows: int, with_bias: bool) -> None:
    w, b = _weights(200, 72)
    bias = b if with_bias else None
    proj = Linear(w, bias)
    x = torch.randn(rows, 72)
    out = proj(x)
    assert out.shape == (rows, 200) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def test_strided_and_batched_inputs() -> None:
    w, _ = _weights(48, 32)
    proj = Linear(w)
    x = torch.randn(10, 64)[:, ::2]  # non-contiguous rows
    torch.testing.assert_close(proj(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 5, 32)
    torch.testing.assert_close(proj(x3), F.linear(x3, w), rtol=1e-5, atol=1e-5)


def test_packing_does_not_alias_the_weight() -> None:
    w, _ = _weights(16, 8)
    proj = Linear(w.clone())
    x = torch.randn(3, 8)
    before = proj(x)
    w.zero_()
    torch.testing.assert_close(proj(x), before)


def test_dense_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_CPU_LINEAR", "dense")
    w, _ = _weights(16, 8)
    proj = Linear(w)
    assert not proj.packed and proj.weight is w
    x = torch.randn(4, 8)
    assert torch.equal(proj(x), F.linear(x, w))


def test_bad_input_named() -> None:
    w, b = _weights(16, 8)
    with pytest.raises(ValueError, match="2-D"):
        Linear(w[0])
    with pytest.raises(ValueError, match="bias"):
        Linear(w, b[:3])
    proj = Linear(w)
    with pytest.raises(ValueError, match="8 input features"):
        proj(torch.randn(2, 9))
    if proj.packed:
        with pytest.raises(TypeError, match="dtype"):
            proj(torch.randn(2, 8, dtype=torch.float64))
