"""An fp8 KV cache through the disaggregated cluster (1 prefill + 1 decode on real Ray and UCX):
the decode worker pulls fp8 bytes (no more than one byte per element of the prompts' blocks)
and the tokens are the single fp8 engine's; both workers and ``formats()`` report the dtype."""

from __future__ import annotations

import random

import pytest

from splitserve import LLM, Cluster, SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.ucx]


def test_fp8_kv_through_prefill_and_decode_workers(tiny_model_dir) -> None:
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 49000) for _ in range(rng.randint(20, 70))] for _ in range(4)]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    single = LLM(str(tiny_model_dir), kv_cache_dtype="fp8", num_kv_blocks=128)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, greedy)]
    with Cluster.local(prefill=1, decode=1, model=str(tiny_model_dir), kv_cache_dtype="fp8",
                       kv_cache_memory_bytes=4 << 20,
                       router={"local_prefill_max_tokens": 0}) as cluster:
        got = [o.outputs[0].token_ids for o in cluster.generate(prompts, greedy)]
        workers = [w for w in cluster.status()["workers"] if w["healthy"]]
        formats = cluster.formats()
    assert got == want
    assert formats["kv_cache_dtype"] == "float8_e4m3fn"
    assert {w["role"] for w in workers} == {"prefill", "decode"}
    assert all(w["formats"]["kv_cache_dtype"] == "float8_e4m3fn" for w in workers)
    decode = next(w for w in workers if w["role"] == "decode")
    assert decode["kv_transfers"] >= len(prompts) - 1 and decode["kv_transfer_failures"] == 0
    # tiny Llama: 2 layers x K/V x 16 tokens x 2 KV heads x 16 dims, one byte each
    per_block = 2 * 2 * 16 * 2 * 16
    most = sum(-(-len(p) // 16) for p in prompts) * per_block
    assert 0 < decode["kv_transfer_bytes"] <= most  # float32 would be 4x the blocks' bytes
    assert decode["kv_transfer_bytes"] % per_block == 0
