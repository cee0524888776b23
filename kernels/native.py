"""CPU kernels in C, built at first use with the host compiler and called through ctypes.

- ``paged_decode_attention`` (``native/decode_attention.c``) reads each sequence's keys and
  values in place from the paged cache. The pure-torch reference gathers every sequence's
  blocks into a padded copy and hands it to torch's fused SDPA, whose CPU kernel is built for
  long queries: with one query token per sequence it spent ~50 us per (sequence, layer), and
  the gather itself wrote and read the whole context once more. At 64 sequences of ~450
  tokens (SmolLM2, bf16) the reference took ~135 ms of a ~310 ms decode step. The kernel
  checks the block ids it will read itself (a few integer compares), so no per-layer check
  runs in Python.
- ``linear_f32`` (``native/linear.c``): projections through float32 weights (at most
  ``linear_max()`` values: 2^24 in an AVX-512 build, 2^18 in an AVX2 one; the weight packed
  once by ``pack_linear_weight``, the next block prefetched while one is computed). oneDNN's inner product costs
  ~15-25 us a call whatever its size, most of a decode step of a model a few thousand values
  wide (1.5-3x at 16 rows of a 64 x 256 weight here); at 2,048 rows it runs at 0.9-1.0x oneDNN. Each
  output is one multiply-add chain over k in order, so a row's bits never depend on the row
  count (torch's GEMMs pick their code by it), the thread, or the tiling.
- ``moe_silu_f32`` (``native/linear.c``): a SiLU-gated mixture-of-experts layer's experts
  (Qwen3-MoE, Mixtral) in one call: the routed (token, slot) pairs grouped by expert, each
  expert's gate|up and down through the same tiles as ``linear_f32``, each token's slots
  summed in slot order. The grouped torch path ran ~25 ops a layer (sort, gathers, a loop
  over experts, index_copy), ~400 us at 16 tokens of a 4-expert test model.
- ``paged_prefill_attention`` (``native/decode_attention.c``): a prompt chunk's causal
  attention with each query row run as a decode row of its own (its context: the positions
  up to its own, or its window), for sequences whose span (context, or window when shorter)
  is at most ``PREFILL_NATIVE_MAX_SPAN`` tokens (tiles of 16 rows of a sequence share each
  block's key and value reads); longer ones take the reference's fused SDPA, which wins from
  ~1,000 tokens on. Windowed layers were the reference's worst case:
  it builds a mask and computes every score of the chunk (16 x 128 tokens, window 24:
  5.2 ms -> 1.2 ms a layer here).
- ``rms_norm`` (residual add fused) and ``rotary_store_kv`` (q/k RMSNorm when the model has
  it, rotary embedding, the K/V store into the paged cache) (``native/layer_ops.c``): the
  small per-layer ops, one call each instead of a chain of torch ops. At decode sizes every
  torch op costs its dispatch and allocation whatever its size: a layer of a 4-layer test
  model spent ~1.1 ms in ~40 ops at 16 sequences, and the references' rotary, store and
  norms were ~450 us of it.
- ``silu_and_mul`` / ``gelu_tanh_and_mul`` (``act_and_mul`` in ``native/layer_ops.c``): a
  gated MLP's activation times its up half in one pass over float32, every size (so a row's
  bits never depend on its batch): torch ran two ops and wrote the intermediate.

- ``int4_matmul`` / ``int8_matmul`` / ``quant_matmul`` (``native/quant_matmul.c``): int4
  and int8 projections by integer dot products against each row's activations quantized to
  16 bits per group of 32 (8 bits with ``ACT8``: ``quantization="w4a8"``;
  exact int32 group sums, so every row count, thread and build gives a row the same bits),
  optionally computing their input in the same call (RMSNorm with its
  residual add; a gated activation). torch's int4 kernel ran 1.5-2.7x slower at one row and
  ~2x from 64 rows on here.
- ``decode_layer`` (``native/quant_matmul.c``): a pre-norm layer's decode step with
  quantized projections in one call (the kernels above in the layer's order): a small
  model's layer is ~100 us of kernels at one row, and its ~6 separate calls cost ~10 us of
  Python each. SmolLM2 Q4_1 single stream: ~125 -> ~170-190 tok/s.

Build: ``$CC`` (else ``cc``) with ``-O3 -march=native -fno-trapping-math -fopenmp -shared`` (with GCC
``--param=avoid-fma-max-bits=0``: ``GCC_FLAGS``; plus
``SPLITSERVE_NATIVE_CFLAGS``; ``decode_attention.c`` turns GCC's RTL global CSE off for itself,
~19 s for the whole build instead of ~50 on a Zen 3), into
``<cache>/native/<key>/`` (``SPLITSERVE_CACHE_DIR``; the key hashes the sources, the flags,
the compiler's version and the processor's flags, so a machine of another kind builds its
own). Written to a temporary name and renamed, so processes that build at once never load a
partial file. The library is linked against ``libgomp.so.1``, which resolves to the copy torch
already loaded: the kernel runs on torch's thread team.

KV caches: float32, bfloat16, or fp8 (``float8_e4m3fn`` / ``float8_e5m2``, no scale). An fp8
store writes ``kv_cache.to_cache_dtype``'s bytes (clamped to the largest finite value, rounded
to nearest even from float32); attention widens each block's fp8 rows once per KV head,
exactly, to bfloat16 (keys scored by pairs with bfloat16 queries) or float32, and computes from
there as on a cache of that dtype: a result's bits are those of a float32 / bfloat16 cache
holding ``kv_cache.widen_kv`` of the fp8 one.

When there is no compiler, the build fails, or ``SPLITSERVE_NATIVE_KERNELS=0``, the reference
runs instead, after one warning that says why (``status()`` reports it). Inputs a kernel does
not take (float16, a head dimension not a multiple of 16 for attention, a strided last
dimension) go to the reference as well.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from splitserve import env
from splitserve.kernels import reference
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.cpu_features import cpu_flags

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("native")
SOURCES = (SOURCE_DIR / "decode_attention.c", SOURCE_DIR / "layer_ops.c", SOURCE_DIR / "linear.c",
           SOURCE_DIR / "quant_matmul.c")
HEADERS = (SOURCE_DIR / "common.h", SOURCE_DIR / "entry_points.h")
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c11",
         "-lm")
GCC_FLAGS = ("--param=avoid-fma-max-bits=0",)
"""GCC only: always contract ``a * b + c`` into an FMA. Tuned for AMD Zen (``-march=native`` on
znver1-3), GCC otherwise leaves some multiply-add chains unfused (``avoid_fma_chains``), so
the same source rounded differently there than in a ``-march=haswell`` build or on a Zen 4:
bits that must not depend on the machine (a prefill worker's KV read by another's decode)."""
LIB_NAME = "libsplitserve_native.so"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
KV_DTYPE_CODES = {**_DTYPES, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}
"""The KV cache dtypes the kernels take, as ``native/common.h`` numbers them: the model's
dtypes, and the fp8 caches of ``kv_cache_dtype="fp8_e4m3"`` / ``"fp8_e5m2"`` (no scale)."""
_LANES = 16  # the kernel's dot-product width: head_dim must be a multiple of it


@dataclass(frozen=True)
class NativeStatus:
    """Whether the native kernels are in use in this process, and why (or why not)."""

    available: bool
    reason: str


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: NativeStatus | None = None
calls: collections.Counter[str] = collections.Counter()
"""Native kernel launches in this process, per kernel (tests read it to see a kernel ran)."""


def status() -> NativeStatus:
    """Build and load the library once per process (later calls return the first outcome)."""
    global _lib, _status
    with _lock:
        if _status is None:
            _lib, _status = _load()
            if _status.available:
                logger.info("native CPU kernels: %s", _status.reason)
            else:
                logger.warning("native CPU kernels unavailable, pure-torch path instead: %s",
                               _status.reason)
        return _status


def compiler() -> str | None:
    """The C compiler to build with: ``$CC`` or ``cc``, if it is on the PATH."""
    return shutil.which(os.environ.get("CC") or "cc")


def flags() -> tuple[str, ...]:
    """The compiler flags: ``FLAGS`` then ``SPLITSERVE_NATIVE_CFLAGS`` (later flags win, so
    ``-march=haswell`` there builds the AVX2 code on an AVX-512 machine)."""
    extra = tuple(env.SPLITSERVE_NATIVE_CFLAGS.get().split())
    return FLAGS[:-1] + (GCC_FLAGS if _is_gcc() else ()) + extra + FLAGS[-1:]


@functools.cache
def _is_gcc() -> bool:
    """Whether the compiler is GCC (``--version`` names neither clang nor another)."""
    cc = compiler()
    if cc is None:
        return False
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in out.lower() and ("gcc" in out.lower() or "free software" in out.lower())


def _load() -> tuple[ctypes.CDLL | None, NativeStatus]:
    if not env.SPLITSERVE_NATIVE_KERNELS.get():
        return None, NativeStatus(False, "SPLITSERVE_NATIVE_KERNELS=0")
    cc = compiler()
    if cc is None:
        return None, NativeStatus(False, f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        return None, NativeStatus(False, f"{cc} --version failed: {e}")
    key = hashlib.sha256(b"\0".join([
        *(f.read_bytes() for f in SOURCES + HEADERS), " ".join(flags()).encode(), cc.encode(), "".join(version).encode(),
        " ".join(sorted(cpu_flags())).encode(),
    ])).hexdigest()[:24]
    root = env.cache_dir()
    folder = (root if root is not None else Path(tempfile.gettempdir()) / "splitserve") / "native" / key
    path = folder / LIB_NAME
    built = "cached"
    if not path.exists():
        error = _build(cc, folder, path)
        if error:
            return None, NativeStatus(False, error)
        built = "built"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, NativeStatus(False, f"loading {path}: {e}")
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    signatures = {
        "paged_decode_attention": [
            ptr, i32, i64, i64,  # query, dtype, strides
            ptr, ptr, i32, i64, i64, i64,  # key, value, dtype, block/token/head strides
            ptr, i64, i64, i64, ptr,  # block tables, row stride, max blocks, num blocks, lens
            ptr, i64, i64, i64, i64, i64,  # out, B, H, KVH, D, block_size
            f32, i64, f32, i32,  # scale, window, soft cap, threads
        ],
        "paged_prefill_attention": [
            ptr, i32, i64, i64,  # query, dtype, strides
            ptr, ptr, i32, i64, i64, i64,  # key, value, dtype, block/token/head strides
            ptr, i64, i64, i64,  # block tables, row stride, max blocks, num blocks
            ptr, ptr, ptr, i64,  # query_start_loc, context lens, listed sequences, how many
            ptr, i64, i64, i64, i64,  # out, H, KVH, D, block_size
            f32, i64, f32, i32,  # scale, window, soft cap, threads
        ],
        "rms_norm": [
            ptr, i32, i64, i64, i64,  # x, dtype, rows, H, row stride
            ptr, i64, ptr, f32,  # residual, its row stride, weight, eps
            ptr, ptr, i32,  # out, residual out, threads
        ],
        "rotary_store_kv": [
            ptr, ptr, ptr, i32,  # q, k, v, dtype
            i64, i64, i64, i64, i64, i64,  # their token / head strides
            i64, i64, i64, i64, i64,  # T, NH, NKV, D, rotary dims
            ptr, ptr, i64, i64,  # positions, table, its row stride, rows
            ptr, ptr, f32, ptr,  # q norm, k norm, eps, q out
            ptr, ptr, i32, i64, i64, i64,  # K cache, V cache, dtype, block/token/head strides
            i64, i64, ptr, i32,  # num blocks, block size, slots, threads
        ],
        "softcap": [ptr, ptr, i64, f32, i32],  # x, out (float32), n, cap, threads
        "act_and_mul": [ptr, i64, i64, i64, ptr, i32, i32],  # x, T, I, its row stride, out,
        # kind (0 SiLU, 1 tanh-GELU), threads
        "argmax_rows": [ptr, i64, i64, i64, ptr, i32],  # x, rows, cols, row stride, out, threads
        "linear_f32": [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i32],  # x, M, K, its
        # row stride, packed weight, N, bias, y, its row stride, threads
        "linear_lanes": [],
        "quant_matmul_fused": [
            i32, ptr, i32, i64, i64, i64,  # bits, x, dtype, M, K, its row stride
            i32, ptr, i64, ptr, f32, ptr,  # prologue, residual, its row stride, norm weight,
            # eps, residual out
            ptr, i64, ptr, i32, i64, i32,  # packed weight, N, y, its dtype, row stride, threads
        ],
        "int4_lanes": [],
        "decode_layer": [ptr],  # a DecodeLayerArgs
        "moe_silu_f32": [
            ptr, i64, i64, i64,  # x, T, H, its row stride
            ptr, ptr, i64, i64,  # packed w13 [E, 2I * H], w2 [E, H * I], E, I
            ptr, ptr, i64, ptr,  # ids [T, k], weights [T, k], k, out [T, H]
            ptr, ptr, ptr, i32,  # scratch: xs, hid, ys; threads
        ],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = (None if name in ("softcap", "argmax_rows", "linear_f32", "act_and_mul")
                      else i64)
    return lib, NativeStatus(True, f"{built} {path} ({' '.join(flags())}, {''.join(version)})")


def _build(cc: str, folder: Path, path: Path) -> str | None:
    """Compile into ``path`` (atomically); the error, or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
        os.close(fd)
    except OSError as e:
        return f"cannot write {folder}: {e}"
    try:
        *options, libs = flags()
        run = subprocess.run([cc, *options, f"-I{SOURCE_DIR}", "-o", tmp,
                              *(str(f) for f in SOURCES), libs],
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            names = ", ".join(f.name for f in SOURCES)
            return f"{cc} failed on {names} (rc {run.returncode}): {' | '.join(tail)}"
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as e:
        return f"building {SOURCE_DIR} with {cc}: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return None


def _loaded() -> ctypes.CDLL | None:
    """The library, built and loaded on first use; None where the references must run."""
    if _status is None:
        status()
    return _lib


def _cache_pointers(kv_cache: Tensor) -> tuple[int, int]:
    """Addresses of a layer cache's K and V planes ([2, ...] through its strides)."""
    k = kv_cache.data_ptr()
    return k, k + kv_cache.stride(0) * kv_cache.element_size()


def supports(query: Tensor, kv_cache: Tensor) -> bool:
    """Whether the attention kernel takes these operands (else the reference runs)."""
    return (
        query.is_cpu and kv_cache.is_cpu
        and query.dtype in _DTYPES and kv_cache.dtype in KV_DTYPE_CODES
        and query.dim() == 3 and kv_cache.dim() == 5 and kv_cache.shape[0] == 2
        and query.shape[2] == kv_cache.shape[4] and query.shape[2] % _LANES == 0
        and query.shape[1] % kv_cache.shape[3] == 0
        and query.stride(2) == 1 and kv_cache.stride(4) == 1
    )


def _bad_context(seq: int, ctx: int, max_blocks: int, block_size: int) -> KernelInputError:
    return KernelInputError(
        f"context_lens[{seq}] = {ctx} is outside [0, {max_blocks * block_size}] "
        f"(block_tables has {max_blocks} columns of {block_size} tokens)")


def _bad_block(seq: int, col: int, block: int, num_blocks: int) -> KernelInputError:
    return KernelInputError(
        f"block_tables[{seq}, {col}] = {block} points past the cache (num_blocks = {num_blocks})")


def paged_decode_attention(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Tensor:
    """``reference.paged_decode_attention``, computed by the native kernel where it can be.

    The kernel checks every block id a context covers, and each context length against the
    table, before it reads anything (``KernelInputError`` names the first bad one)."""
    lib = _loaded()
    if lib is None or query.shape[0] == 0 or not supports(query, kv_cache):
        return reference.paged_decode_attention(
            query, kv_cache, block_tables, context_lens, scale, sliding_window, soft_cap
        )
    b, h, d = query.shape
    if not (block_tables.dim() == 2 and block_tables.shape[0] == b
            and tuple(context_lens.shape) == (b,)):  # the message built on failure only
        raise KernelInputError(f"block_tables [{b}, max_blocks] and context_lens [{b}] expected, "
                               f"got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    tables = block_tables if block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 \
        else block_tables.to(torch.int32).contiguous()
    lens = context_lens if context_lens.dtype == torch.int32 and context_lens.stride(0) == 1 \
        else context_lens.to(torch.int32).contiguous()
    out = torch.empty((b, h, d), dtype=query.dtype)
    k_ptr, v_ptr = _cache_pointers(kv_cache)
    num_blocks, block_size, max_blocks = kv_cache.shape[1], kv_cache.shape[2], tables.shape[1]
    rc = lib.paged_decode_attention(
        query.data_ptr(), _DTYPES[query.dtype], query.stride(0), query.stride(1),
        k_ptr, v_ptr, KV_DTYPE_CODES[kv_cache.dtype],
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        tables.data_ptr(), tables.stride(0), max_blocks, num_blocks, lens.data_ptr(),
        out.data_ptr(), b, h, kv_cache.shape[3], d, block_size,
        float(scale), int(sliding_window or 0), float(soft_cap or 0.0), torch.get_num_threads(),
    )
    calls["paged_decode_attention"] += 1
    if rc == -1:
        raise MemoryError("paged_decode_attention: a work item could not allocate its scores")
    if rc > 0:
        seq, col = divmod(rc - 1, max_blocks + 1)
        if col == max_blocks:
            raise _bad_context(seq, int(lens[seq]), max_blocks, block_size)
        raise _bad_block(seq, col, int(tables[seq, col]), num_blocks)
    return out


PREFILL_NATIVE_MAX_SPAN = 1024
"""A prompt sequence's attention runs natively when its span (its context, or the layer's
window when shorter) is at most this many tokens: per query row the kernel does a decode
step's work (tiles of 16 rows share each block's reads), which beats the fused SDPA up to
~1,000 tokens (2,048 rows, bf16 cache, 2 threads: sequences of 512 took 0.62-0.71x the SDPA's
time with 9 / 3 heads of 64, 16 / 4 of 64 and 32 / 8 of 128; of 1,024, 0.98-1.00x) and loses
beyond (one of 2,048: 1.16x). Decided per sequence by its own length, so a sequence's result
does not depend on its batch."""


def prefill_attention(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    context_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Tensor:
    """``reference.prefill_attention``; sequences of a short span through the native kernel
    (each query row as a decode row over the positions up to its own), the rest through the
    reference."""
    lib = _loaded()
    if lib is None or query.shape[0] == 0 or not supports(query, kv_cache):
        return reference.prefill_attention(query, kv_cache, block_tables, query_start_loc,
                                           context_lens, scale, sliding_window, soft_cap)
    lens = context_lens.tolist()
    window = sliding_window or 0
    short = [s for s, ctx in enumerate(lens)
             if (min(ctx, window) if window > 0 else ctx) <= PREFILL_NATIVE_MAX_SPAN]
    if not short:
        return reference.prefill_attention(query, kv_cache, block_tables, query_start_loc,
                                           context_lens, scale, sliding_window, soft_cap)
    num_seqs, t = len(lens), query.shape[0]
    if not (block_tables.dim() == 2 and block_tables.shape[0] == num_seqs
            and tuple(query_start_loc.shape) == (num_seqs + 1,)):  # messages built on failure only
        raise KernelInputError(
            f"block_tables [{num_seqs}, max_blocks] and query_start_loc [{num_seqs + 1}] "
            f"expected, got {tuple(block_tables.shape)} and {tuple(query_start_loc.shape)}")
    starts = query_start_loc.tolist()
    if starts[0] != 0 or starts[-1] != t or any(a > b for a, b in zip(starts[:-1], starts[1:], strict=True)):
        raise KernelInputError(
            f"query_start_loc must rise from 0 to {t} (the query rows), got {starts}")
    tables = block_tables if block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 \
        else block_tables.to(torch.int32).contiguous()
    num_blocks, block_size, max_blocks = kv_cache.shape[1], kv_cache.shape[2], tables.shape[1]
    # every sequence, whichever path takes it (the kernel then only has block ids to refuse)
    for s, ctx in enumerate(lens):
        if not 0 <= ctx <= max_blocks * block_size:
            raise _bad_context(s, ctx, max_blocks, block_size)
        if starts[s + 1] - starts[s] > ctx:
            raise KernelInputError(
                f"sequence {s}: its chunk of {starts[s + 1] - starts[s]} query rows is "
                f"longer than context_lens[{s}] = {ctx}")
    ctx32 = context_lens.to(torch.int32).contiguous()
    qsl = query_start_loc.to(torch.int32).contiguous()
    seqs = torch.tensor(short, dtype=torch.int64)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    _, h, d = query.shape
    k_ptr, v_ptr = _cache_pointers(kv_cache)
    rc = lib.paged_prefill_attention(
        query.data_ptr(), _DTYPES[query.dtype], query.stride(0), query.stride(1),
        k_ptr, v_ptr, KV_DTYPE_CODES[kv_cache.dtype],
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        tables.data_ptr(), tables.stride(0), max_blocks, num_blocks,
        qsl.data_ptr(), ctx32.data_ptr(), seqs.data_ptr(), len(short),
        out.data_ptr(), h, kv_cache.shape[3], d, block_size,
        float(scale), int(window), float(soft_cap or 0.0), torch.get_num_threads(),
    )
    calls["paged_prefill_attention"] += 1
    if rc == -1:
        raise MemoryError("paged_prefill_attention: a work item could not allocate its scores")
    if rc > 0:  # context lengths and chunks were checked above: a block id past the cache
        seq, col = divmod(rc - 1, max_blocks + 2)
        raise _bad_block(seq, col, int(tables[seq, col]), num_blocks)
    if len(short) < num_seqs:  # the long ones: the reference's fused SDPA, one at a time
        for s in sorted(set(range(num_seqs)) - set(short)):
            lo, hi = starts[s], starts[s + 1]
            if hi > lo:
                out[lo:hi] = reference._prefill_one(query[lo:hi], kv_cache, block_tables[s],
                                                    lens[s], scale, sliding_window, soft_cap)
    return out


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``reference.rms_norm`` in one native call (float32 / bfloat16 rows on the CPU)."""
    lib = _loaded()
    if lib is None or not _norm_supported(x, weight, residual):
        return reference.rms_norm(x, weight, eps, residual)
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=x.dtype)
    new_residual = torch.empty((rows, hidden), dtype=x.dtype) if residual is not None else None
    rc = lib.rms_norm(
        x.data_ptr(), _DTYPES[x.dtype], rows, hidden, x.stride(0),
        residual.data_ptr() if residual is not None else None,
        residual.stride(0) if residual is not None else 0,
        weight.data_ptr(), float(eps), out.data_ptr(),
        new_residual.data_ptr() if new_residual is not None else None, torch.get_num_threads(),
    )
    calls["rms_norm"] += 1
    if rc != 0:
        raise MemoryError("rms_norm: could not allocate a row's scratch")
    return out, new_residual


def _norm_supported(x: Tensor, weight: Tensor, residual: Tensor | None) -> bool:
    return (
        x.is_cpu and x.dtype in _DTYPES and x.dim() == 2 and x.shape[0] > 0
        and x.stride(1) == 1 and weight.dtype == x.dtype and weight.is_cpu
        and tuple(weight.shape) == (x.shape[1],) and weight.stride(0) == 1
        and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape
                                  and residual.is_cpu and residual.stride(1) == 1))
    )


def rotary_store_kv(
    positions: Tensor, query: Tensor, key: Tensor, value: Tensor, cos_sin_cache: Tensor,
    kv_cache: Tensor, slot_mapping: Tensor,
    qk_norm: tuple[Tensor, Tensor, float] | None = None,
) -> Tensor:
    """``reference.rotary_store_kv`` in one native call: (q/k RMSNorm,) rotary embedding of
    q and k, K and V written to their slots; returns the rotated queries [T, nh, hd]."""
    lib = _loaded()
    if lib is None or not _rope_supported(positions, query, key, value, cos_sin_cache,
                                          kv_cache, slot_mapping, qk_norm):
        return reference.rotary_store_kv(positions, query, key, value, cos_sin_cache, kv_cache,
                                         slot_mapping, qk_norm)
    t, nh, d = query.shape
    q_out = torch.empty((t, nh, d), dtype=query.dtype)
    k_ptr, v_ptr = _cache_pointers(kv_cache)
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    max_pos = cos_sin_cache.shape[0]
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (None, None, 0.0)
    rc = lib.rotary_store_kv(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), _DTYPES[query.dtype],
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), t, nh, key.shape[1], d, cos_sin_cache.shape[1],
        positions.data_ptr(), cos_sin_cache.data_ptr(), cos_sin_cache.stride(0), max_pos,
        q_norm.data_ptr() if q_norm is not None else None,
        k_norm.data_ptr() if k_norm is not None else None, float(eps), q_out.data_ptr(),
        k_ptr, v_ptr, KV_DTYPE_CODES[kv_cache.dtype],
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), num_blocks, block_size,
        slot_mapping.data_ptr(), torch.get_num_threads(),
    )
    calls["rotary_store_kv"] += 1
    if rc == -1:
        raise MemoryError("rotary_store_kv: could not allocate a token's scratch")
    if rc > 0:
        tok, bad_slot = divmod(rc - 1, 2)
        if bad_slot:
            raise KernelInputError(
                f"slot_mapping[{tok}] = {int(slot_mapping[tok])} points past the cache "
                f"({num_blocks} blocks of {block_size} tokens)"
            )
        raise KernelInputError(
            f"positions[{tok}] = {int(positions[tok])} is outside the rotary table "
            f"[0, {max_pos})"
        )
    return q_out


def _rope_supported(
    positions: Tensor, query: Tensor, key: Tensor, value: Tensor, cos_sin_cache: Tensor,
    kv_cache: Tensor, slot_mapping: Tensor, qk_norm: tuple[Tensor, Tensor, float] | None,
) -> bool:
    """The operands the kernel reads as it assumes (checked per call: ~2 us)."""
    if not (query.dim() == 3 and key.dim() == 3 and value.dim() == 3 and kv_cache.dim() == 5
            and cos_sin_cache.dim() == 2):
        return False
    t, _, d = query.shape
    kv_shape, dtype = kv_cache.shape, query.dtype
    rot = cos_sin_cache.shape[1]
    return (
        query.is_cpu and key.is_cpu and value.is_cpu and kv_cache.is_cpu
        and cos_sin_cache.is_cpu and positions.is_cpu and slot_mapping.is_cpu
        and dtype in _DTYPES and key.dtype == dtype and value.dtype == dtype
        and kv_cache.dtype in KV_DTYPE_CODES and cos_sin_cache.dtype == torch.float32
        and t > 0 and key.shape == value.shape and key.shape[0] == t and key.shape[2] == d
        and query.stride(2) == 1 and key.stride(2) == 1 and value.stride(2) == 1
        and kv_shape[0] == 2 and kv_shape[3] == key.shape[1] and kv_shape[4] == d
        and kv_cache.stride(4) == 1
        and 0 < rot <= d and rot % 2 == 0 and cos_sin_cache.stride(1) == 1
        and positions.dtype == torch.int64 and positions.shape == (t,)
        and positions.stride(0) == 1
        and slot_mapping.dtype == torch.int64 and slot_mapping.shape == (t,)
        and slot_mapping.stride(0) == 1
        and (qk_norm is None or (_norm_weight_ok(qk_norm[0], dtype, d)
                                 and _norm_weight_ok(qk_norm[1], dtype, d)))
    )


def _norm_weight_ok(w: Tensor, dtype: torch.dtype, d: int) -> bool:
    return w.dtype == dtype and w.shape == (d,) and w.stride(0) == 1 and w.is_cpu


def _act_and_mul(x: Tensor, kind: int) -> Tensor | None:
    """act(gate) * up of x [T, 2I] = [gate | up] (float32, rows may be strided) in one native
    pass, or None where the kernel does not take the operands."""
    if not (x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] % 2 == 0
            and x.stride(1) == 1) or (lib := _loaded()) is None:
        return None
    t, i = x.shape[0], x.shape[1] // 2
    out = torch.empty((t, i), dtype=torch.float32)
    lib.act_and_mul(x.data_ptr(), t, i, x.stride(0), out.data_ptr(), kind,
                    torch.get_num_threads())
    calls["act_and_mul"] += 1
    return out


def silu_and_mul(x: Tensor) -> Tensor:
    """``reference.silu_and_mul`` in one native pass over float32 [T, 2I] (the sigmoid from
    ``exp_nonpos``: relative error under 1e-5); the reference for other operands."""
    out = _act_and_mul(x, 0)
    return reference.silu_and_mul(x) if out is None else out


def gelu_tanh_and_mul(x: Tensor) -> Tensor:
    """``reference.gelu_tanh_and_mul`` in one native pass over float32 [T, 2I] (computed as
    ``v * sigmoid(2z)``, which does not cancel for very negative gates); the reference for
    other operands."""
    out = _act_and_mul(x, 1)
    return reference.gelu_tanh_and_mul(x) if out is None else out


def softcap(x: Tensor, cap: float) -> Tensor:
    """``reference.softcap``: ``cap * tanh(x / cap)``, in one native pass over float32 (the
    tanh a minimax rational, relative error < 4e-7)."""
    if not (x.is_cpu and x.dtype == torch.float32) or (lib := _loaded()) is None:
        return reference.softcap(x, cap)
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.softcap(x.data_ptr(), out.data_ptr(), x.numel(), float(cap), torch.get_num_threads())
    calls["softcap"] += 1
    return out


def argmax_rows(x: Tensor) -> list[int]:
    """Each row's ``argmax`` of a [N, V] float32 tensor, as a list (torch's first-max and
    NaN rules); torch's vectorless reduction took ~1.7 ns a value here."""
    if not (x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0
            and x.stride(1) == 1) or (lib := _loaded()) is None:  # no build for GPU logits
        return x.argmax(dim=-1).tolist()  # type: ignore[no-any-return]
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(),
                    torch.get_num_threads())
    calls["argmax_rows"] += 1
    return out.tolist()  # type: ignore[no-any-return]


SMALL_LINEAR_MAX = 1 << 18
"""Largest float32 weight (in values, N * K) served by ``linear_f32`` in an AVX2 build: up to
here it beat oneDNN at decode row counts (e.g. 1.3x for 64 x 4096 at 16 rows). Above, its
6 x 2-vector tiles measured 0.9-1.05x of oneDNN on the medium model's weights (``-march=haswell``
on Zen 4, where oneDNN itself runs AVX-512); no AVX2-only machine was at hand to measure on,
so larger weights stay with oneDNN there."""

WIDE_LINEAR_MAX = 1 << 24
"""The same limit in an AVX-512 build (6 x 4-vector tiles, the next weight block prefetched
while the current one is computed from L2). Measured on a 2-core Zen 4 (``bench/linear_cpu.py``:
the 48 projections of a 12-layer, 768-wide model, 302 MB, cycled so that weights come from
memory): 1, 4 and 16 rows took 9.3, 9.6 and 15.1 ms against oneDNN's 14-17, 12-15 and
18-21 ms; at 512 rows, hot, both reach ~205-210 GFLOP/s. Above 2^24 values (a large
vocabulary's head) oneDNN keeps the weight."""


def linear_max() -> int:
    """The largest weight ``linear_f32`` takes in this process's build (0 without one)."""
    lib = _loaded()
    if lib is None:
        return 0
    return WIDE_LINEAR_MAX if lib.linear_lanes() >= 16 else SMALL_LINEAR_MAX


def small_linear_available(weight: Tensor) -> bool:
    """Whether ``weight`` [N, K] is served by ``linear_f32`` (decided once, by its shape: never
    by a call's row count, so every row through it gets the same arithmetic)."""
    return (
        weight.is_cpu and weight.dtype == torch.float32 and weight.dim() == 2
        and 0 < weight.numel() <= linear_max()
    )


LINEAR_TILE = 64
"""Columns per block of a packed weight (``linear.c``'s NVEC x 16 lanes)."""


def pack_linear_weight(weight: Tensor) -> Tensor:
    """W [N, K] float32 as ``linear_f32`` reads it, flat: W^T cut into blocks of LINEAR_TILE
    columns, each [K, LINEAR_TILE] contiguous (a tile's pass over k reads one contiguous run:
    with W^T rows N apart it touched a new page per k at K = 768), then the last
    N % LINEAR_TILE columns as one [K, N % LINEAR_TILE] block. A copy: never aliases W."""
    n, k = weight.shape
    full = n // LINEAR_TILE * LINEAR_TILE
    wt = weight.detach().t()
    blocks = wt[:, :full].reshape(k, full // LINEAR_TILE, LINEAR_TILE).permute(1, 0, 2)
    return torch.cat([blocks.reshape(-1), wt[:, full:].reshape(-1)]).to(torch.float32).contiguous()


def small_linear(x: Tensor, packed: Tensor, out_features: int, bias: Tensor | None) -> Tensor:
    """``x @ W^T (+ bias)``: x [M, K] float32 (rows may be strided), ``packed`` =
    ``pack_linear_weight(W)``, bias [N] float32 contiguous."""
    lib = _loaded()
    m, k = x.shape
    n = out_features
    if packed.numel() != n * k or not packed.is_contiguous():  # (no message built per call)
        raise KernelInputError(f"packed weight of {n} x {k} values expected, got {packed.numel()}")
    assert lib is not None and x.dtype == torch.float32 and x.is_cpu, "small_linear operands"
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=torch.float32)
    lib.linear_f32(x.data_ptr(), m, k, x.stride(0), packed.data_ptr(), n,
                   bias.data_ptr() if bias is not None else None, y.data_ptr(), n,
                   torch.get_num_threads())
    calls["linear_f32"] += 1
    return y


def moe_available(weights: list[object], activation: str) -> bool:
    """Whether ``moe_silu`` takes a layer of this activation over these expert weights (plain
    float32 CPU tensors: quantized experts keep their own matmuls)."""
    return (activation == "silu" and bool(weights)
            and all(isinstance(w, Tensor) and w.is_cpu and w.dtype == torch.float32
                    for w in weights)
            and _loaded() is not None)


def pack_moe_experts(experts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(gate [I, H], up [I, H], down [H, I]) per expert -> (w13 [E, 2I * H], w2 [E, H * I]):
    each expert's [gate | up] and down packed as ``pack_linear_weight`` lays them out."""
    w13 = torch.stack([pack_linear_weight(torch.cat([g, u])) for g, u, _ in experts])
    w2 = torch.stack([pack_linear_weight(d) for _, _, d in experts])
    return w13, w2


def moe_silu(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor,
             inter: int) -> Tensor:
    """Experts of a SiLU-gated MoE layer: x [T, H] float32, (w13, w2) from
    ``pack_moe_experts`` (experts of width ``inter``), weights [T, k] float32 and ids [T, k]
    int64 from the router. Returns [T, H] float32: ``reference.fused_moe``'s value."""
    lib = _loaded()
    assert lib is not None, "moe_silu without the native library"
    t, h = x.shape
    e, i = w2.shape[0], inter
    k = ids.shape[1]
    if not (w13.dim() == 2 and w2.dim() == 2 and w13.shape == (e, 2 * i * h)
            and w2.shape == (e, h * i) and w13.is_contiguous() and w2.is_contiguous()):
        raise KernelInputError(f"packed w13 [E, {2 * i * h}] and w2 [E, {h * i}] expected, got "
                               f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    if tuple(weights.shape) != (t, k) or tuple(ids.shape) != (t, k):
        raise KernelInputError(f"weights and ids [{t}, k] expected, got "
                               f"{tuple(weights.shape)} and {tuple(ids.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty((t, h), dtype=torch.float32)
    xs = torch.empty((t * k, h), dtype=torch.float32)
    hid = torch.empty((t * k, 2 * i), dtype=torch.float32)
    ys = torch.empty((t * k, h), dtype=torch.float32)
    rc = lib.moe_silu_f32(x.data_ptr(), t, h, x.stride(0), w13.data_ptr(), w2.data_ptr(), e, i,
                          ids.data_ptr(), weights.data_ptr(), k, out.data_ptr(), xs.data_ptr(),
                          hid.data_ptr(), ys.data_ptr(), torch.get_num_threads())
    calls["moe_silu_f32"] += 1
    if rc == -1:
        raise MemoryError("moe_silu: could not allocate the grouping of the routed pairs")
    if rc > 0:
        pair = rc - 1
        raise KernelInputError(
            f"ids[{pair // k}, {pair % k}] = {int(ids.view(-1)[pair])} is not an expert "
            f"(num_experts = {e})"
        )
    return out


INT4_GROUP = 32
"""Values per group of the native int4 kernel (larger groups are served with their scales
repeated per 32)."""
INT4_BLOCK = 16
"""Output rows per block of a packed int4 / int8 weight. A weight whose N is not a multiple
(a vocabulary of 49,153 or 50,257 tokens) is packed with zero rows up to the next one; the
kernel computes them and stores only the N real outputs (vLLM pads its vocabulary so too)."""
_INT4_GROUP_BYTES = INT4_BLOCK * INT4_GROUP // 2 + 2 * INT4_BLOCK * 2


def int4_lanes() -> int:
    """Vector width of this build's int4 kernel: 16 (AVX-512), 8 (AVX2), 1 (scalar); 0 without
    a build."""
    lib = _loaded()
    return 0 if lib is None else int(lib.int4_lanes())


def int4_unpackable(shape: tuple[int, int], group_size: int, kind: str = "int4") -> str | None:
    """Why ``int4_matmul`` / ``int8_matmul`` (``kind``) cannot take a [N, K] weight in groups
    of ``group_size`` (None when it can): groups of a multiple of 32 dividing K, or for int8
    also of 16 (two scales per group of 32: ``pack_int8_weight``)."""
    n, k = shape
    if n < 1:
        return f"N={n}: no output row"
    if kind == "int8" and group_size == INT8_HALF_GROUP and k % INT4_GROUP == 0:
        return None
    if group_size % INT4_GROUP or k % group_size:
        return f"group size {group_size} is not a multiple of {INT4_GROUP} dividing K={k}"
    return None


def padded_rows(n: int) -> int:
    """N rounded up to whole blocks of ``INT4_BLOCK`` output rows (what a packed weight holds)."""
    return -(-n // INT4_BLOCK) * INT4_BLOCK


def _pad_rows(t: Tensor) -> Tensor:
    """``t`` [N, ...] with zero rows appended up to ``padded_rows(N)`` (itself when whole)."""
    n = t.shape[0]
    extra = padded_rows(n) - n
    return t if extra == 0 else torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])


def pack_int4_weight(codes: Tensor, scales: Tensor, offsets: Tensor, group_size: int) -> Tensor:
    """An int4 weight as ``int4_matmul`` reads it: codes uint8 [N, K] in [0, 15], ``w = codes *
    scales + offsets`` per group (both float [N, K / group_size]). Flat uint8: per block of 16
    output rows and group of 32, 256 bytes of codes (chunk t of 64 bytes, byte 4j + i:
    q[j, 8t + i] | q[j, 8t + 4 + i] << 4), then the 16 scales and 16 offsets as float16; N
    padded with zero rows to whole blocks. Raises ValueError when the shape is not served or a
    scale does not fit float16."""
    nb, g = _blocks_and_groups(codes.shape, group_size)
    codes, scales, offsets = _pad_rows(codes), _pad_rows(scales), _pad_rows(offsets)
    # k = 8t + 4s + i (s: high nibble) -> [block, group, t, row, s, i]
    q = codes.to(torch.uint8).view(nb, INT4_BLOCK, g, 4, 2, 4).permute(0, 2, 3, 1, 4, 5)
    packed_codes = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(nb, g, 256)
    return torch.cat([packed_codes, _scales_per_block(scales, group_size, "scale"),
                      _scales_per_block(offsets, group_size, "zero")], -1).reshape(-1).contiguous()


def _blocks_and_groups(shape: torch.Size, group_size: int, kind: str = "int4") -> tuple[int, int]:
    """(blocks of 16 output rows, groups of 32) of a [N, K] weight the kernels take; ValueError
    naming why otherwise."""
    n, k = shape
    why = int4_unpackable((n, k), group_size, kind)
    if why is not None:
        raise ValueError(why)
    return padded_rows(n) // INT4_BLOCK, k // INT4_GROUP


def _scales_per_block(t: Tensor, group_size: int, what: str) -> Tensor:
    """Per-group values [N, K / group_size] as the packed layout holds them: float16, one per
    group of 32 (repeated for larger groups), [NB, G, 16 rows] as bytes [NB, G, 32]."""
    rep = group_size // INT4_GROUP
    h = (t.float().repeat_interleave(rep, dim=1) if rep > 1 else t.float()).to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"a quantized weight's {what} is outside float16's range")
    n, g = h.shape
    return h.view(n // INT4_BLOCK, INT4_BLOCK, g).permute(0, 2, 1).contiguous().view(torch.uint8)


_INT8_GROUP_BYTES = INT4_BLOCK * INT4_GROUP + INT4_BLOCK * 2
INT8_HALF_GROUP = 16
"""int8 weights may have a scale per 16 values (GGUF Q6_K): two per group of 32 (``HALF``)."""


def pack_int8_weight(codes: Tensor, scales: Tensor, group_size: int,
                     zeros: Tensor | None = None) -> Tensor:
    """An int8 weight as ``int8_matmul`` reads it: codes int8 [N, K], ``w = codes * scales
    (+ zeros)`` per group (float [N, K / group_size]; a whole row for per-channel int8). Flat
    uint8: per block of 16 output rows and group of 32, 512 bytes of codes (chunk t of 32
    bytes: byte 2j + e = q[j, 2t + e]), then the 16 scales as float16, then (group_size 16:
    the kernel's ``HALF``) the 16 scales of the group's second 16 values, then (``zeros``: its
    ``ZERO``) the 16 zeros (with ``HALF``: each half's); N padded with zero rows to whole
    blocks. Raises ValueError when the shape is not served or a value does not fit float16."""
    nb, g = _blocks_and_groups(codes.shape, group_size, "int8")
    codes, scales = _pad_rows(codes), _pad_rows(scales)
    q = codes.view(torch.uint8).view(nb, INT4_BLOCK, g, 16, 2).permute(0, 2, 3, 1, 4)
    parts = [q.reshape(nb, g, 512)]
    if group_size == INT8_HALF_GROUP:
        parts += [_scales_per_block(scales[:, 0::2], INT4_GROUP, "scale"),
                  _scales_per_block(scales[:, 1::2], INT4_GROUP, "scale")]
        if zeros is not None:
            zeros = _pad_rows(zeros)
            parts += [_scales_per_block(zeros[:, 0::2], INT4_GROUP, "zero"),
                      _scales_per_block(zeros[:, 1::2], INT4_GROUP, "zero")]
    else:
        parts.append(_scales_per_block(scales, group_size, "scale"))
        if zeros is not None:
            parts.append(_scales_per_block(_pad_rows(zeros), group_size, "zero"))
    return torch.cat(parts, -1).reshape(-1).contiguous()


def int8_bits(group_size: int, zeros: bool) -> int:
    """``quant_matmul``'s ``bits`` for a ``pack_int8_weight`` weight (before ``ACT8``)."""
    return 8 | (HALF if group_size == INT8_HALF_GROUP else 0) | (ZERO if zeros else 0)


def int4_matmul(x: Tensor, packed: Tensor, out_features: int, bits: int = 4) -> Tensor:
    """``x @ W^T`` through a ``pack_int4_weight`` weight: x [M, K] float32 or bfloat16 (rows
    may be strided), the result in x's dtype (each row's activations quantized to 16 bits per
    group of 32, as ``native/quant_matmul.c`` says; to 8 bits with ``bits=4 | ACT8``)."""
    return quant_matmul(bits, x, packed, out_features)[0]


def int8_matmul(x: Tensor, packed: Tensor, out_features: int, bits: int = 8) -> Tensor:
    """``int4_matmul`` for a ``pack_int8_weight`` weight (``bits=8 | ACT8``: 8-bit rows)."""
    return quant_matmul(bits, x, packed, out_features)[0]


ACT8 = 16
"""Added to ``bits``: each row's activations quantized to 8 bits per group of 32 (``max|x| /
127`` steps, as llama.cpp's Q4 x Q8 and Q8 x Q8 dot products) instead of 16: ``quant_matmul.c``'s
``QM_ACT8``. int4 codes then take one byte dot product per code instead of two; int8 codes
one byte dot product per four codes instead of one 16-bit product per two (AVX-512 VNNI; the
other builds multiply the same 8-bit codes as 16-bit values: the same sums, the same bits)."""

HALF = 32
"""Added to ``bits`` 8: the weight has a scale per 16 values, two per group of 32 (GGUF Q6_K),
``quant_matmul.c``'s ``QM_HALF``: the group's two halves are summed apart and each scaled."""
ZERO = 64
"""Added to ``bits`` 8: the weight has a zero per group, ``w = q * d + c`` (GGUF Q5_1 / Q5_K),
``quant_matmul.c``'s ``QM_ZERO``: one more fused multiply-add per group, as int4's; with
``HALF``, a zero per 16 values (GGUF Q2_K: two more)."""

PROLOGUES = {"rms_norm": 1, "silu": 2, "gelu_tanh": 3}
"""What ``quant_matmul`` can compute from x before the projection, in the same call."""


def quant_matmul(bits: int, x: Tensor, packed: Tensor, n: int, prologue: str | None = None,
                 norm_weight: Tensor | None = None, eps: float = 0.0,
                 residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``f(x) @ W^T`` for a packed int4 (``bits`` 4) or int8 weight, and the new residual:
    f is the identity, ``rms_norm`` (``reference.rms_norm(x, norm_weight, eps, residual)``'s
    output, bit for bit; the residual sum is returned as ``rms_norm`` returns it), or ``silu``
    / ``gelu_tanh`` (``silu_and_mul`` / ``gelu_tanh_and_mul`` of x = [gate | up], each value
    rounded to x's dtype as the two torch ops would). Operands: CPU, x float32 or bfloat16
    with unit column stride (and residual likewise, norm_weight contiguous in x's dtype)."""
    lib = _loaded()
    m = x.shape[0]
    k = x.shape[1] // 2 if prologue in ("silu", "gelu_tanh") else x.shape[1]
    wbits = bits & ~(ACT8 | HALF | ZERO)
    if bits & ~ACT8 not in (4, 8, 8 | HALF, 8 | ZERO, 8 | HALF | ZERO):
        raise KernelInputError(f"quant_matmul takes bits 4 or 8 (8 | HALF, 8 | ZERO, both), "
                               f"either | ACT8, got {bits}")
    extras = bool(bits & HALF) + bool(bits & ZERO) + (bits & (HALF | ZERO) == HALF | ZERO)
    per_group = _INT4_GROUP_BYTES if wbits == 4 else _INT8_GROUP_BYTES + 2 * INT4_BLOCK * extras
    if packed.numel() * INT4_BLOCK * INT4_GROUP != padded_rows(n) * k * per_group:
        raise KernelInputError(f"packed int{wbits} weight of {n} x {k} values expected, got "
                               f"{packed.numel()} bytes")
    assert lib is not None and x.dtype in _DTYPES, "quantized matmul operands"
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype)
    dt = _DTYPES[x.dtype]
    res_out = None
    if prologue == "rms_norm":
        assert norm_weight is not None and norm_weight.dtype == x.dtype
        if residual is not None:
            assert residual.dtype == x.dtype and residual.stride(1) == 1
            res_out = torch.empty((m, k), dtype=x.dtype)
    rc = lib.quant_matmul_fused(
        bits, x.data_ptr(), dt, m, k, x.stride(0), PROLOGUES[prologue] if prologue else 0,
        residual.data_ptr() if residual is not None else None,
        residual.stride(0) if residual is not None else 0,
        norm_weight.data_ptr() if norm_weight is not None else None, float(eps),
        res_out.data_ptr() if res_out is not None else None,
        packed.data_ptr(), n, y.data_ptr(), dt, n, torch.get_num_threads())
    if rc:
        raise MemoryError(f"int{wbits}_matmul: could not allocate the quantized activations")
    calls[f"int{wbits}_matmul" + ("_a8" if bits & ACT8 else "")] += 1
    return y, res_out


class DecodeLayerArgs(ctypes.Structure):
    """``decode_layer``'s operands (``native/quant_matmul.c``'s struct, field for field)."""

    _fields_ = [
        *((n, ctypes.c_int64) for n in ("M", "H", "I", "NH", "NKV", "D", "rot", "dtype",
                                         "kv_dtype", "threads", "act", "bits_qkv", "bits_o",
                                         "bits_gu", "bits_down")),
        *((n, ctypes.c_void_p) for n in ("w_qkv", "w_o", "w_gu", "w_down", "norm1", "norm2")),
        ("eps1", ctypes.c_double), ("eps2", ctypes.c_double),
        ("positions", ctypes.c_void_p), ("table", ctypes.c_void_p),
        ("table_stride", ctypes.c_int64), ("max_pos", ctypes.c_int64),
        ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("qk_eps", ctypes.c_double),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
        *((n, ctypes.c_int64) for n in ("stride_block", "stride_token", "stride_head",
                                         "num_blocks", "block_size")),
        ("slots", ctypes.c_void_p), ("block_tables", ctypes.c_void_p),
        ("table_row_stride", ctypes.c_int64), ("max_blocks", ctypes.c_int64),
        ("context_lens", ctypes.c_void_p),
        ("scale", ctypes.c_double), ("soft_cap", ctypes.c_double), ("window", ctypes.c_int64),
        ("x", ctypes.c_void_p), ("residual", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("res_out", ctypes.c_void_p),
    ]


def decode_layer(args: DecodeLayerArgs) -> bool:
    """Run a whole pre-norm decode layer (see ``native/quant_matmul.c``); False when the
    kernels reported anything (the caller reruns the layer through the separate calls)."""
    lib = _loaded()
    assert lib is not None
    calls["decode_layer"] += 1
    return int(lib.decode_layer(ctypes.byref(args))) == 0
