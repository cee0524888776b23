"""The colocated cluster (``splitserve serve``'s default on a machine with fewer devices than
roles): decode workers prefill every prompt, no prefill worker, on real Ray and as child
processes without Ray (``runtime: processes``, what ``serve`` picks for it), tiny model.

Checks the mechanism (every request placed as a local prefill, no KV pulled, no prefill
worker, ``status()["layout"]``) and that the cluster's features still hold without the
prefill role: equality with the single engine, abort freeing blocks, and streams replayed
after their decode worker is killed.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve import LLM, Cluster, SamplingParams
from tests.utils import assert_workers_intact, random_prompts

pytestmark = [pytest.mark.ray]

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(n: int, seed: int, lo: int = 70, hi: int = 140) -> list[list[int]]:
    return random_prompts(n, seed, lo, hi)


@pytest.fixture(scope="module")
def single(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=1024)


@pytest.fixture(scope="module", params=["ray", "processes"])
def cluster(tiny_model_dir, request):
    with Cluster.local(prefill=0, decode=2, model=str(tiny_model_dir), runtime=request.param,
                       kv_cache_memory_bytes=16 << 20,
                       registry={"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0}) as c:
        yield c
        assert_workers_intact(h for h in c.workers.values() if h.healthy)


def _free_everywhere(cluster: Cluster, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        workers = [w for w in cluster.status()["workers"] if w["healthy"]]
        if all(w["num_free_blocks"] == w["num_blocks"] for w in workers):
            return workers
        if time.monotonic() > deadline:
            return workers
        time.sleep(0.1)


def test_long_prompts_prefill_on_decode_and_equal_the_single_engine(
    cluster: Cluster, single: LLM
) -> None:
    status = cluster.status()
    assert status["layout"]["mode"] == "colocated"
    assert status["roles"] == {"decode": 2} and cluster.config.roles.prefill.replicas == 0
    prompts = _prompts(8, seed=0)  # 70-140 tokens: past any token bound of P/D mode
    local_before = cluster.counters["route:local_prefill"]
    got = [o.outputs[0].token_ids for o in cluster.generate(prompts, GREEDY)]
    assert got == [o.outputs[0].token_ids for o in single.generate(prompts, GREEDY)]
    assert cluster.counters["route:local_prefill"] - local_before == len(prompts)
    workers = cluster.status()["workers"]
    assert all(w["role"] == "decode" for w in workers)
    assert sum(w["kv_transfers"] for w in workers) == 0  # no KV moved between workers
    assert sum(w["prefix_cache_queries"] for w in workers) >= len(prompts)


def test_workers_of_a_local_ray_run_at_the_drivers_priority(cluster: Cluster) -> None:
    """Ray nices its workers to 15; the Ray a cluster starts runs them at 0, like the driver
    (and a single-engine server), so other processes do not take their CPU first."""
    import psutil

    if cluster.config.runtime != "ray":
        pytest.skip("process workers are plain children of the driver (no Ray niceness)")
    assert cluster.launcher is not None and cluster.launcher.started_ray  # its own Ray
    for h in cluster.workers.values():
        assert psutil.Process(h.info["pid"]).nice() == 0, h.worker_id


def test_abort_mid_stream_frees_the_blocks(cluster: Cluster) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    stream = cluster.stream(_prompts(1, seed=3)[0], params, request_id="abort-me")
    assert next(stream).outputs[0].token_ids
    cluster.abort("abort-me")
    rest = list(stream)
    assert rest and rest[-1].outputs[0].finish_reason == "abort"
    for w in _free_everywhere(cluster):
        assert w["num_free_blocks"] == w["num_blocks"]


def test_decode_worker_killed_mid_stream_is_replayed(cluster: Cluster, single: LLM) -> None:
    prompts = _prompts(6, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, params)]

    async def run() -> list[list[int]]:
        got: list[list[int]] = [[] for _ in prompts]
        started = asyncio.Event()

        async def one(i: int) -> None:
            async for d in cluster.astream(prompts[i], params):
                got[i] += d.outputs[0].token_ids
                if len(got[i]) >= 3:
                    started.set()

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
        await started.wait()
        decodes = [h for h in cluster.workers.values() if h.role == "decode" and h.healthy]
        victim = max(decodes, key=lambda h: cluster.flights.num_on(h.worker_id))
        assert cluster.flights.num_on(victim.worker_id) > 0  # it holds streams when it dies
        victim.actor.die.remote()
        await asyncio.gather(*tasks)
        return got

    replays = cluster.counters["replays"]
    assert asyncio.run(run()) == want
    assert cluster.counters["replays"] > replays
