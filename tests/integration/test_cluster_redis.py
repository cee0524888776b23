"""Two Cluster handles on one Redis registry and one Ray cluster see the same workers."""

from __future__ import annotations

import pytest

from splitserve import LLM, Cluster, ClusterConfig, SamplingParams
from tests.integration.test_registry import running_redis

pytestmark = [pytest.mark.ray, pytest.mark.ucx, pytest.mark.redis]


def test_second_handle_sees_and_uses_the_same_workers(tiny_model_dir) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [list(range(100, 140)), list(range(7, 90))]
    want = [o.outputs[0].token_ids for o in LLM(str(tiny_model_dir)).generate(prompts, params)]
    with running_redis() as (url, _):
        config = ClusterConfig.local(
            prefill=1, decode=1, model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20,
            registry={"url": url, "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0},
            router={"local_prefill_threshold": 1},
        )
        with Cluster(config) as first:
            second = Cluster.connect(config)
            try:
                ids = lambda c: sorted(w["worker_id"] for w in c.status()["workers"])  # noqa: E731
                assert ids(second) == ids(first) and len(ids(first)) == 2
                got = [o.outputs[0].token_ids for o in second.generate(prompts, params)]
                assert got == want
            finally:
                second.shutdown()
            # closing the second handle left the workers serving the first
            assert [o.outputs[0].token_ids for o in first.generate(prompts, params)] == want
            assert len(first.registry.list()) == 2
        memory = ClusterConfig.local(model=str(tiny_model_dir))
        with pytest.raises(Exception, match="registry"):
            Cluster.connect(memory)
