"""A prefill worker killed while the decode worker pulls its KV: the request still completes,
prefilled again (on the decode worker), with the tokens of a fault-free run. The only decode
worker killed mid-stream: the stream waits for its replacement and ends equal too."""

from __future__ import annotations

import os

import pytest
import ray

from splitserve import LLM, Cluster, SamplingParams
from tests.utils import assert_workers_intact, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.ucx]


def test_prefill_killed_mid_transfer(tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setenv("SPLITSERVE_TEST_KV_SEND_DELAY_S", "3")  # workers see it (runtime env)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompt = list(range(300, 420))
    want = LLM(str(tiny_model_dir)).generate([prompt], params)[0].outputs[0].token_ids
    with Cluster.local(prefill=1, decode=1, model=str(tiny_model_dir),
                       kv_cache_memory_bytes=16 << 20, router={"local_prefill_max_tokens": 0},
                       kv_transfer={"lease_s": 10.0}) as cluster:
        prefill = next(h for h in cluster.workers.values() if h.role == "prefill")
        decode = next(h for h in cluster.workers.values() if h.role == "decode")
        stream = cluster.stream(prompt, params)
        tokens = list(next(stream).outputs[0].token_ids)  # the first token, from prefill
        wait_until(lambda: ray.get(decode.actor.stats.remote())["num_loading_kv"] == 1,
              "the decode worker to be pulling (the prefill side sleeps in send)")
        prefill.actor.die.remote()
        for delta in stream:
            tokens += delta.outputs[0].token_ids
        stats = cluster.status()
        decode_stats = next(w for w in stats["workers"] if w["worker_id"] == decode.worker_id)
        assert_workers_intact(h for h in cluster.workers.values() if h.healthy)
    assert tokens == want
    assert decode_stats["num_remote_fallbacks"] == 1
    assert decode_stats["num_free_blocks"] == decode_stats["num_blocks"]
    assert os.environ["SPLITSERVE_TEST_KV_SEND_DELAY_S"] == "3"


def test_only_decode_worker_killed_mid_stream(tiny_model_dir) -> None:
    # outlives the kill; the replay computes the prompt again, prompt logprobs too, which the
    # client still gets once
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True, prompt_logprobs=1)
    prompt = list(range(500, 560))
    want = LLM(str(tiny_model_dir)).generate([prompt], params)[0].outputs[0].token_ids
    with Cluster.local(prefill=1, decode=1, model=str(tiny_model_dir),
                       kv_cache_memory_bytes=16 << 20, router={"local_prefill_max_tokens": 0}
                       ) as cluster:
        decode = next(h for h in cluster.workers.values() if h.role == "decode")
        tokens: list[int] = []
        carrying = 0
        for delta in cluster.stream(prompt, params):
            tokens += delta.outputs[0].token_ids
            carrying += delta.prompt_logprobs is not None
            if len(tokens) == 5:
                decode.actor.die.remote()  # the role has no other worker
        status = cluster.status()
        assert_workers_intact(h for h in cluster.workers.values() if h.healthy)
    assert tokens == want
    live = [w for w in status["workers"] if w["role"] == "decode" and w["healthy"]]
    assert len(live) == 1 and live[0]["worker_id"] != decode.worker_id
    assert status["counters"]["workers_replaced"] == 1
    assert status["counters"]["replays"] == 1  # the stream went on from its tokens so far
    assert carrying == 1

