"""The SLO planner on a real cluster (tiny model, Ray, UCX): a load that shifts from long
prompts / short outputs to short prompts / long outputs makes it flip a decode worker to
prefill, then a prefill worker back to decode (draining first); every request's output
equals the single engine's; the decisions show in ``/metrics`` counters and ``status()``.

The planner sizes roles from a cost-model profile, not from this machine's timings, so the
test gives it a profile (in tmp) under which the first phase is prefill-bound and the
second decode-bound; the decisions then follow the load's shape, however busy the machine.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve import LLM, Cluster, SamplingParams
from splitserve.cluster.frontends.metrics import _LoadCollector
from splitserve.router.sim.cost_model import CostModel
from tests.utils import assert_workers_intact

pytestmark = [pytest.mark.ray, pytest.mark.ucx, pytest.mark.slow, pytest.mark.timeout(1500)]

LONG = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
SHORT = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 49000) for _ in range(n)]


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)  # poll interval


def _profile(path: Path) -> str:
    # Prefill 1 ms/token (a 400-token prompt: 0.41 s); decode steps 50 ms and one 512-token
    # KV block per worker, so a worker holds about 12 of the second phase's requests.
    CostModel(
        name="planner-test", prefill_overhead_s=0.01, prefill_s_per_token=1e-3,
        prefill_s_per_token_pair=0.0, decode_step_overhead_s=0.05, decode_s_per_kv_token=1e-7,
        kv_capacity_blocks=1,
    ).save(path)
    return str(path)


def _planned_cluster(model: Path, tmp_path: Path) -> Cluster:
    """1P+2D with the planner on (fast intervals, the test profile); every prompt prefilled on
    the prefill workers."""
    planner = {"enabled": True, "interval_s": 0.25, "window_s": 2.0, "cooldown_s": 1.0,
               "cost_model": _profile(tmp_path / "profile.json"), "drain_timeout_s": 240.0}
    return Cluster.local(prefill=1, decode=2, model=str(model), kv_cache_memory_bytes=16 << 20,
                         planner=planner, router={"local_prefill_max_tokens": 0},
                         slo={"ttft_ms": 5000, "tpot_ms": 100})


def test_planner_flips_roles_as_the_mix_shifts(tiny_model_dir: Path, tmp_path: Path) -> None:
    single = LLM(str(tiny_model_dir), num_kv_blocks=1024)
    with _planned_cluster(tiny_model_dir, tmp_path) as cluster:
        rng = random.Random(0)
        sent: list[tuple[list[int], SamplingParams, Future]] = []
        stop = threading.Event()
        phase = {"params": LONG, "length": 400}

        def load(pool: ThreadPoolExecutor) -> None:
            while not stop.is_set():  # open loop: ~4 requests/s whatever the service time
                prompt = _prompt(rng, phase["length"])
                params = phase["params"]
                sent.append((prompt, params, pool.submit(cluster.generate, [prompt], params)))
                stop.wait(0.25)  # pacing of the load generator, not a synchronisation

        def flips(action: str) -> int:
            return cluster.status()["planner"]["decisions"].get(action, 0)

        with ThreadPoolExecutor(32) as pool:
            driver = threading.Thread(target=load, args=(pool,), daemon=True)
            driver.start()
            try:
                _wait(lambda: flips("flip_to_prefill") >= 1, 400)
                _wait(lambda: cluster.status()["roles"] == {"prefill": 2, "decode": 1},
                         400)
                phase.update(params=SHORT, length=20)
                _wait(lambda: flips("flip_to_decode") >= 1, 400)
                _wait(lambda: cluster.status()["roles"] == {"prefill": 1, "decode": 2},
                         400)
            finally:
                stop.set()
                driver.join()
            outputs = [(p, params, f.result(timeout=300)) for p, params, f in sent]

        status = cluster.status()
        planner_status = status["planner"]
        assert planner_status["enabled"] and planner_status["failed"] == 0
        actions = [h["action"] for h in planner_status["history"]]
        assert actions[0] == "flip_to_prefill" and "flip_to_decode" in actions
        # No request lost or changed across the flips.
        for prompt, params, out in outputs:
            expected = single.generate([prompt], params)[0].outputs[0].token_ids
            assert out[0].outputs[0].token_ids == expected
        # The decisions in /metrics.
        collector = _LoadCollector()
        collector.counters = dict(cluster.counters)
        samples = {
            s.labels.get("action"): s.value
            for family in collector.collect() if family.name == "splitserve:planner_decisions"
            for s in family.samples if s.name.endswith("_total")
        }
        assert samples["flip_to_prefill"] >= 1 and samples["flip_to_decode"] >= 1
        assert_workers_intact(h for h in cluster.workers.values() if h.healthy)


def test_a_worker_killed_as_its_flip_drains_it_is_not_replaced(tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    """The flip's victim dies (SIGKILL, a real process) as its drain begins: the drain counts
    it drained, the health loop does not replace it (it was leaving), the flip still starts
    its prefill twin, so the cluster ends at the planned 2P+1D and not 2P+2D; every request
    (those on the victim replayed) equals the single engine's. The drain is wrapped only to
    time the kill: its first step marks the worker draining, as ``Scaler.drain`` does."""
    import os
    import signal

    single = LLM(str(tiny_model_dir), num_kv_blocks=1024)
    with _planned_cluster(tiny_model_dir, tmp_path) as cluster:
        scaler = cluster.scaler
        drain = scaler.drain
        killed: list[tuple[str, str]] = []  # (worker id, role)

        async def drain_killing(handle, timeout_s):  # type: ignore[no-untyped-def]
            if not killed:
                handle.draining = True  # drain's own first step: it is leaving
                killed.append((handle.worker_id, handle.role))
                os.kill(int(handle.info["pid"]), signal.SIGKILL)
            await drain(handle, timeout_s)

        scaler.drain = drain_killing  # type: ignore[method-assign]
        replaced_before = cluster.counters.get("workers_replaced", 0)
        rng = random.Random(1)
        sent: list[tuple[list[int], Future]] = []
        stop = threading.Event()
        with ThreadPoolExecutor(32) as pool:
            def load() -> None:
                while not stop.is_set():  # open loop, ~4 requests/s
                    prompt = _prompt(rng, 400)
                    sent.append((prompt, pool.submit(cluster.generate, [prompt], LONG)))
                    stop.wait(0.25)  # pacing of the load generator, not a synchronisation

            driver = threading.Thread(target=load, daemon=True)
            driver.start()
            try:
                _wait(lambda: cluster.status()["roles"] == {"prefill": 2, "decode": 1}, 400)
            finally:
                stop.set()
                driver.join()
            outputs = [(p, f.result(timeout=300)) for p, f in sent]

        assert killed and killed[0][1] == "decode", killed
        status = cluster.status()
        assert status["planner"]["failed"] == 0, status["planner"]
        assert status["planner"]["history"][0]["stopped"] == killed[0][0]
        assert cluster.counters.get("workers_replaced", 0) == replaced_before
        assert killed[0][0] not in cluster.workers  # gone, not standing in the worker set
        assert sorted(h.role for h in cluster.workers.values()) == ["decode", "prefill",
                                                                   "prefill"]
        for prompt, out in outputs:
            expected = single.generate([prompt], LONG)[0].outputs[0].token_ids
            assert out[0].outputs[0].token_ids == expected
        assert_workers_intact(h for h in cluster.workers.values() if h.healthy)
