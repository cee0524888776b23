"""Queued-request migration, per-stage timing and router decision counters on a real cluster.

Two prefill workers that run one sequence at a time in 16-token chunks, so requests queue
behind each other long enough to be moved; the periodic rebalance is slowed to an hour so the
test drives migrations itself (the router's decisions are tested in tests/unit/test_router*).
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from splitserve import LLM, Cluster, SamplingParams
from splitserve.router.schema import Migration
from tests.utils import assert_workers_intact

pytestmark = [pytest.mark.ray, pytest.mark.ucx]

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    with Cluster.local(prefill=2, decode=1, model=str(tiny_model_dir),
                       kv_cache_memory_bytes=16 << 20,
                       roles={"prefill": {"max_num_seqs": 1, "max_num_batched_tokens": 16}},
                       router={"local_prefill_max_tokens": 0, "rebalance_interval_s": 3600}) as c:
        yield c
        assert_workers_intact(h for h in c.workers.values() if h.healthy)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # 20-25 chunks each: the last of a worker's queue waits long enough to be moved, also on
    # a loaded machine (150-200 tokens once left no request queued in time under load)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(320, 400))] for _ in range(n)]


def _queued(cluster: Cluster, n: int, timeout_s: float = 60.0) -> dict[str, str]:
    """request id -> prefill worker, once ``n`` requests sit at prefill workers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        placed = {f.request_id: f.prefill for f in cluster.flights if f.prefill}
        if len(placed) >= n:
            return placed
        time.sleep(0.01)
    raise AssertionError(f"only {len(placed)} of {n} requests reached a prefill worker")


def test_queued_request_migrates_and_output_is_unchanged(cluster: Cluster, tiny_model_dir) -> None:
    prompts = _prompts(8, seed=1)
    want = [o.outputs[0].token_ids for o in LLM(str(tiny_model_dir)).generate(prompts, GREEDY)]
    outs: list = []
    runner = threading.Thread(target=lambda: outs.extend(cluster.generate(prompts, GREEDY)))
    runner.start()
    placed = _queued(cluster, len(prompts))
    workers = sorted({h.worker_id for h in cluster.workers.values() if h.role == "prefill"})
    by_worker = {w: sorted((r for r, p in placed.items() if p == w),
                           key=lambda r: int(r.split("-")[-1])) for w in workers}
    source = max(workers, key=lambda w: len(by_worker[w]))
    target = next(w for w in workers if w != source)
    last = by_worker[source][-1]  # queued behind the others on the source: untouched
    # a stale decision (the request is not at that worker) is not applied
    cluster.run_on_loop(cluster.rebalancer.migrate(Migration(last, target, source, 0.0)))
    assert cluster.counters["route:migrated"] == 0
    # the newest is queued behind the others; a request the router placed may still be on its
    # way to the worker (then the worker does not know it and keeps it): try again until one
    # is withdrawn untouched, or the queue has drained
    deadline = time.monotonic() + 30
    while not cluster.counters["route:migrated"] and time.monotonic() < deadline:
        for rid in reversed(by_worker[source]):
            cluster.run_on_loop(cluster.rebalancer.migrate(Migration(rid, source, target, 0.0)))
            if cluster.counters["route:migrated"]:
                break
        else:
            time.sleep(0.01)
    assert cluster.counters["route:migrated"] == 1
    runner.join(timeout=300)
    assert [o.outputs[0].token_ids for o in outs] == want

    status = cluster.status()
    decisions = {k: v for k, v in status["counters"].items() if k.startswith("route:")}
    assert sum(v for k, v in decisions.items() if k != "route:migrated") == len(prompts)
    for w in status["workers"]:
        assert w["num_free_blocks"] == w["num_blocks"] or w["role"] == "decode"
        assert w["num_held_kv"] == 0 and w["num_running"] == 0 and w["num_waiting"] == 0


def test_outputs_carry_a_stage_breakdown(cluster: Cluster) -> None:
    outs = cluster.generate(_prompts(4, seed=2), GREEDY)
    for o in outs:
        m = o.metrics
        assert {"queue_s", "prefill_s", "transfer_s", "decode_s"} <= set(m)
        assert all(m[k] >= 0 for k in ("queue_s", "prefill_s", "transfer_s", "decode_s"))
        assert m["prefill_s"] > 0 and m["decode_s"] > 0
    # one sequence at a time per prefill worker: the later requests waited in a queue
    assert max(o.metrics["queue_s"] for o in outs) > 0.0
    decode = next(w for w in cluster.status()["workers"] if w["role"] == "decode")
    assert decode["kv_transfers"] >= 12 and decode["kv_transfer_bytes"] > 0
    assert decode["kv_transfer_failures"] == 0


def test_http_metrics_and_timing_through_the_cluster(cluster: Cluster) -> None:
    """Last in the module: closing the server closes the backend, i.e. this cluster."""
    import httpx

    from splitserve.cluster.frontends.backend import ClusterBackend
    from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions

    opts = ServeOptions(port=0, grpc_port=None, served_model_name="tiny")
    with BackgroundServer(ClusterBackend(cluster), opts) as srv, \
            httpx.Client(base_url=srv.http_url, timeout=120) as http:
        body = {"model": "tiny", "prompt": _prompts(1, seed=3)[0], "max_tokens": 6,
                "temperature": 0, "ignore_eos": True}
        res = http.post("/v1/completions", json=body)
        assert res.status_code == 200, res.text
        timing = res.json()["timing"]
        assert timing["transfer"] > 0 and timing["prefill"] > 0 and timing["decode"] > 0
        assert "transfer;dur=" in res.headers["server-timing"]
        text = http.get("/metrics").text
    for name in ('splitserve:router_decisions_total{outcome="prefix_miss",policy="dualmap"}',
                 'splitserve:router_decisions_total{outcome="migrated",policy="dualmap"} 1.0',
                 'splitserve:kv_transfer_bytes_total{role="decode"',
                 'splitserve:kv_transfer_seconds_count{role="decode"',
                 'splitserve:kv_transfer_failures_total{role="decode"',
                 'splitserve:request_transfer_time_seconds_count{model_name="tiny"} 1.0',
                 'splitserve:kv_event_resyncs_total{reason="overflow"} 0.0',
                 'splitserve:health_check_errors_total 0.0',
                 'splitserve:workers_replaced_total 0.0'):
        assert name in text, name
