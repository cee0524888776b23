"""Speculative decoding on the decode worker of a real 1P+1D cluster (Ray, UCX, tiny model).

The decode role runs suffix decoding; the prefill worker and the reference engine run none.
A random model never copies its prompt, so drafts come from the suffix proposer's global
trie of earlier outputs: the second time a request runs on a decode worker, that worker
proposes (and the target model accepts) its earlier continuation. Tests run in file order:

1. greedy requests, twice: token for token equal to a single engine without speculation,
   with the prompts' KV pulled over UCX and drafts accepted on the decode worker;
2. seeded sampling: a run without a fault, then the same requests while the decode worker is
   SIGKILLed mid-stream (it was accepting drafts): the streams are replayed on its
   replacement (which re-prefills prompt + tokens so far) and the output equals the
   fault-free run and the single engine; a third run on the replacement, whose trie learned
   the replayed streams, accepts drafts and is still unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from typing import Any

import pytest

from splitserve import LLM, Cluster, SamplingParams
from tests.utils import assert_workers_intact, random_prompts, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.ucx]

SPEC = {"method": "suffix", "num_speculative_tokens": 4}


@pytest.fixture(scope="module")
def single(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=1024)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    with Cluster.local(prefill=1, decode=1, model=str(tiny_model_dir),
                       kv_cache_memory_bytes=16 << 20,
                       roles={"decode": {"speculative_config": SPEC}},
                       router={"local_prefill_max_tokens": 0}, kv_transfer={"lease_s": 8.0},
                       registry={"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0}) as c:
        yield c
        assert_workers_intact(h for h in c.workers.values() if h.healthy)


def _prompts(n: int, seed: int, lo: int = 20, hi: int = 90) -> list[list[int]]:
    return random_prompts(n, seed, lo, hi)


def _tokens(outs: list[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _workers(cluster: Cluster, role: str) -> list[dict[str, Any]]:
    return [w for w in cluster.status()["workers"] if w["role"] == role and w["healthy"]]


_wait = functools.partial(wait_until, timeout_s=300.0, poll_s=0.1)


def _all_free(cluster: Cluster) -> bool:
    return all(w["num_free_blocks"] == w["num_blocks"] and w["num_held_kv"] == 0
               for w in cluster.status()["workers"] if w["healthy"])


def test_decode_worker_speculates_and_equals_single_engine(cluster: Cluster, single: LLM) -> None:
    prompts = _prompts(6, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = _tokens(single.generate(prompts, params))
    [before] = _workers(cluster, "decode")
    assert before["spec_decode_num_drafts"] == 0  # speculation is configured on decode ...
    assert "spec_decode_num_drafts" not in _workers(cluster, "prefill")[0]  # ... and only there
    first = _tokens(cluster.generate(prompts, params))
    again = _tokens(cluster.generate(prompts, params))  # now the suffix trie knows them
    assert first == want and again == want
    [after] = _workers(cluster, "decode")
    # every prompt went through the prefill worker and its KV was pulled, not recomputed
    assert after["kv_transfers"] - before["kv_transfers"] == 2 * len(prompts)
    assert after["kv_transfer_bytes"] > before["kv_transfer_bytes"]
    assert after["num_remote_fallbacks"] == before["num_remote_fallbacks"]
    # the decode worker verified drafts and kept most of them (the repeat run copies itself)
    assert after["spec_decode_num_draft_tokens"] > 0
    assert after["spec_decode_num_accepted_tokens"] > len(prompts) * 10
    assert after["spec_decode_mean_accepted_length"] > 1.5
    _wait(lambda: _all_free(cluster), "every block to be free again", timeout_s=30.0)


def test_seeded_sampling_replayed_after_a_sigkill_is_unchanged(
    cluster: Cluster, single: LLM
) -> None:
    prompts = _prompts(4, seed=1, lo=30, hi=60)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=29, max_tokens=100, ignore_eos=True)
    want = _tokens(single.generate(prompts, params))
    assert _tokens(cluster.generate(prompts, params)) == want  # fault-free, and trains the trie
    [victim] = [h for h in cluster.workers.values() if h.role == "decode" and h.healthy]
    replays, replaced = cluster.counters["replays"], cluster.counters["workers_replaced"]
    seen: dict[str, Any] = {}

    async def run() -> list[list[int]]:
        got: list[list[int]] = [[] for _ in prompts]
        started = asyncio.Event()

        async def one(i: int) -> None:
            async for d in cluster.astream(prompts[i], params):
                got[i] += d.outputs[0].token_ids
                if all(len(g) >= 8 for g in got):
                    started.set()

        before = await victim.actor.stats.remote()
        tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
        await started.wait()
        seen["stats"] = await victim.actor.stats.remote()
        seen["streams"] = cluster.flights.num_on(victim.worker_id)
        seen["accepted"] = (seen["stats"]["spec_decode_num_accepted_tokens"]
                            - before["spec_decode_num_accepted_tokens"])
        os.kill(int(victim.info["pid"]), signal.SIGKILL)
        await asyncio.gather(*tasks)
        return got

    assert asyncio.run(run()) == want
    assert seen["streams"] > 0  # it held streams when it died ...
    assert seen["accepted"] > 0  # ... and had been accepting drafts for them
    assert cluster.counters["replays"] > replays  # they were replayed on another worker
    assert not victim.healthy and cluster.counters["workers_replaced"] == replaced + 1
    [fresh] = [h for h in cluster.workers.values() if h.role == "decode" and h.healthy]
    fresh_stats = _workers(cluster, "decode")[0]
    assert fresh_stats["worker_id"] == fresh.worker_id != victim.worker_id
    # the replacement learned from the replayed streams: the next run copies them, unchanged
    assert _tokens(cluster.generate(prompts, params)) == want
    assert _workers(cluster, "decode")[0]["spec_decode_num_accepted_tokens"] > 0
    _wait(lambda: _all_free(cluster), "every block to be free again", timeout_s=30.0)
