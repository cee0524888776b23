"""``runtime: processes``: workers as child processes of the cluster's process, no Ray (tiny
model). What ``splitserve serve`` picks for its colocated default.

Checks the mechanism (no Ray started, every worker a direct child with its own pid), real
faults (a worker SIGKILLed mid-stream: its requests replayed to the same tokens, a new
process in its place, the dead one reaped; a worker whose engine cannot be built: a clear
error and no process left), and the settings that cannot hold without Ray.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from splitserve import LLM, Cluster, SamplingParams
from splitserve.cluster.config import ClusterConfig, ClusterConfigError
from splitserve.errors import ConfigError
from tests.utils import assert_workers_intact, random_prompts

PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def single(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=1024)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    with Cluster.local(prefill=0, decode=1, model=str(tiny_model_dir), runtime="processes",
                       kv_cache_memory_bytes=16 << 20,
                       registry={"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0}) as c:
        yield c
        assert_workers_intact(h for h in c.workers.values() if h.healthy)


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def test_workers_are_children_of_this_process_and_no_ray_runs(cluster: Cluster) -> None:
    assert cluster.launcher is not None and cluster.launcher.processes
    assert not cluster.launcher.started_ray
    mine = psutil.Process()
    for handle in cluster.workers.values():
        child = psutil.Process(handle.info["pid"])
        assert child.ppid() == os.getpid() and child.pid != os.getpid()
        assert "splitserve.cluster.process_workers" in " ".join(child.cmdline())
    names = " ".join(" ".join(c.cmdline()) for c in mine.children(recursive=True))
    assert "raylet" not in names and "gcs_server" not in names


def test_a_call_given_up_on_does_not_lose_the_worker(cluster: Cluster) -> None:
    """A caller that stops waiting (``asyncio.wait_for``'s timeout cancels its future) gets
    its answer dropped when it comes, and the worker stays (a late answer to a cancelled
    future once read as a broken connection: healthy workers were replaced)."""
    (handle,) = [h for h in cluster.workers.values() if h.healthy]
    actor = handle.actor

    async def run() -> dict:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.ensure_future(_awaited(actor.stats.remote())), 1e-6)
        return await _awaited(actor.stats.remote())  # answered after the dropped one

    assert "num_running" in asyncio.run(run())
    assert actor.alive and handle.healthy
    assert actor.info.remote().result(30)["pid"] == handle.info["pid"]


async def _awaited(call):
    return await call


def test_worker_sigkilled_mid_stream_is_replaced_and_its_requests_replayed(
    cluster: Cluster, single: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = random_prompts(4, seed=11, lo=40, hi=90)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, PARAMS)]
    (victim,) = [h for h in cluster.workers.values() if h.healthy]
    old_pid = victim.info["pid"]
    replays, replaced = cluster.counters["replays"], cluster.counters["workers_replaced"]
    # a secret set now must not reach the replacement's environment (it stays with the server)
    monkeypatch.setenv("SPLITSERVE_API_KEY", "not-for-workers")

    async def run() -> list[list[int]]:
        got: list[list[int]] = [[] for _ in prompts]
        started = asyncio.Event()

        async def one(i: int) -> None:
            async for d in cluster.astream(prompts[i], PARAMS):
                got[i] += d.outputs[0].token_ids
                if len(got[i]) >= 3:
                    started.set()

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
        await started.wait()
        assert cluster.flights.num_on(victim.worker_id) > 0  # it holds streams when it dies
        os.kill(old_pid, signal.SIGKILL)  # a real crash: no handler, no goodbye
        await asyncio.gather(*tasks)
        return got

    assert asyncio.run(run()) == want
    assert cluster.counters["replays"] > replays
    deadline = time.monotonic() + 120
    while cluster.counters["workers_replaced"] == replaced and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.counters["workers_replaced"] == replaced + 1
    new = [h for h in cluster.workers.values() if h.healthy]
    assert len(new) == 1 and new[0].info["pid"] not in (old_pid, os.getpid())
    environ = psutil.Process(new[0].info["pid"]).environ()
    assert "SPLITSERVE_API_KEY" not in environ and "PATH" in environ
    assert not psutil.pid_exists(old_pid) or \
        psutil.Process(old_pid).status() != psutil.STATUS_ZOMBIE  # reaped
    assert [o.outputs[0].token_ids for o in cluster.generate(prompts, PARAMS)] == want


def test_a_worker_that_cannot_build_its_engine_fails_the_start_and_leaves_no_process(
    tiny_model_dir,
) -> None:
    before = _children()
    with pytest.raises(ConfigError, match="workers failed to start") as err:
        Cluster.local(prefill=0, decode=1, model=str(tiny_model_dir), runtime="processes",
                      kv_cache_memory_bytes=1024)  # no room for one block
    assert "KV" in str(err.value) or "kv" in str(err.value)
    left = _children() - before
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in left if psutil.pid_exists(p)],
                                    timeout=30)
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.parametrize(("overrides", "setting"), [
    ({"ray": {"address": "auto"}}, "runtime"),
    ({"roles": {"decode": {"num_gpus": 1}}}, "roles.decode.num_gpus"),
])
def test_settings_processes_cannot_honour_are_refused_by_name(overrides, setting) -> None:
    data = {"runtime": "processes", **overrides}
    with pytest.raises(ClusterConfigError, match=setting.replace(".", r"\.")):
        ClusterConfig.from_dict(data)
