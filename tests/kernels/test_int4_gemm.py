"""int4 weight-only GEMM (Triton) against ``reference.int4_weight_only_mm`` and against the
dequantized weight of ``kernels.quant.quantize_int4`` (interpreter on CPU: small shapes)."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import reference
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.int4_gemm import int4_weight_only_mm
from splitserve.kernels.quant import quantize_int4
from tests.kernels.cases import DEVICE

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("m,n,k,group", [(1, 32, 64, 32), (5, 48, 128, 64), (33, 80, 96, 32),
                                         (17, 16, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(m: int, n: int, k: int, group: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    qw = quantize_int4(w, group) if group in (32, 64, 128, 256) else None
    assert qw is not None
    x = torch.randn(m, k, generator=g).to(dtype)
    args = [t.to(DEVICE) for t in (qw.qdata, qw.scales, qw.zeros)]  # type: ignore[union-attr]
    got = int4_weight_only_mm(x.to(DEVICE), *args, group).cpu()
    want = reference.int4_weight_only_mm(x, qw.qdata, qw.scales, qw.zeros, group)  # type: ignore[arg-type]
    assert got.dtype == dtype and got.shape == (m, n)
    scale = float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)
    dense = (x.float() @ qw.dequantize(torch.float32).T).to(dtype)
    torch.testing.assert_close(want.float(), dense.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


def test_bad_shapes_refused() -> None:
    qw = quantize_int4(torch.randn(32, 64), 32)
    with pytest.raises(KernelInputError, match="qdata"):
        int4_weight_only_mm(torch.randn(2, 128), qw.qdata, qw.scales, qw.zeros, 32)
    with pytest.raises(KernelInputError, match="scales"):
        int4_weight_only_mm(torch.randn(2, 64), qw.qdata, qw.scales[:, :1], qw.zeros, 32)
