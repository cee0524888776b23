"""Layer-wise KV streaming on real Ray and UCX (1 prefill + 1 decode worker, a 4-layer model).

With ``SPLITSERVE_KV_LAYERWISE=1`` the prefill worker publishes a request's KV params before
the forward of its last prompt chunk and serves each layer as it is computed; the decode
worker pulls every layer group as it becomes ready and runs the request once all of them are
verified and the first token arrived. ``SPLITSERVE_TEST_KV_STREAM_HOLD_S`` pauses the prefill
forward after its first layer until a read of it was sent, so "served before the forward
ended" holds on any machine (it is a wait on a condition, bounded, not a sleep).
"""

from __future__ import annotations

import concurrent.futures

import pytest
import ray

from splitserve import LLM, Cluster, SamplingParams
from tests.utils import assert_workers_intact, make_tiny_llama, random_prompts, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.ucx]

LAYERS = 4
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("lw") / "tiny4", tokenizer_dir, layers=LAYERS)


def _cluster(model_dir) -> Cluster:
    return Cluster.local(prefill=1, decode=1, model=str(model_dir),
                         kv_cache_memory_bytes=16 << 20, router={"local_prefill_max_tokens": 0},
                         kv_transfer={"lease_s": 10.0})


def _stats(handle) -> dict:
    return ray.get(handle.actor.stats.remote())


def test_streamed_pd_equals_monolithic_and_overlaps(model_dir, monkeypatch) -> None:
    monkeypatch.setenv("SPLITSERVE_KV_LAYERWISE", "1")  # workers see both (runtime env)
    monkeypatch.setenv("SPLITSERVE_TEST_KV_STREAM_HOLD_S", "20")
    prompts = random_prompts(3, seed=5, lo=40, hi=160)
    want = [o.outputs[0].token_ids for o in LLM(str(model_dir)).generate(prompts, PARAMS)]
    with _cluster(model_dir) as cluster:
        got = [o.outputs[0].token_ids for o in cluster.generate(prompts, PARAMS)]
        prefill = next(h for h in cluster.workers.values() if h.role == "prefill")
        decode = next(h for h in cluster.workers.values() if h.role == "decode")
        wait_until(lambda: _stats(prefill)["num_held_kv"] == 0, "the prefill leases to end")
        p, d = _stats(prefill), _stats(decode)
        assert_workers_intact(cluster.workers.values())
    assert got == want
    assert p["kv_stream_offers"] == 3
    # each request's first layer went out while its forward was held after that layer
    assert p["kv_stream_early_reads"] >= 3
    assert d["kv_streamed_transfers"] == 3
    assert d["kv_stream_groups"] == 3 * LAYERS  # one verified group per layer, not one pull
    assert d["num_remote_fallbacks"] == 0 and d["kv_transfer_failures"] == 0
    assert p["num_free_blocks"] == p["num_blocks"] and d["num_free_blocks"] == d["num_blocks"]


def test_prefill_killed_mid_stream_is_recomputed(model_dir, monkeypatch) -> None:
    """The prefill forward is held after its first layer and that layer's send is delayed:
    the worker is killed mid-forward with the decode worker's reads in flight. The decode
    worker recomputes the prompt itself (no first token comes) and nothing leaks."""
    monkeypatch.setenv("SPLITSERVE_KV_LAYERWISE", "1")
    monkeypatch.setenv("SPLITSERVE_TEST_KV_STREAM_HOLD_S", "60")
    monkeypatch.setenv("SPLITSERVE_TEST_KV_SEND_DELAY_S", "30")
    prompt = random_prompts(1, seed=9, lo=100, hi=101)[0]
    want = LLM(str(model_dir)).generate([prompt], PARAMS)[0].outputs[0].token_ids
    with _cluster(model_dir) as cluster:
        prefill = next(h for h in cluster.workers.values() if h.role == "prefill")
        decode = next(h for h in cluster.workers.values() if h.role == "decode")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            result = pool.submit(cluster.generate, [prompt], PARAMS)
            wait_until(lambda: _stats(decode)["num_loading_kv"] == 1,
                  "the decode worker to pull while the prefill forward is held")
            prefill.actor.die.remote()
            tokens = result.result(timeout=120)[0].outputs[0].token_ids
        d = _stats(decode)
        assert_workers_intact(h for h in cluster.workers.values() if h.healthy)
    assert tokens == want
    assert d["num_remote_fallbacks"] == 1 and d["kv_streamed_transfers"] == 0
    assert d["num_free_blocks"] == d["num_blocks"]

