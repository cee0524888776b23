"""The disaggregated cluster on real Ray and UCX (tiny model): equal to the single engine.

One cluster serves the module (Ray starts once); tests run in file order: P/D equality,
streaming, conditional disaggregation, abort (exactly the client's request), bad input, scale
up, a decode worker killed under 8 streams (replayed, and replaced), scale down, scale racing
a replacement.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import time
from pathlib import Path

import pytest

from splitserve import LLM, Cluster, PoolingParams, SamplingParams
from splitserve.errors import DuplicateRequestError, InvalidRequestError
from tests.utils import assert_workers_intact, random_prompts, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.ucx]

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(n: int, seed: int, lo: int = 20, hi: int = 120) -> list[list[int]]:
    return random_prompts(n, seed, lo, hi)


@pytest.fixture(scope="module")
def single(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=1024)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    with Cluster.local(prefill=1, decode=1, model=str(tiny_model_dir),
                       kv_cache_memory_bytes=16 << 20,
                       router={"local_prefill_max_tokens": 15}, kv_transfer={"lease_s": 8.0},
                       registry={"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0}) as c:
        yield c
        assert_workers_intact(h for h in c.workers.values() if h.healthy)


_wait = functools.partial(wait_until, timeout_s=120.0)


def _free_everywhere(cluster: Cluster, timeout_s: float = 30.0) -> list[dict]:
    """Worker stats once every block is free again (a lost release ends by lease expiry)."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = [w for w in cluster.status()["workers"] if w["healthy"]]
        if all(w["num_free_blocks"] == w["num_blocks"] for w in workers):
            return workers
        if time.monotonic() > deadline:
            return workers
        time.sleep(0.1)


def _decode_stats(cluster: Cluster) -> dict:
    return next(w for w in cluster.status()["workers"] if w["role"] == "decode" and w["healthy"])


def test_workers_run_at_driver_priority_with_no_idle_worker(cluster: Cluster) -> None:
    """The Ray this cluster started runs its engines at the driver's priority (Ray's default
    niceness 15 would let any process take their CPU first) and prestarts no idle worker
    for the driver (we run no tasks, only actors with processes of their own)."""
    pids = [h.info["pid"] for h in cluster.workers.values() if h.healthy]
    assert pids
    for pid in pids:
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0)
    raylet = int(Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])
    idle = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == raylet and cmd.startswith(b"ray::IDLE"):
            idle.append(proc.name)
    assert not idle, f"idle Ray workers under raylet {raylet}: {idle}"


def test_workers_froze_their_startup_heap(cluster: Cluster) -> None:
    """Each worker process froze its heap once its engine was built (SPLITSERVE_GC_FREEZE):
    the model's objects are out of the collector's full passes (the driver's are not)."""
    workers = [w for w in cluster.status()["workers"] if w["healthy"]]
    assert {w["role"] for w in workers} == {"prefill", "decode"}
    assert all(w["gc_frozen_objects"] > 10_000 for w in workers), workers


def test_pd_equals_single_engine(cluster: Cluster, single: LLM) -> None:
    prompts = _prompts(16, seed=0)
    before = _decode_stats(cluster)
    got = [o.outputs[0].token_ids for o in cluster.generate(prompts, GREEDY)]
    assert got == [o.outputs[0].token_ids for o in single.generate(prompts, GREEDY)]
    status = cluster.status()
    prefill = next(w for w in status["workers"] if w["role"] == "prefill")
    assert prefill["prefix_cache_queries"] > 0  # the prompts went through the prefill worker
    # the KV really moved: every prompt pulled, bytes arrived, nothing recomputed on decode
    after = _decode_stats(cluster)
    assert after["kv_transfers"] - before["kv_transfers"] == len(prompts)
    assert after["kv_transfer_bytes"] > before["kv_transfer_bytes"]
    assert after["kv_transfer_failures"] == before["kv_transfer_failures"]
    assert after["num_remote_fallbacks"] == before["num_remote_fallbacks"]
    for w in _free_everywhere(cluster):
        assert w["num_free_blocks"] == w["num_blocks"] and w["num_held_kv"] == 0


def test_seeded_sampling_and_n(cluster: Cluster, single: LLM) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=10, ignore_eos=True)
    prompt = _prompts(1, seed=1)[0]
    assert (cluster.generate([prompt], params)[0].outputs[0].token_ids
            == single.generate([prompt], params)[0].outputs[0].token_ids)
    multi = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    out = cluster.generate([prompt], multi)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [
        c.token_ids for c in single.generate([prompt], multi)[0].outputs]


def test_stream_deltas_add_up(cluster: Cluster, single: LLM) -> None:
    prompt = _prompts(1, seed=2)[0]
    deltas = list(cluster.stream(prompt, GREEDY))
    assert [t for d in deltas for t in d.outputs[0].token_ids] == \
        single.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert deltas[-1].outputs[0].finish_reason == "length"


def test_prompt_logprobs_come_once_from_the_prefill_worker(cluster: Cluster, single: LLM) -> None:
    """The prefill worker computes them and sends them with its first token; the decode worker
    pulls the KV (so computes none): one delta carries them, with the single engine's values."""
    prompt = _prompts(1, seed=4)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    want = single.generate([prompt], params)[0]
    before = _decode_stats(cluster)
    deltas = list(cluster.stream(prompt, params))
    after = _decode_stats(cluster)
    assert after["kv_transfers"] - before["kv_transfers"] == 1  # the KV moved
    carrying = [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None]
    assert len(carrying) == 1 and len(carrying[0]) == len(prompt)
    assert [t for d in deltas for t in d.outputs[0].token_ids] == want.outputs[0].token_ids
    for got, ref in zip(carrying[0][1:], want.prompt_logprobs[1:], strict=True):
        assert list(got) == list(ref)
        assert [lp.logprob for lp in got.values()] == pytest.approx(
            [lp.logprob for lp in ref.values()], abs=1e-5)
    out = cluster.generate([prompt], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=3,
                                                    prompt_logprobs=0))[0]
    assert len(out.outputs) == 2 and len(out.prompt_logprobs) == len(prompt)


def test_embeddings_end_at_the_prefill_worker_and_move_no_kv(cluster: Cluster,
                                                             single: LLM) -> None:
    """An embedding request ends at its prompt: the prefill worker computes it (the prompt is
    past local_prefill_max_tokens) and answers, no KV is handed to the decode worker, every
    block is free after, and the vectors are the single engine's bits."""
    prompt = _prompts(1, seed=31, lo=60, hi=61)[0]
    for pool in (PoolingParams(), PoolingParams(pooling_type="MEAN"),
                 PoolingParams(dimensions=8, normalize=False)):
        want = single.embed([prompt], pool)[0].outputs.embedding
        before = {w["role"]: w for w in cluster.status()["workers"] if w["healthy"]}
        out = cluster.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0,
                                                        pooling=pool))[0]
        after = {w["role"]: w for w in cluster.status()["workers"] if w["healthy"]}
        assert out.finished and out.embedding == want
        assert after["prefill"]["prefix_cache_queries"] > before["prefill"]["prefix_cache_queries"]
        assert after["decode"]["kv_transfers"] == before["decode"]["kv_transfers"]
    short = [5, 6, 7, 8]  # within local_prefill_max_tokens: the decode worker computes it
    assert [o.outputs.embedding for o in cluster.embed([prompt, short])] == [
        o.outputs.embedding for o in single.embed([prompt, short])]
    workers = _free_everywhere(cluster)
    assert all(w["num_free_blocks"] == w["num_blocks"] for w in workers), workers


def test_cache_salt_through_the_cluster(cluster: Cluster, single: LLM) -> None:
    """The router places a salted prompt by its salted hashes and the prefill worker shares
    its blocks only with the same salt."""
    prompt = list(range(3000, 3064))

    def run(salt: str) -> tuple[int, list[int]]:
        out = cluster.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4,
                                                        ignore_eos=True, cache_salt=salt))[0]
        return out.num_cached_tokens, out.outputs[0].token_ids

    first = run("a")
    assert first[0] == 0
    assert run("a")[0] > 0
    assert run("b")[0] == 0
    want = single.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4,
                                                    ignore_eos=True))[0].outputs[0].token_ids
    assert first[1] == run("b")[1] == want


def test_short_prompt_prefills_on_decode(cluster: Cluster, single: LLM) -> None:
    before = {w["role"]: w["prefix_cache_queries"] for w in cluster.status()["workers"]}
    prompt = [5, 6, 7, 8, 9]  # within local_prefill_max_tokens
    out = cluster.generate([prompt], GREEDY)[0]
    assert out.outputs[0].token_ids == single.generate([prompt], GREEDY)[0].outputs[0].token_ids
    after = {w["role"]: w["prefix_cache_queries"] for w in cluster.status()["workers"]}
    assert after["prefill"] == before["prefill"] and after["decode"] > before["decode"]


def test_abort_mid_stream_frees_both_workers(cluster: Cluster) -> None:
    # the whole context window: the abort has seconds to land, not the ~0.2 s that 400 tiny
    # tokens took on CI (the request finished "length" before the abort arrived)
    prompt = _prompts(1, seed=3)[0]
    budget = 2048 - len(prompt)
    params = SamplingParams(temperature=0.0, max_tokens=budget, ignore_eos=True)
    stream = cluster.stream(prompt, params, request_id="abort-me")
    first = next(stream)
    assert first.outputs[0].token_ids
    cluster.abort("abort-me")
    rest = list(stream)
    assert rest and rest[-1].outputs[0].finish_reason == "abort"
    produced = sum(len(d.outputs[0].token_ids) for d in [first, *rest])
    assert produced < budget  # it stopped early: the abort, not the length, ended it
    for w in _free_everywhere(cluster):
        assert w["num_free_blocks"] == w["num_blocks"]


def test_abort_touches_exactly_that_request(cluster: Cluster) -> None:
    """Client ids are labels: aborting ``x`` stops ``x`` (all ``n`` children) and nothing
    whose id merely ends like it (the old suffix match aborted ``1_x`` as x's child)."""
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    multi = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=400, ignore_eos=True)
    prompt = _prompts(1, seed=9)[0]

    async def run() -> dict[str, list]:
        outs: dict[str, list] = {"x": [], "1_x": []}
        victim = cluster.astream(prompt, multi, request_id="x")
        bystander = cluster.astream(prompt, long, request_id="1_x")
        outs["x"].append(await anext(victim))
        outs["1_x"].append(await anext(bystander))
        with pytest.raises(DuplicateRequestError):  # "x" is live: a second one is refused
            await anext(cluster.astream(prompt, long, request_id="x"))
        cluster.abort("x")
        outs["x"] += [d async for d in victim]
        outs["1_x"] += [d async for d in bystander]
        return outs

    outs = asyncio.run(run())
    finished = [c for d in outs["x"] for c in d.outputs if c.finish_reason]
    assert sorted(c.index for c in finished) == [0, 1]
    assert all(c.finish_reason == "abort" for c in finished)
    assert {d.request_id for d in outs["x"]} == {"x"}  # outputs carry the client's label
    tokens = [t for d in outs["1_x"] for t in d.outputs[0].token_ids]
    assert len(tokens) == 40 and outs["1_x"][-1].outputs[0].finish_reason == "length"
    # the label is free again once its request ended
    again = list(cluster.stream(prompt, GREEDY, request_id="x"))
    assert again[-1].outputs[0].finish_reason == "length"
    for w in _free_everywhere(cluster):
        assert w["num_free_blocks"] == w["num_blocks"]


def test_bad_request_fails_alone(cluster: Cluster) -> None:
    with pytest.raises(InvalidRequestError) as err:
        cluster.generate([[1, 2, 3], []], GREEDY)
    assert err.value.field == "prompt"
    assert len(cluster.generate([[1, 2, 3]], GREEDY)[0].outputs[0].token_ids) == 12


def test_scale_up_adds_a_worker_that_gets_traffic(cluster: Cluster) -> None:
    cluster.scale("decode", 2)
    decodes = [w for w in cluster.status()["workers"] if w["role"] == "decode" and w["healthy"]]
    assert len(decodes) == 2
    cluster.generate(_prompts(12, seed=4), GREEDY)
    decodes = [w for w in cluster.status()["workers"] if w["role"] == "decode" and w["healthy"]]
    assert all(w["prefix_cache_queries"] > 0 for w in decodes)


def test_decode_worker_killed_under_8_streams(cluster: Cluster, single: LLM) -> None:
    prompts = _prompts(8, seed=5, lo=30, hi=60)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
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
        streams = {h.worker_id: cluster.flights.num_on(h.worker_id) for h in decodes}
        victim = max(decodes, key=lambda h: streams[h.worker_id])
        assert streams[victim.worker_id] > 0  # it holds streams when it dies
        victims.append(victim)
        victim_groups.append(victim.placement_group.id.hex())
        victim.actor.die.remote()
        await asyncio.gather(*tasks)
        return got

    victims: list = []
    victim_groups: list[str] = []
    replays = cluster.counters["replays"]
    before = {h.worker_id for h in cluster.workers.values() if h.role == "decode" and h.healthy}
    assert asyncio.run(run()) == want
    assert cluster.counters["replays"] > replays  # its streams were replayed elsewhere
    dead = victims
    assert not dead[0].healthy  # declared dead (its handle leaves once it is replaced)
    # the role keeps its replica count: a new worker replaces the dead one and gets traffic
    # (starting it may take minutes on a loaded 2-core machine; the launcher allows 300 s)
    deadline = time.monotonic() + 300
    while True:
        decodes = [w for w in cluster.status()["workers"] if w["role"] == "decode" and w["healthy"]]
        if len(decodes) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    new = {w["worker_id"] for w in decodes} - before
    assert len(decodes) == 2 and len(new) == 1
    assert cluster.status()["counters"]["workers_replaced"] == 1
    assert dead[0].worker_id not in cluster.workers  # replaced: its handle left the set
    # the dead worker's placement group gave its resources back (a kept one would block
    # placing new workers after a few replacements)
    import ray

    table = ray.util.placement_group_table()
    assert dead[0].placement_group is None
    assert table[victim_groups[0]]["state"] == "REMOVED", table[victim_groups[0]]
    cluster.generate(_prompts(12, seed=8), GREEDY)
    fresh = next(w for w in cluster.status()["workers"] if w["worker_id"] in new)
    assert fresh["prefix_cache_queries"] > 0
    for w in _free_everywhere(cluster):
        assert w["num_free_blocks"] == w["num_blocks"]


def test_scale_down_drains_first(cluster: Cluster, single: LLM) -> None:
    cluster.scale("decode", 2)
    prompts = _prompts(4, seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    outs: list = []

    import threading

    t = threading.Thread(target=lambda: outs.extend(cluster.generate(prompts, params)))
    t.start()
    _wait(lambda: sum(bool(f.tokens) for f in cluster.flights) == len(prompts),
          "every request to be streaming")
    cluster.scale("decode", 1)  # drains the newest decode worker while requests run
    t.join(timeout=120)
    assert [o.outputs[0].token_ids for o in outs] == \
        [o.outputs[0].token_ids for o in single.generate(prompts, params)]
    assert cluster.status()["roles"] == {"prefill": 1, "decode": 1}
    with pytest.raises(Exception, match="roles.decode"):
        cluster.scale("decode", 0)


def test_scale_races_a_replacement(cluster: Cluster) -> None:
    """``scale`` runs while the loop thread replaces a dead worker: the role ends with exactly
    the asked-for count (the replacement counts), and router, registry and handles agree."""
    decode = next(h for h in cluster.workers.values() if h.role == "decode" and h.healthy)
    replaced = cluster.counters["workers_replaced"]
    decode.actor.die.remote()
    _wait(lambda: not decode.healthy, "the health loop to declare the worker dead")
    cluster.scale("decode", 2)  # while its replacement is being started
    _wait(lambda: cluster.counters["workers_replaced"] > replaced, "the replacement")
    assert cluster.status()["roles"] == {"prefill": 1, "decode": 2}

    async def views() -> tuple[set[str], set[str], set[str]]:
        live = {h.worker_id for h in cluster.workers.values() if h.healthy}
        return live, set(cluster.router.instances()), {r.worker_id for r in
                                                        cluster.registry.list()}

    live, routed, registered = cluster.run_on_loop(views())
    assert live == routed == registered and len(live) == 3
    cluster.scale("decode", 1)


def test_failing_engine_is_replaced_and_its_streams_replayed(cluster: Cluster, single: LLM) -> None:
    """Every step of a decode worker's engine starts failing under live streams: its streams
    end with EngineFailedError and are replayed elsewhere, equal to a fault-free run; the
    worker reports itself unhealthy and is replaced."""
    prompts = _prompts(3, seed=12, lo=30, hi=60)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, params)]
    unhealthy = cluster.counters["workers_unhealthy"]
    failures = cluster.counters["engine_failures"]

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
        assert cluster.flights.num_on(victim.worker_id) > 0
        victims.append(victim)
        victim.actor.fail_engine.remote()
        await asyncio.gather(*tasks)
        return got

    victims: list = []
    assert asyncio.run(run()) == want
    assert cluster.counters["engine_failures"] > failures  # streams ended by the failure ...
    _wait(lambda: cluster.counters["workers_unhealthy"] == unhealthy + 1, "the replacement")
    assert not victims[0].healthy  # ... and the unhealthy worker was retired and replaced
    _wait(lambda: cluster.status()["roles"].get("decode") == 1, "a healthy decode worker")


def test_200_requests_with_random_aborts_leave_nothing_behind(cluster: Cluster) -> None:
    prompts = _prompts(200, seed=7, lo=5, hi=60)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    to_abort = set(random.Random(7).sample(range(200), 20))

    async def run() -> dict[int, str | None]:
        reasons: dict[int, str | None] = {}

        async def one(i: int) -> None:
            aborted = False
            async for d in cluster.astream(prompts[i], params, request_id=f"many-{i}"):
                if i in to_abort and not aborted:
                    cluster.abort(f"many-{i}")
                    aborted = True
                reasons[i] = d.outputs[0].finish_reason
        await asyncio.gather(*(one(i) for i in range(200)))
        return reasons

    reasons = asyncio.run(run())
    assert all(reasons[i] == "length" for i in range(200) if i not in to_abort)
    assert all(reasons[i] in ("abort", "length") for i in to_abort)
    assert sum(reasons[i] == "abort" for i in to_abort) >= 10
    for w in _free_everywhere(cluster):
        assert w["num_free_blocks"] == w["num_blocks"]
        assert w["num_held_kv"] == 0 and w["num_loading_kv"] == 0  # no lease left
        assert w["num_running"] == 0 and w["num_waiting"] == 0
    import ray

    named = [n for n in ray.util.list_named_actors() if n.startswith("splitserve-")]
    healthy = {f"splitserve-{h.worker_id}" for h in cluster.workers.values() if h.healthy}
    assert set(named) == healthy  # no worker actor left behind (dead ones were killed)
