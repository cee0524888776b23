"""Three Ray nodes (ray.cluster_utils.Cluster): prefill on one, decode on another, KV over UCX."""

from __future__ import annotations

import pytest

from splitserve import LLM, Cluster, ClusterConfig, SamplingParams
from tests.utils import assert_workers_intact

pytestmark = [pytest.mark.ray, pytest.mark.ucx]


def test_prefill_and_decode_on_different_nodes(tiny_model_dir) -> None:
    import ray
    from ray.cluster_utils import Cluster as RayCluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1, resources={"prefill_node": 1})
    nodes.add_node(num_cpus=1, resources={"decode_node": 1})
    nodes.wait_for_nodes()
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [list(range(200, 260)), list(range(9, 120)), list(range(3000, 3040))]
    want = [o.outputs[0].token_ids for o in LLM(str(tiny_model_dir)).generate(prompts, params)]
    config = ClusterConfig.from_dict({
        "model": str(tiny_model_dir), "kv_cache_memory_bytes": 16 << 20,
        "roles": {"prefill": {"replicas": 1, "resources": {"prefill_node": 1}},
                  "decode": {"replicas": 1, "resources": {"decode_node": 1}}},
        "router": {"local_prefill_max_tokens": 0},
        "ray": {"address": nodes.address},
    })
    try:
        with Cluster(config) as cluster:
            got = [o.outputs[0].token_ids for o in cluster.generate(prompts, params)]
            workers = {w["role"]: w for w in cluster.status()["workers"]}
            assert_workers_intact(h for h in cluster.workers.values() if h.healthy)
        assert got == want
        assert workers["prefill"]["node_id"] and workers["decode"]["node_id"]
        assert workers["prefill"]["node_id"] != workers["decode"]["node_id"]
        assert workers["prefill"]["prefix_cache_queries"] > 0  # the KV really came from prefill
    finally:
        ray.shutdown()
        nodes.shutdown()
