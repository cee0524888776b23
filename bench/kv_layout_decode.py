"""A/B: CPU engine throughput with the block-major KV pool vs per-layer contiguous caches.

One ``LLM`` (SmolLM2-135M, float32, torch references); its runner's caches are swapped
between the two layout kinds of kernels/kv_cache.py before each run, alternating, so both
see the same machine load. Same prompts, greedy; the outputs must be identical token for
token. Prints the best tok/s of each and their ratio (block_major / layer_major).

    python bench/kv_layout_decode.py [NUM_REQUESTS PROMPT_LEN OUTPUT_LEN] (default 8 192 48)
"""

from __future__ import annotations

import random
import sys
import time

from splitserve import LLM, SamplingParams
from splitserve.kernels.kv_cache import BLOCK_MAJOR, LAYER_MAJOR, allocate_kv_caches, layout_kind

REPS = 3


def main() -> None:
    n, prompt_len, out_len = (int(a) for a in (sys.argv[1:4] or ("8", "192", "48")))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt_len)] for _ in range(n)]
    llm = LLM(kv_cache_memory_bytes=1 << 30, max_num_seqs=n, dtype="float32", quantization="none")
    runner = llm.engine.runner
    first = runner.kv_caches[0]
    _, num_blocks, block_size, heads, head_dim = first.shape
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    rates: dict[str, list[float]] = {LAYER_MAJOR: [], BLOCK_MAJOR: []}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(REPS):
        for kind in rates:
            runner.kv_caches = allocate_kv_caches(
                len(runner.kv_caches), num_blocks, block_size, heads, head_dim, first.dtype,
                first.device, kind,
            )
            assert layout_kind(runner.kv_caches) == kind
            llm.engine.kv.pool.reset_prefix_cache()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            rates[kind].append(n * out_len / (time.perf_counter() - t0))
            tokens[kind] = [list(o.outputs[0].token_ids) for o in outs]
    assert tokens[BLOCK_MAJOR] == tokens[LAYER_MAJOR], "the layouts must give the same tokens"
    print(f"{n} requests x {prompt_len} prompt tokens, {out_len} out; output tok/s, best of {REPS}")
    for kind, values in rates.items():
        print(f"  {kind:<12} {max(values):8.1f}   (runs: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"block_major / layer_major = {max(rates[BLOCK_MAJOR]) / max(rates[LAYER_MAJOR]):.3f}")


if __name__ == "__main__":
    main()
