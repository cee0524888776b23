"""The native CPU decode attention (kernels/native.py + native/decode_attention.c) against the
torch reference and float64 math; batch invariance; the engine really running it; the build's
fallback; bad block tables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.kernels import cpu_ops, native, ops, reference
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.cpu_features import cpu_flags
from splitserve.kernels.kv_cache import allocate_kv_caches
from tests.kernels.cases import random_block_tables

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not native.status().available,
                                reason="needs a C compiler (make setup installs gcc)")


def _exact(q, cache, tables, lens, scale, window, cap):  # type: ignore[no-untyped-def]
    """Float64 attention, one sequence at a time, by the definition."""
    b, h, d = q.shape
    kvh, bs = cache.shape[3], cache.shape[2]
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        if n == 0:
            continue
        ids = tables[i, : -(-n // bs)].long()
        k = cache[0][ids].reshape(-1, kvh, d)[:n].double()
        v = cache[1][ids].reshape(-1, kvh, d)[:n].double()
        lo = max(0, n - window) if window else 0
        k, v = k[lo:], v[lo:]
        for head in range(h):
            s = (k[:, head // (h // kvh)] @ q[i, head].double()) * scale
            if cap:
                s = cap * torch.tanh(s / cap)
            out[i, head] = torch.softmax(s, 0) @ v[:, head // (h // kvh)]
    return out


CASES = [  # dtype, head_dim, (heads, kv_heads), block_size, context lens, window, soft cap
    (torch.float32, 64, (9, 3), 16, [1, 15, 16, 17, 200, 333], None, None),
    (torch.float32, 128, (8, 8), 32, [5, 64, 65, 300], None, 50.0),
    (torch.float32, 96, (32, 4), 16, [40, 130, 257], 64, None),
    (torch.bfloat16, 64, (9, 3), 16, [1, 31, 160, 333, 700], None, None),
    (torch.bfloat16, 256, (8, 4), 16, [3, 100, 129], 32, 30.0),
    (torch.bfloat16, 80, (6, 2), 32, [0, 77, 250], None, None),  # an empty context: zeros
    # GQA groups of 5: value sums head by head, over 10 AVX2 vectors (a pass of 8, one of 2)
    (torch.float32, 80, (10, 2), 16, [7, 90, 301], None, None),
]


def _case(dtype, head_dim, heads, block_size, lens, seed=0):  # type: ignore[no-untyped-def]
    nh, kvh = heads
    g = torch.Generator().manual_seed(seed)
    num_blocks = 4 * (-(-max(lens) // block_size)) + 8
    # a real layer's view of the block-major pool: blocks are strided by every layer's K/V
    caches = allocate_kv_caches(3, num_blocks, block_size, kvh, head_dim, dtype, "cpu")
    cache = caches[1]
    cache.copy_(torch.randn(cache.shape, generator=g).to(dtype))
    tables = random_block_tables(lens, num_blocks, block_size, seed).cpu()
    q = torch.randn(len(lens), nh, head_dim, generator=g).to(dtype)
    return q, cache, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype,head_dim,heads,block_size,lens,window,cap", CASES)
def test_matches_float64_and_the_reference(dtype, head_dim, heads, block_size, lens, window,  # type: ignore[no-untyped-def]
                                           cap) -> None:
    q, cache, tables, ctx = _case(dtype, head_dim, heads, block_size, lens)
    assert not cache.is_contiguous()  # read through the pool's strides
    before = native.calls["paged_decode_attention"]
    got = native.paged_decode_attention(q, cache, tables, ctx, head_dim ** -0.5, window, cap)
    assert native.calls["paged_decode_attention"] == before + 1  # the C kernel ran, not the fallback
    want = _exact(q, cache, tables, ctx, head_dim ** -0.5, window, cap)
    ref = reference.paged_decode_attention(q, cache, tables, ctx, head_dim ** -0.5, window, cap)
    assert got.dtype == dtype and got.shape == q.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    else:  # float32 inside, one rounding to bf16 at the end: within half an ulp of bf16
        torch.testing.assert_close(got.double(), want.to(dtype).double(), atol=1e-2, rtol=8e-3)
        # and no further from the exact result than the reference (which rounds in between)
        assert (got.double() - want).abs().max() <= (ref.double() - want).abs().max() + 1e-6
    torch.testing.assert_close(got.float(), ref.float(), atol=4e-2, rtol=3e-2)
    empty = ctx == 0
    assert bool((got[empty] == 0).all())


@pytest.mark.parametrize("heads,head_dim,window", [((9, 3), 64, None), ((8, 2), 128, 40)])
def test_a_gqa_group_sharing_its_bf16_rows_gives_the_bits_of_one_kv_head_per_query(
        heads: tuple[int, int], head_dim: int, window: int | None) -> None:
    """bfloat16 K/V rows read by a GQA group are widened once and shared by its query heads;
    the same cache with each KV head repeated per query head (group of 1: every head widens
    its own rows) must give the same bits."""
    nh, kvh = heads
    lens = [1, 17, 150, 333, 40, 64, 65, 200]
    q, cache, tables, ctx = _case(torch.bfloat16, head_dim, heads, 16, lens, seed=5)
    expanded = allocate_kv_caches(3, cache.shape[1], 16, nh, head_dim, torch.bfloat16, "cpu")[1]
    expanded.copy_(cache.repeat_interleave(nh // kvh, dim=3))
    for rows in (slice(0, 8), slice(3, 4)):  # an item per sequence where 8 >= 4 x threads; per head
        shared = native.paged_decode_attention(q[rows], cache, tables[rows], ctx[rows], 0.1,
                                               window)
        alone = native.paged_decode_attention(q[rows], expanded, tables[rows], ctx[rows], 0.1,
                                              window)
        assert torch.equal(shared, alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sequence_gets_the_same_bits_whatever_its_batch(dtype: torch.dtype) -> None:
    """Few sequences run one item per KV head, many one item per sequence: same bits."""
    torch.manual_seed(1)
    lens = [int(n) for n in torch.randint(1, 400, (40,))]
    q, cache, tables, ctx = _case(dtype, 64, (9, 3), 16, lens, seed=1)
    batch = native.paged_decode_attention(q, cache, tables, ctx, 0.125)
    for i in (0, 17, 39):
        alone = native.paged_decode_attention(q[i : i + 1], cache, tables[i : i + 1],
                                              ctx[i : i + 1], 0.125)
        assert torch.equal(alone[0], batch[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.paged_decode_attention(q, cache, tables, ctx, 0.125), batch)
    finally:
        torch.set_num_threads(threads)


def test_block_ids_past_the_cache_are_refused_not_read() -> None:
    q, cache, tables, ctx = _case(torch.float32, 64, (4, 2), 16, [20, 40])
    tables[1, 2] = cache.shape[1] + 5  # covered by context 40 (blocks 0..2)
    with pytest.raises(KernelInputError, match=r"block_tables\[1, 2\]"):
        native.paged_decode_attention(q, cache, tables, ctx, 0.125)
    with pytest.raises(KernelInputError, match="context_lens"):
        native.paged_decode_attention(q, cache, tables[:, :1], ctx, 0.125)


def test_operands_it_does_not_take_go_to_the_reference() -> None:
    q, cache, tables, ctx = _case(torch.float16, 64, (4, 2), 16, [20, 40])
    before = native.calls["paged_decode_attention"]
    got = native.paged_decode_attention(q, cache, tables, ctx, 0.125)
    assert native.calls["paged_decode_attention"] == before
    assert torch.equal(got, reference.paged_decode_attention(q, cache, tables, ctx, 0.125))


def test_the_cpu_backend_is_the_references_with_the_native_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SPLITSERVE_KERNELS", raising=False)
    assert ops.get_ops("cpu") is cpu_ops
    native_ops = {"paged_decode_attention", "prefill_attention", "rms_norm", "rotary_store_kv",
                  "softcap", "silu_and_mul", "gelu_tanh_and_mul"}
    for name in native_ops:
        assert getattr(cpu_ops, name) is getattr(native, name)
    public = {n for n, f in vars(reference).items() if callable(f) and not n.startswith("_")
              and getattr(f, "__module__", "") == reference.__name__}
    assert public == set(cpu_ops.__all__)
    for name in public - native_ops:
        assert getattr(cpu_ops, name) is getattr(reference, name)
    monkeypatch.setenv("SPLITSERVE_KERNELS", "torch")
    assert ops.get_ops("cpu") is reference


def test_the_engine_decodes_through_it(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64)
    info = llm.engine.info()
    assert info["kernels"] == "cpu_ops" and info["native_kernels"] is not None
    before = dict(native.calls)
    out = llm.generate(["hello there"], SamplingParams(temperature=0.0, max_tokens=6,
                                                       ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6
    ran = {name: n - before.get(name, 0) for name, n in native.calls.items()
           if n != before.get(name, 0)}  # kernels other tests ran before stay out
    # attention: 5 decode steps x 2 layers (the first token comes from the prefill); every
    # one of the 6 forwards: rotary + store per layer, 2 norms per layer and the final one;
    # the greedy pick of each step's token; each layer's 4 projections (qkv, o, gate_up, down:
    # 64 wide), and the head (49,152 x 64 values) where the build takes weights that large
    # (AVX-512: WIDE_LINEAR_MAX), else oneDNN does
    head = 49152 * 64 <= native.linear_max()
    assert head == (49152 * 64 <= (native.WIDE_LINEAR_MAX if "avx512f" in cpu_flags()
                                   else native.SMALL_LINEAR_MAX))
    # The prompt's forward: layer 0's prompt attention; the last layer only for the sampled
    # (last) row, which attends as a decode row (model_runner._prune)
    assert ran == {"paged_decode_attention": 5 * 2 + 1, "rotary_store_kv": 6 * 2,
                   "rms_norm": 6 * (2 * 2 + 1), "argmax_rows": 6,
                   "linear_f32": 6 * (2 * 4 + head), "act_and_mul": 6 * 2,
                   "paged_prefill_attention": 1}


# One process, the build retried under each setting (the outcome is kept per process, so it is
# reset between them); SPLITSERVE_CACHE_DIR is empty, so nothing built before is found.
_FALLBACK = r"""
import json, logging, os, torch
from splitserve.kernels import native, reference
warned = []
logging.getLogger("splitserve.kernels.native").addHandler(
    type("H", (logging.Handler,), {"emit": lambda self, r: warned.append(r.getMessage())})())
q = torch.randn(2, 4, 64); cache = torch.randn(2, 8, 16, 2, 64)
tables = torch.arange(8, dtype=torch.int32).view(2, 4); ctx = torch.tensor([20, 50], dtype=torch.int32)
results = []
for setting in json.loads(os.environ["SETTINGS"]):
    os.environ.update(setting)
    native._status, native._lib, warned[:] = None, None, []
    st = native.status()
    native.status()  # asked again: no second warning
    same = torch.equal(native.paged_decode_attention(q, cache, tables, ctx, 0.125),
                       reference.paged_decode_attention(q, cache, tables, ctx, 0.125))
    x, w = torch.randn(3, 64), torch.rand(64)
    same &= all(torch.equal(a, b) for a, b in zip(native.rms_norm(x, w, 1e-6, x),
                                                  reference.rms_norm(x, w, 1e-6, x)))
    pos, slots = torch.tensor([3, 9]), torch.tensor([5, 40])
    table = reference.rope_cos_sin_cache(64, 16, 10000.0)
    caches = [cache.clone(), cache.clone()]
    same &= torch.equal(
        native.rotary_store_kv(pos, q, q[:, :2], q[:, 2:], table, caches[0], slots),
        reference.rotary_store_kv(pos, q, q[:, :2], q[:, 2:], table, caches[1], slots))
    same &= torch.equal(*caches)
    results.append({"available": st.available, "reason": st.reason, "same": same,
                    "calls": sum(native.calls.values()), "warnings": list(warned)})
    for key in setting:
        del os.environ[key]
print(json.dumps(results))
"""

FALLBACKS = [  # setting, what the reason must say
    ({"CC": "/bin/false"}, "failed on decode_attention.c"),
    ({"CC": "no-such-compiler"}, "no C compiler (no-such-compiler)"),
    ({"SPLITSERVE_NATIVE_KERNELS": "0"}, "SPLITSERVE_NATIVE_KERNELS=0"),
]


def test_without_a_build_the_reference_runs_and_says_why(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _FALLBACK], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "SPLITSERVE_CACHE_DIR": str(tmp_path),
             "SETTINGS": json.dumps([setting for setting, _ in FALLBACKS])},
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for (setting, why), out in zip(FALLBACKS, results, strict=True):
        assert not out["available"] and why in out["reason"], (setting, out)
        assert out["same"] and out["calls"] == 0, (setting, out)
        assert len(out["warnings"]) == 1 and why in out["warnings"][0], (setting, out)


_OTHER_BUILD = r"""
import json, sys, torch
sys.path.insert(0, ".")
from splitserve.kernels import native, reference
from tests.kernels.test_native import CASES, _case
st = native.status()
worst = 0.0
for dtype, head_dim, heads, block_size, lens, window, cap in CASES:
    q, cache, tables, ctx = _case(dtype, head_dim, heads, block_size, lens)
    got = native.paged_decode_attention(q, cache, tables, ctx, head_dim ** -0.5, window, cap)
    ref = reference.paged_decode_attention(q, cache, tables, ctx, head_dim ** -0.5, window, cap)
    worst = max(worst, (got.float() - ref.float()).abs().max().item())
g = torch.Generator().manual_seed(0)
x, w, b = (torch.randn(37, 72, generator=g), torch.randn(200, 72, generator=g),
           torch.randn(200, generator=g))
lin = native.small_linear(x, native.pack_linear_weight(w), 200, b)
lin_err = (lin.double() - torch.nn.functional.linear(x.double(), w.double(), b.double())).abs().max().item()
q, cache, tables, ctx = _case(*CASES[0][:5])
first = native.paged_decode_attention(q, cache, tables, ctx, CASES[0][1] ** -0.5, *CASES[0][5:])
q, cache, tables, ctx = _case(*CASES[3][:5])
first_bf16 = native.paged_decode_attention(q, cache, tables, ctx, CASES[3][1] ** -0.5, *CASES[3][5:])
from tests.kernels.test_native import quant_results
print(json.dumps({"quant": quant_results(), "lanes": native.int4_lanes(), "available": st.available, "reason": st.reason, "first": first.float().tolist(),
                  "first_bf16": first_bf16.float().tolist(),
                  "calls": native.calls["paged_decode_attention"] - 2, "linear_err": lin_err,
                  "linear": lin.tolist(),
                  "linear_calls": native.calls["linear_f32"], "linear_max": native.linear_max(),
                  "worst": worst, "path": st.reason.split()[1] if st.available else None}))
"""


def run_other_build(script: str, cflags: str, cache: Path) -> dict:  # type: ignore[type-arg]
    """``script`` in a fresh process whose native library is built with ``cflags`` into
    ``cache``: the JSON object its last line prints."""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "SPLITSERVE_CACHE_DIR": str(cache), "SPLITSERVE_NATIVE_CFLAGS": cflags},
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _quant_operands() -> tuple[dict[str, tuple[int, torch.Tensor]], torch.Tensor]:
    """Packed weights of every format ``quant_matmul`` serves, by name: (bits, weight), 40 x
    96 (two whole blocks of 16 output rows and a partial one): int4, int8, int8 with a scale
    per 16 values (``HALF``: GGUF Q6_K), int8 with zeros (``ZERO``: Q5_1 / Q5_K) and both
    (Q2_K); and 5 rows of activations."""
    g = torch.Generator().manual_seed(7)
    codes4 = torch.randint(0, 16, (40, 96), generator=g, dtype=torch.uint8)
    codes8 = torch.randint(-128, 128, (40, 96), generator=g, dtype=torch.int8)
    scales, offsets = torch.rand(40, 3, generator=g) * 0.01, torch.randn(40, 3, generator=g) * 0.05
    # float16 subnormals of both signs (below 2^-14): the scalar build decodes them in C, and
    # a negative one once came out positive there
    offsets[22, 1], offsets[3, 0], scales[9, 2] = -2.3e-5, 4.1e-6, 3.0e-5
    halves = torch.rand(40, 6, generator=g) * 0.01
    halves[5, 3] = -1.7e-5
    half_zeros = torch.randn(40, 6, generator=g) * 0.05
    half_zeros[17, 4] = -3.1e-6
    weights = {
        "int4": (4, native.pack_int4_weight(codes4, scales, offsets, 32)),
        "int8": (8, native.pack_int8_weight(codes8, scales, 32)),
        "int8_half": (8 | native.HALF, native.pack_int8_weight(codes8, halves, 16)),
        "int8_zero": (8 | native.ZERO, native.pack_int8_weight(codes8, scales, 32, offsets)),
        "int8_half_zero": (8 | native.HALF | native.ZERO,
                           native.pack_int8_weight(codes8, halves, 16, half_zeros)),
    }
    return weights, torch.randn(5, 96, generator=g)


def quant_results() -> dict[str, list]:  # type: ignore[type-arg]
    """``quant_matmul`` of each ``_quant_operands`` weight with 16-bit and (``a8``) 8-bit
    rows, as lists: what another build's process prints and this one compares bit for bit."""
    weights, x = _quant_operands()
    out = {}
    for name, (bits, w) in weights.items():
        out[name] = native.quant_matmul(bits, x, w, 40)[0].tolist()
        out[name + "a8"] = native.quant_matmul(bits | native.ACT8, x, w, 40)[0].tolist()
        # bfloat16 rows: outputs rounded to bfloat16 by each build's own vector store
        out[name + "a8_bf16"] = native.quant_matmul(
            bits | native.ACT8, x.bfloat16(), w, 40)[0].float().tolist()
    # exact integer outputs in [256, 754] (scales 1, dx 127 / 127): half of them ties of
    # bfloat16's rounding (round to even), which random outputs almost never are
    codes = torch.randint(-128, 128, (40, 96), generator=torch.Generator().manual_seed(5),
                          dtype=torch.int8)
    codes[:, 0], codes[:, 1] = 2, torch.arange(40, dtype=torch.int8) % 99 + 2
    xt = torch.zeros(5, 96)
    xt[:, 0], xt[:, 1] = 127.0, torch.arange(1, 6, dtype=torch.float32)
    out["ties_bf16"] = native.quant_matmul(
        8 | native.ACT8, xt.bfloat16(), native.pack_int8_weight(codes, torch.ones(40, 3), 32),
        40)[0].float().tolist()
    # 18 groups a row: AVX-512 quantizes rows 16 groups at a time, so a second, partial batch
    g18 = torch.Generator().manual_seed(9)
    x18 = torch.randn(3, 576, generator=g18) * torch.rand(1, 576, generator=g18) * 4
    w18 = native.pack_int4_weight(
        torch.randint(0, 16, (24, 576), generator=g18, dtype=torch.uint8),
        torch.rand(24, 18, generator=g18) * 0.01, torch.randn(24, 18, generator=g18) * 0.05, 32)
    out["int4_k576"] = native.quant_matmul(4, x18, w18, 24)[0].tolist()
    out["int4_k576a8"] = native.quant_matmul(4 | native.ACT8, x18.bfloat16(), w18, 24)[0].float().tolist()
    return out


def _disassembly(path: str) -> str:
    dump = subprocess.run(["objdump", "-d", path], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    return dump.stdout


def _zmm(path: str) -> bool:
    return "zmm" in _disassembly(path)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump comes with gcc's binutils")
def test_the_avx2_build_agrees_with_the_reference_too(tmp_path: Path) -> None:
    """Machines of this kind differ (AVX-512 or only AVX2): the code -march=haswell gives is
    built and checked here as well, whatever this machine has."""
    out = run_other_build(_OTHER_BUILD, "-march=haswell", tmp_path)
    assert out["available"] and "-march=haswell" in out["reason"], out
    assert out["calls"] == len(CASES) and out["worst"] < 4e-2, out
    assert out["linear_calls"] == 1 and out["linear_err"] < 1e-4, out
    # AVX2 builds take only small weights (not measured on AVX2-only hardware)
    assert out["linear_max"] == native.SMALL_LINEAR_MAX < native.WIDE_LINEAR_MAX, out
    g = torch.Generator().manual_seed(0)  # the same operands here: the same FMA chains, bits
    x, w, b = (torch.randn(37, 72, generator=g), torch.randn(200, 72, generator=g),
               torch.randn(200, generator=g))
    assert torch.equal(native.small_linear(x, native.pack_linear_weight(w), 200, b),
                       torch.tensor(out["linear"]))
    # the same bits as this machine's build: AVX2 sums each key's lanes one row at a time,
    # AVX-512 16 rows at once, in the same pairs and order
    q, cache, tables, ctx = _case(*CASES[0][:5])
    here = native.paged_decode_attention(q, cache, tables, ctx, CASES[0][1] ** -0.5, *CASES[0][5:])
    assert torch.equal(here.float(), torch.tensor(out["first"])), "AVX2 and native builds differ"
    # bfloat16 scores by pairs: vdpbf16ps where the CPU has it, float32 vectors in its order
    # (and its flushing of zero exponents) elsewhere
    q, cache, tables, ctx = _case(*CASES[3][:5])
    here = native.paged_decode_attention(q, cache, tables, ctx, CASES[3][1] ** -0.5, *CASES[3][5:])
    assert torch.equal(here.float(), torch.tensor(out["first_bf16"])), "bf16 scores differ"
    # the quantized matmuls' exact integer sums and per-group FMAs: the same bits too
    assert out["lanes"] == 8 and native.int4_lanes() in (8, 16), out["lanes"]
    here = quant_results()
    assert len(here) == 18 and here == out["quant"], [k for k in here if here[k] != out["quant"][k]]
    assert not _zmm(out["path"])  # AVX2 code: no 512-bit registers
    if "avx512f" in cpu_flags():  # and this machine's own build does use them
        assert _zmm(native.status().reason.split()[1])
    # the bf16 scores above ran vdpbf16ps here where the CPU has it, its emulation there
    assert "vdpbf16ps" not in _disassembly(out["path"])
    if "avx512_bf16" in cpu_flags():
        assert "vdpbf16ps" in _disassembly(native.status().reason.split()[1])
