"""int4 weight-only GEMM (MARLIN-style: 4-bit weights dequantized in registers, float math).

Owns ``_int4_gemm_kernel`` (one program per [BLOCK_M, BLOCK_N] output tile, looping over K:
load the activation tile, load the packed codes of the weight tile, unpack each column's
nibble, apply its group's scale and zero, ``tl.dot`` in float32) and its typed launcher. Same
contract as ``reference.int4_weight_only_mm``: ``y = x @ W.T`` with
``W[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G]``, codes packed two per byte
(column 2j low nibble, 2j + 1 high) as ``kernels.quant.QuantizedWeight`` holds them. It
reads the weight at half a byte per value; nothing is expanded in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import require

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _int4_gemm_kernel(
    x_ptr,  # [M, K] float
    q_ptr,  # [N, K // 2] uint8, two codes per byte
    scale_ptr,  # [N, K // G] float32
    zero_ptr,  # [N, K // G] float32
    y_ptr,  # [M, N] float, x's dtype
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_ym,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=(rows < M)[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & (cols < N)[None, :]  # [BLOCK_K, BLOCK_N]
        packed = tl.load(q_ptr + cols[None, :] * stride_qn + (ks // 2)[:, None], mask=wmask,
                         other=0)
        codes = (packed >> ((ks % 2) * 4)[:, None].to(tl.uint8)) & 0x0F
        group = (ks // GROUP)[:, None]
        scale = tl.load(scale_ptr + cols[None, :] * stride_sn + group, mask=wmask, other=0.0)
        zero = tl.load(zero_ptr + cols[None, :] * stride_sn + group, mask=wmask, other=0.0)
        w = (codes.to(tl.float32) - 8.0) * scale + zero  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
    ymask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=ymask)


def int4_weight_only_mm(
    x: Tensor, qdata: Tensor, scales: Tensor, zeros: Tensor, group_size: int
) -> Tensor:
    """x [M, K] float -> [M, N] in x's dtype; see the module doc for the weight layout."""
    require(x.dim() == 2 and x.dtype in FLOAT_DTYPES, f"x must be 2-D float, got {x.dtype}")
    m, k = x.shape
    n = qdata.shape[0]
    require(qdata.dtype == torch.uint8 and tuple(qdata.shape) == (n, k // 2),
            f"qdata must be uint8 [{n}, {k // 2}], got {qdata.dtype} {tuple(qdata.shape)}")
    require(k % group_size == 0 and group_size % 2 == 0, f"group {group_size} must divide K={k}")
    want = (n, k // group_size)
    require(tuple(scales.shape) == want and tuple(zeros.shape) == want,
            f"scales and zeros must be {want}")
    require(scales.dtype == torch.float32 and zeros.dtype == torch.float32,
            "scales and zeros must be float32")
    x, qdata = x.contiguous(), qdata.contiguous()
    scales, zeros = scales.contiguous(), zeros.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32
    block_n, block_k = 32, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm_kernel[grid](
        x, qdata, scales, zeros, y, m, n, k, x.stride(0), qdata.stride(0), scales.stride(0),
        y.stride(0), GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y
