"""``kv_transfer.timeout_s`` takes effect: the launcher hands it to every worker, the worker's
KV connector uses it as the deadline of a pull (and of each read), and a pull that stalls
past it fails; the decode worker then computes the prompt itself and the output is unchanged.

The stalled peer is simulated (a read that never completes): a loopback read is
synchronous, so a real stall cannot be produced in one process.
"""

from __future__ import annotations

import asyncio
import itertools

from splitserve import LLM, SamplingParams
from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.launcher import Launcher
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.workers import DecodeWorker, PrefillWorker

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_launcher_passes_timeout_s_to_every_worker() -> None:
    config = ClusterConfig.local(1, 1, kv_transfer={"timeout_s": 2.5})
    launcher = Launcher.__new__(Launcher)  # no Ray: only the worker arguments are built
    launcher.config, launcher._ids = config, itertools.count()
    args, kwargs = launcher.worker_args("decode", "decode-x")
    assert kwargs["transfer_timeout_s"] == 2.5


async def test_a_stalled_pull_fails_at_timeout_s_and_decode_recomputes(tiny_model_dir) -> None:
    cfg = EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64)
    prefill = PrefillWorker("p-timeout", cfg, transport="loopback")
    decode = DecodeWorker("d-timeout", cfg, transport="loopback", transfer_timeout_s=0.3)
    kv = decode.engine.engine.kv_worker
    assert (kv.config.load_timeout_s, kv.config.read_timeout_s) == (0.3, 0.3)
    stalled: list[int] = []

    def never_completes(address, read, dest, timeout_s=0.0) -> int:
        stalled.append(read.lease_id)
        return -len(stalled)  # a handle whose completion never arrives

    kv.transport.read_blocks = never_completes
    kv.transport.poll = lambda handle: None if handle < 0 else type(kv.transport).poll(
        kv.transport, handle)
    prompt = list(range(200, 240))
    try:
        outs = [o async for o in prefill.generate("r", prompt, PARAMS, {"do_remote_decode": True})]
        handoff = outs[-1].kv_transfer_params
        first = [t for o in outs for t in o.outputs[0].token_ids]
        rest = await asyncio.wait_for(_tokens(decode.generate(
            "r", prompt, PARAMS, handoff, resume_token_ids=first)), 60)
        want = LLM(str(tiny_model_dir), num_kv_blocks=64).generate([prompt], PARAMS)
        assert first + rest == want[0].outputs[0].token_ids
        assert stalled  # the pull was issued and stalled
        stats = await decode.stats()
        assert stats["kv_transfer_failures"] == 1 and stats["num_remote_fallbacks"] == 1
    finally:
        await decode.shutdown()
        await prefill.shutdown()


async def _tokens(stream) -> list[int]:
    return [t async for o in stream for t in o.outputs[0].token_ids]
