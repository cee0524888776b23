"""CPU kernels in C, built at first use with the host compiler and called through ctypes.

Today one kernel: ``paged_decode_attention`` (``native/decode_attention.c``), which reads each
sequence's keys and values in place from the paged cache. The pure-torch reference gathers
every sequence's blocks into a padded copy and hands it to torch's fused SDPA, whose CPU
kernel is built for long queries: with one query token per sequence it spent ~50 us per
(sequence, layer), and the gather itself wrote and read the whole context once more. At 64
sequences of ~450 tokens (SmolLM2, bf16) the reference took ~135 ms of a ~310 ms decode step.

Build: ``$CC`` (else ``cc``) with ``-O3 -march=native -fopenmp -shared`` (plus
``SPLITSERVE_NATIVE_CFLAGS``), into
``<cache>/native/<key>/`` (``SPLITSERVE_CACHE_DIR``; the key hashes the source, the flags,
the compiler's version and the processor's flags, so a machine of another kind builds its
own). Written to a temporary name and renamed, so processes that build at once never load a
partial file. The library is linked against ``libgomp.so.1``, which resolves to the copy torch
already loaded: the kernel runs on torch's thread team.

When there is no compiler, the build fails, or ``SPLITSERVE_NATIVE_KERNELS=0``, the reference
runs instead, after one warning that says why (``status()`` reports it). Inputs the kernel does
not take (float16, a head dimension not a multiple of 16, a strided last dimension) go to the
reference as well.
"""

from __future__ import annotations

import ctypes
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
from splitserve.kernels.checks import check_block_tables, require
from splitserve.kernels.cpu_features import cpu_flags

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "decode_attention.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-lm")
LIB_NAME = "libsplitserve_native.so"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_LANES = 16  # the kernel's dot-product width: head_dim must be a multiple of it


@dataclass(frozen=True)
class NativeStatus:
    """Whether the native kernels are in use in this process, and why (or why not)."""

    available: bool
    reason: str


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: NativeStatus | None = None
calls = 0
"""Native kernel launches in this process (tests read it to see the kernel ran)."""


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
    return FLAGS[:-1] + extra + FLAGS[-1:]


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
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, " ".join(flags()).encode(), cc.encode(), "".join(version).encode(),
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
    fn = lib.paged_decode_attention
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    fn.argtypes = [
        ptr, i32, i64, i64,  # query, dtype, strides
        ptr, ptr, i32, i64, i64, i64,  # key, value, dtype, block/token/head strides
        ptr, i64, ptr,  # block tables, row stride, context lens
        ptr, i64, i64, i64, i64, i64,  # out, B, H, KVH, D, block_size
        f32, i64, f32, i32,  # scale, window, soft cap, threads
    ]
    fn.restype = i32
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
        run = subprocess.run([cc, *options, "-o", tmp, str(SOURCE), libs],
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            return f"{cc} failed on {SOURCE.name} (rc {run.returncode}): {' | '.join(tail)}"
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as e:
        return f"building {SOURCE.name} with {cc}: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return None


def supports(query: Tensor, kv_cache: Tensor) -> bool:
    """Whether the kernel takes these operands (else the reference runs)."""
    return (
        query.device.type == "cpu" and kv_cache.device.type == "cpu"
        and query.dtype in _DTYPES and kv_cache.dtype in _DTYPES
        and query.dim() == 3 and kv_cache.dim() == 5 and kv_cache.shape[0] == 2
        and query.shape[2] == kv_cache.shape[4] and query.shape[2] % _LANES == 0
        and query.shape[1] % kv_cache.shape[3] == 0
        and query.stride(2) == 1 and kv_cache.stride(4) == 1
    )


def paged_decode_attention(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Tensor:
    """``reference.paged_decode_attention``, computed by the native kernel where it can be."""
    if query.shape[0] == 0 or not supports(query, kv_cache) or not status().available:
        return reference.paged_decode_attention(
            query, kv_cache, block_tables, context_lens, scale, sliding_window, soft_cap
        )
    assert _lib is not None
    b, h, d = query.shape
    require(block_tables.dim() == 2 and block_tables.shape[0] == b
            and tuple(context_lens.shape) == (b,),
            f"block_tables [{b}, max_blocks] and context_lens [{b}] expected, got "
            f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    # the kernel reads blocks by these ids, unchecked: every id a context covers must exist
    check_block_tables(block_tables, context_lens, kv_cache.shape[1], kv_cache.shape[2])
    tables = block_tables if block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 \
        else block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty((b, h, d), dtype=query.dtype)
    rc = _lib.paged_decode_attention(
        query.data_ptr(), _DTYPES[query.dtype], query.stride(0), query.stride(1),
        kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), _DTYPES[kv_cache.dtype],
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        tables.data_ptr(), tables.stride(0), lens.data_ptr(),
        out.data_ptr(), b, h, kv_cache.shape[3], d, kv_cache.shape[2],
        float(scale), int(sliding_window or 0), float(soft_cap or 0.0), torch.get_num_threads(),
    )
    global calls
    calls += 1
    if rc != 0:
        raise MemoryError("paged_decode_attention: a work item could not allocate its scores")
    return out
