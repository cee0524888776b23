"""Gated activations: SiLU-and-mul (SwiGLU) and tanh-GELU-and-mul (GeGLU) for x = [gate | up].

Owns ``_gated_act_kernel`` (one program per row and chunk of the intermediate size; the
activation is a ``USE_GELU`` switch) and its typed launchers. Same rounding as
``reference.silu_and_mul`` / ``reference.gelu_tanh_and_mul``: the activation is computed in
float32 and rounded to the input dtype before the multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    check_dtype,
    check_runnable,
    emulate_rtne,
    next_power_of_2,
    require,
)
from splitserve.kernels.rounding import downcast

Tensor = torch.Tensor

MAX_BLOCK = 1024  # intermediate elements per program


@triton.jit
def _gated_act_kernel(
    x_ptr,  # [T, 2 * I]
    out_ptr,  # [T, I]
    stride_x,
    intermediate,
    BLOCK: tl.constexpr,
    USE_GELU: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0)
    if USE_GELU:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh through sigmoid
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * inner))
    else:
        act = gate * tl.sigmoid(gate)
    act = downcast(act, out_ptr.dtype.element_ty, EMULATE_RTNE)
    act = act.to(tl.float32)
    out = act * up.to(tl.float32)
    tl.store(
        out_ptr + row * intermediate + cols,
        downcast(out, out_ptr.dtype.element_ty, EMULATE_RTNE),
        mask=mask,
    )


def silu_and_mul(x: Tensor) -> Tensor:
    """Triton twin of ``reference.silu_and_mul``: x [T, 2*I] -> [T, I]."""
    return _gated_act(x, use_gelu=False)


def gelu_tanh_and_mul(x: Tensor) -> Tensor:
    """Triton twin of ``reference.gelu_tanh_and_mul``: x [T, 2*I] -> [T, I]."""
    return _gated_act(x, use_gelu=True)


def _gated_act(x: Tensor, use_gelu: bool) -> Tensor:
    require(x.dim() == 2, f"x must be [T, 2*I], got {tuple(x.shape)}")
    require(x.shape[1] % 2 == 0, f"x's last dim must be even ([gate | up]), got {x.shape[1]}")
    check_dtype("x", x, FLOAT_DTYPES)
    check_runnable("x", x)
    require(x.shape[1] <= 1 or x.stride(1) == 1, "x must be contiguous in its last dim")
    num_rows, intermediate = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_rows, intermediate), dtype=x.dtype, device=x.device)
    if num_rows == 0 or intermediate == 0:
        return out
    block = min(MAX_BLOCK, next_power_of_2(intermediate))
    _gated_act_kernel[(num_rows, triton.cdiv(intermediate, block))](
        x,
        out,
        x.stride(0),
        intermediate,
        BLOCK=block,
        USE_GELU=use_gelu,
        EMULATE_RTNE=emulate_rtne(x.dtype),
        num_warps=4,
    )
    return out
