"""Quantized weights: their one in-memory form, round-to-nearest quantizers, dequantization.

Owns ``QuantizedWeight``, the form a loader hands to the model in place of a float tensor
when a weight is served from quantized values, and the formats it can hold:

- ``int4``: 4-bit codes ``q`` in [0, 15] in groups of ``group_size`` along K, one scale and
  one zero per group, ``w = (q - 8) * scale + zero`` (torch's packed int4 convention; GGUF
  Q4_0 / Q4_1 / Q4_K and RTN int4 map onto it exactly).
- ``int8``: signed 8-bit codes, one scale per group, ``w = q * scale``; a group of the whole
  row is per-channel int8 (RTN int8), a group of 32 is GGUF Q8_0 (and Q5_0: 5-bit codes are
  int8 codes), a group of 16 GGUF Q6_K; with a zero per group, ``w = q * scale + zero``,
  GGUF Q5_1 and Q5_K.

A ``QuantizedWeight`` is tensor-like: it has ``shape`` / ``dtype`` / ``device`` / ``to`` and
takes part in ``torch.cat`` along rows (fusing QKV or gate|up keeps it quantized) and in
``F.embedding`` (only the looked-up rows are dequantized), through ``__torch_function__``.
Any other torch function gets the dequantized float tensor (correct, with a warning once per
function), so model code written for float weights runs unchanged. ``kernels/linear.py``
turns one into a packed matmul. This module must not read files or know GGUF's block layout
(``roles/models/quantize.py`` does).

    qw = quantize_int4(w, group_size=32)    # w [N, K] float -> codes, scales, zeros
    w2 = qw.dequantize()                    # [N, K] in qw.dtype
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

KINDS = ("int4", "int8")
INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes torch's packed int4 matmul takes."""
INT4_ROW_MULTIPLE = 16
"""torch's int4 packing needs the output dimension to be a multiple of this: a weight whose N
is not one is packed with zero rows up to it, its extra outputs dropped (``kernels/linear.py``,
as the native kernel's packing pads; vLLM pads its vocabulary so)."""

_warned: set[str] = set()


@dataclass(eq=False)
class QuantizedWeight:
    """A [N, K] weight held as integer codes plus per-group scales (and zeros for int4)."""

    kind: str
    """``int4`` or ``int8``."""
    qdata: Tensor
    """int4: uint8 [N, K // 2], code of column 2j in the low nibble, 2j + 1 in the high one;
    int8: int8 [N, K]."""
    scales: Tensor
    """float32 [N, K // group_size]."""
    zeros: Tensor | None
    """int4: float32 [N, K // group_size] (``w = (q - 8) * scale + zero``); int8: None, or
    the same shape (``w = q * scale + zero``: GGUF Q5_1 / Q5_K)."""
    group_size: int
    """Columns sharing one scale (K for per-channel int8)."""
    dtype: torch.dtype = torch.float32
    """Float dtype the weight stands for (activations and dequantized values use it)."""
    source: str = "rtn"
    """Where the codes come from: a GGUF type name (``Q4_1``...) or ``rtn``."""
    act_bits: int = 16
    """Bits each row's activations are quantized to per group of 32 by the native CPU kernel
    (``native/quant_matmul.c``): 16 (the default), or 8 (``quantization="w4a8"``: byte dot
    products, as llama.cpp's Q4 x Q8 and Q8 x Q8)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"QuantizedWeight kind must be one of {KINDS}, got {self.kind!r}")
        n, k = self.shape
        if self.group_size < 1 or k % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide K={k}")
        if tuple(self.scales.shape) != (n, k // self.group_size):
            raise ValueError(f"scales shape {tuple(self.scales.shape)} != {(n, k // self.group_size)}")
        if self.zeros is None and self.kind == "int4":
            raise ValueError("int4 weights need zeros")
        if self.zeros is not None and tuple(self.zeros.shape) != tuple(self.scales.shape):
            raise ValueError(f"zeros shape {tuple(self.zeros.shape)} != {tuple(self.scales.shape)}")
        if self.act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 16 or 8, got {self.act_bits} for {self.kind}")

    # ------------------------------------------------------------------ tensor-like surface

    @property
    def shape(self) -> torch.Size:
        n, cols = self.qdata.shape
        return torch.Size((n, cols * 2 if self.kind == "int4" else cols))

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def nbytes(self) -> int:
        """Bytes held (codes + scales + zeros)."""
        parts = [self.qdata, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def dim(self) -> int:
        return 2

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def contiguous(self) -> QuantizedWeight:
        return self

    def to(self, *args: Any, **kwargs: Any) -> QuantizedWeight:
        """``to(device)`` moves the codes; ``to(dtype)`` changes the float dtype it stands for."""
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, str | torch.device):
                device = a
        out = self if dtype is None else replace(self, dtype=dtype)
        if device is not None and torch.device(device) != self.device:
            out = replace(
                out, qdata=self.qdata.to(device), scales=self.scales.to(device),
                zeros=None if self.zeros is None else self.zeros.to(device),
            )
        return out

    def rows(self, index: Tensor | slice) -> QuantizedWeight:
        """The weight restricted to some output rows (a slice or an index tensor)."""
        return replace(
            self, qdata=self.qdata[index], scales=self.scales[index],
            zeros=None if self.zeros is None else self.zeros[index],
        )

    def __getitem__(self, index: Tensor | slice) -> QuantizedWeight:
        return self.rows(index)

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight({self.kind}, shape={tuple(self.shape)}, group={self.group_size}, "
            f"source={self.source}, dtype={self.dtype})"
        )

    # ------------------------------------------------------------------ values

    def codes(self) -> Tensor:
        """Integer codes [N, K]: int4 as uint8 in [0, 15], int8 as int8."""
        if self.kind == "int8":
            return self.qdata
        low, high = self.qdata & 0x0F, self.qdata >> 4
        return torch.stack([low, high], dim=-1).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """[N, K] float weight (float32 arithmetic, then ``dtype`` or the weight's dtype)."""
        n, k = self.shape
        g = self.group_size
        q = self.codes().to(torch.float32).view(n, k // g, g)
        if self.kind == "int4":
            assert self.zeros is not None
            w = (q - 8.0) * self.scales[..., None] + self.zeros[..., None]
        else:
            w = q * self.scales[..., None]
            if self.zeros is not None:
                w = w + self.zeros[..., None]
        return w.reshape(n, k).to(dtype or self.dtype)

    # ------------------------------------------------------------------ torch functions

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Sequence[type], args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.cat:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            parts = list(args[0])
            if dim == 0 and all(isinstance(p, QuantizedWeight) for p in parts):
                joined = cat_rows(parts)
                if joined is not None:
                    return joined
        if func is F.embedding:
            ids, weight = args[0], args[1]
            if isinstance(weight, QuantizedWeight) and not isinstance(ids, QuantizedWeight):
                flat = ids.reshape(-1)
                return weight.rows(flat).dequantize().reshape(*ids.shape, weight.shape[1])
        name = getattr(func, "__name__", str(func))
        if name not in _warned:
            _warned.add(name)
            logger.warning("%s on a quantized weight: using its dequantized values", name)
        return func(*_dense(args), **_dense(kwargs))


def _dense(obj: Any) -> Any:
    if isinstance(obj, QuantizedWeight):
        return obj.dequantize()
    if isinstance(obj, list | tuple):
        return type(obj)(_dense(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _dense(v) for k, v in obj.items()}
    return obj


def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Row-wise concatenation of weights of one format (None when their formats differ)."""
    first = parts[0]
    same = all(
        p.kind == first.kind and p.group_size == first.group_size and p.dtype == first.dtype
        and p.shape[1] == first.shape[1] and p.device == first.device
        and p.act_bits == first.act_bits
        for p in parts
    )
    if not same:
        return None
    zeros = None  # int8 parts with and without zeros: the latter's are 0
    if any(p.zeros is not None for p in parts):
        zeros = torch.cat([p.zeros if p.zeros is not None else torch.zeros_like(p.scales)
                           for p in parts])
    sources = sorted({p.source for p in parts})
    return QuantizedWeight(
        first.kind, torch.cat([p.qdata for p in parts]), torch.cat([p.scales for p in parts]),
        zeros, first.group_size, first.dtype, "+".join(sources), first.act_bits,
    )


# --------------------------------------------------------------------------- construction


def pack_int4_codes(q: Tensor) -> Tensor:
    """uint8 codes [N, K] in [0, 15] -> [N, K // 2], column 2j low nibble, 2j + 1 high."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def quantize_int4(w: Tensor, group_size: int = 32, dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Round-to-nearest asymmetric int4: per group, ``scale = (max - min) / 15`` and codes
    ``round((w - min) / scale)``. ``w`` [N, K] with K divisible by ``group_size``."""
    n, k = w.shape
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"K={k} is not divisible by the int4 group size {group_size}")
    wf = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    lo, hi = wf.amin(-1), wf.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = ((wf - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).reshape(n, k)
    return QuantizedWeight(
        "int4", pack_int4_codes(q), scale, lo + 8 * scale, group_size, dtype or w.dtype, "rtn"
    )


def quantize_int8(w: Tensor, dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Round-to-nearest symmetric int8 per output channel: ``scale = max|w| / 127``."""
    n, k = w.shape
    wf = w.detach().to(torch.float32)
    scale = (wf.abs().amax(1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = (wf / scale).round_().clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q, scale, None, k, dtype or w.dtype, "rtn")


def int4_packable(shape: Sequence[int], group_size: int) -> str | None:
    """Why the packed int4 matmuls cannot take a [N, K] weight (None when they can): K must
    split into whole groups; any N is taken (padded to ``INT4_ROW_MULTIPLE`` rows)."""
    n, k = shape
    if group_size not in INT4_GROUP_SIZES:
        return f"group size {group_size} is not one of {INT4_GROUP_SIZES}"
    if n < 1:
        return f"N={n}: no output row"
    if k % group_size:
        return f"K={k} is not divisible by the group size {group_size}"
    return None


def pad_rows(qw: QuantizedWeight, multiple: int) -> QuantizedWeight:
    """``qw`` with zero rows (codes, scales and zeros 0: weights 0) appended up to a multiple
    of ``multiple`` output rows; itself when it has one."""
    n = qw.shape[0]
    extra = -(-n // multiple) * multiple - n
    if extra == 0:
        return qw

    def pad(t: Tensor) -> Tensor:
        return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])

    return replace(qw, qdata=pad(qw.qdata), scales=pad(qw.scales),
                   zeros=None if qw.zeros is None else pad(qw.zeros))
