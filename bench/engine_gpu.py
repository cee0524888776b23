"""The engine on a GPU: Triton kernels vs the torch references, same requests, same run.

Builds a random Llama (SmolLM2-like tokenizer, larger body) as a Hugging Face folder, then
for float32 and bfloat16 runs the same greedy requests through the engine with
``SPLITSERVE_KERNELS=torch`` and ``=triton`` on CUDA. Prints how many requests agree token
for token, and output tokens/s of each backend with the ratio. Runs from a bare checkout
(no install): the repo's folders are mapped onto the ``splitserve`` namespace.

    python bench/engine_gpu.py --tokenizer DIR [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import splitserve  # noqa: E402

if str(ROOT) not in splitserve.__path__:
    splitserve.__path__.append(str(ROOT))  # splitserve.roles -> roles/, as pyproject maps it

import torch  # noqa: E402

from tests.utils import make_tiny_llama  # noqa: E402

DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run(folder: Path, backend: str, dtype: str, prompts: list[list[int]], out_len: int,
        checks: bool) -> tuple[list[list[int]], float]:
    os.environ["SPLITSERVE_KERNELS"] = backend
    os.environ["SPLITSERVE_KERNEL_CHECKS"] = "1" if checks else "0"
    from splitserve import LLM, SamplingParams

    llm = LLM(str(folder), device=DEVICE, dtype=dtype, kv_cache_memory_bytes=8 << 30,
              max_num_seqs=256, max_num_batched_tokens=8192)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompts[:2], params)  # warm-up (Triton compiles here)
    llm.engine.kv.pool.reset_prefix_cache()
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    elapsed = time.perf_counter() - t0
    del llm
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs], len(prompts) * out_len / elapsed


def diagnose(folder: Path, dtype: str) -> dict[str, float]:
    """Top-5 log-probabilities of the first 3 tokens of a few prompts, torch vs Triton."""
    from splitserve import LLM, SamplingParams

    rng = random.Random(5)
    prompts = [[rng.randrange(100, 49000) for _ in range(n)] for n in (5, 100, 600, 1500)]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=5)
    runs = {}
    for backend in ("torch", "triton"):
        os.environ["SPLITSERVE_KERNELS"] = backend
        llm = LLM(str(folder), device=DEVICE, dtype=dtype, kv_cache_memory_bytes=2 << 30)
        runs[backend] = llm.generate(prompts, params)
        del llm
    worst, same = 0.0, 0
    for a, b in zip(runs["torch"], runs["triton"], strict=True):
        ca, cb = a.outputs[0], b.outputs[0]
        same += ca.token_ids == cb.token_ids
        for step_a, step_b in zip(ca.logprobs, cb.logprobs, strict=True):
            for tok, lp in step_a.items():
                if tok in step_b:
                    worst = max(worst, abs(lp.logprob - step_b[tok].logprob))
    print(f"diagnose {dtype}: {same}/4 prompts with equal first 3 tokens; "
          f"max |logprob diff| {worst:.2e}", flush=True)
    return {f"{dtype}_diag_equal": same, f"{dtype}_diag_max_logprob_diff": worst}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run (use TRITON_INTERPRET=1)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--diagnose-only", action="store_true", help="logprob comparison only")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    folder = make_tiny_llama(Path(tempfile.mkdtemp()) / "llama-gpu", args.tokenizer,
                             hidden=args.hidden, layers=args.layers, heads=16, kv_heads=4,
                             intermediate=args.hidden * 11 // 4, max_pos=4096, seed=1)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(16, args.max_prompt))]
               for _ in range(args.num_requests)]
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, "
          f"{len(prompts)} requests x {args.output_len} tokens", flush=True)
    result: dict[str, float] = {}
    for dtype in ("float32", "bfloat16"):
        result.update(diagnose(folder, dtype))
    if args.diagnose_only:
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    rows = []
    for dtype in ("float32", "bfloat16"):
        toks_t, rate_t = run(folder, "torch", dtype, prompts, args.output_len, checks=False)
        toks_k, rate_k = run(folder, "triton", dtype, prompts, args.output_len, checks=True)
        _, rate_fast = run(folder, "triton", dtype, prompts, args.output_len, checks=False)
        same = sum(a == b for a, b in zip(toks_t, toks_k, strict=True))
        first = sum(a[:8] == b[:8] for a, b in zip(toks_t, toks_k, strict=True))
        rows.append((dtype, same, first, rate_t, rate_k, rate_fast))
        result.update({f"{dtype}_identical": same, f"{dtype}_first8_identical": first,
                       f"{dtype}_torch_tok_s": round(rate_t, 1),
                       f"{dtype}_triton_tok_s": round(rate_k, 1),
                       f"{dtype}_triton_nochecks_tok_s": round(rate_fast, 1),
                       f"{dtype}_speedup": round(rate_fast / rate_t, 2)})
    print(f"\n| dtype | identical (of {len(prompts)}) | first 8 identical | torch tok/s | "
          "triton tok/s (checks) | triton tok/s (no checks) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for dtype, same, first, rt, rk, rf in rows:
        print(f"| {dtype} | {same} | {first} | {rt:.0f} | {rk:.0f} | {rf:.0f} | {rf / rt:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
