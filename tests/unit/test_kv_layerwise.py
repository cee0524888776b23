"""Layer-wise KV streaming between two engines of one process (loopback transport).

The prefill engine offers a request's KV before the forward of its last prompt chunk; the
decode engine is stepped from inside that forward (the per-layer hook), so its reads of each
layer group are answered while later layers are still being computed. The decode side runs
the request only once every group is verified and the first token arrived; the tokens equal
the single engine's. Faults (an abort mid-stream, corrupted groups, no first token) end with
every block back in both pools.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from splitserve import LLM, SamplingParams
from splitserve.kvtransfer.connector_worker import TransferConfig
from splitserve.kvtransfer.loopback import LoopbackTransport
from splitserve.kvtransfer.transport import FaultInjector
from splitserve.outputs import RequestOutput
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.llm_engine import LLMEngine
from tests.utils import make_tiny_llama

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
LAYERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("lw") / "tiny4", tokenizer_dir, layers=LAYERS)


@pytest.fixture(scope="module")
def single(model_dir) -> LLM:
    return LLM(str(model_dir), num_kv_blocks=128)


class Pair:
    """A streaming prefill engine and a decode engine driven by hand on this thread."""

    def __init__(
        self, model_dir, fault: FaultInjector | None = None, zero_copy_max_blocks: int = 16
    ) -> None:
        self.prefill = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=128))
        self.decode = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=128))
        self.prefill.attach_kv_connector(
            LoopbackTransport(fault=fault), f"p-{id(self)}", lease_ttl_s=5.0,
            transfer_config=TransferConfig(stream_layers=1),
        )
        self.decode.attach_kv_connector(
            LoopbackTransport(), f"d-{id(self)}", lease_ttl_s=5.0,
            transfer_config=TransferConfig(stream_zero_copy_max_blocks=zero_copy_max_blocks),
        )
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, RequestOutput] = {}
        self.steps_during_forward = 0
        self.on_layer: Callable[[int], None] | None = None
        self.prefill.on_early_output = self._early
        inner = self.prefill.kv_worker.on_layer_computed

        def during_forward(layer: int) -> None:  # the decode side runs between layers
            inner(layer)
            if self.on_layer is not None:
                self.on_layer(layer)
            self.steps_during_forward += 1
            self._step_decode()

        self.prefill.kv_worker.on_layer_computed = during_forward

    def _early(self, out: RequestOutput) -> None:
        assert out.kv_transfer_params is not None and not out.outputs[0].token_ids
        prompt = self.prompts[out.request_id]
        self.decode.add_request(out.request_id, prompt, PARAMS,
                                kv_transfer_params=out.kv_transfer_params)
        self.tokens[out.request_id] = []

    def _step_decode(self) -> None:
        for out in self.decode.step():
            self.tokens[out.request_id] += out.outputs[0].token_ids
            if out.finished:
                self.finished[out.request_id] = out

    def run(self, prompts: dict[str, list[int]], params: SamplingParams = PARAMS) -> None:
        self.prompts = prompts
        for rid, prompt in prompts.items():
            self.prefill.add_request(rid, prompt, params,
                                     kv_transfer_params={"do_remote_decode": True})
        while self.prefill.has_unfinished_requests():
            for out in self.prefill.step():
                first = out.outputs[0].token_ids
                self.tokens[out.request_id] = list(first) + self.tokens[out.request_id]
                handed_off = out.kv_transfer_params is not None
                if not handed_off:  # ended here (abort, max_tokens): the decode side sees none
                    self.finished[out.request_id] = out
                self.decode.resume_remote(out.request_id, first if handed_off else [])
        for _ in range(10_000):
            if not (self.decode.has_unfinished_requests() or self.prefill.has_pending_transfers()
                    or self.decode.has_pending_transfers()):
                break
            self._step_decode()
            self.prefill.step()  # lease control (release, abort) and expiry
        for engine in (self.prefill, self.decode):
            report = engine.check_integrity()
            assert report.ok, report.problems
            assert engine.kv.pool.num_free_blocks == engine.num_blocks


def _prompts(n: int, length: int = 70) -> dict[str, list[int]]:
    return {f"r{i}": [(97 * i + 13 * j) % 40000 + 100 for j in range(length)] for i in range(n)}


@pytest.mark.parametrize("max_blocks", [16, 0], ids=["zero_copy_per_block", "staged_group"])
def test_streamed_groups_are_served_during_the_forward(
    model_dir, single: LLM, max_blocks: int
) -> None:
    pair = Pair(model_dir, zero_copy_max_blocks=max_blocks)
    prompts = _prompts(3)
    pair.run(prompts)
    want = [o.outputs[0].token_ids for o in single.generate(list(prompts.values()), PARAMS)]
    assert [pair.tokens[rid] for rid in prompts] == want
    p, d = pair.prefill.stats(), pair.decode.stats()
    assert p["kv_stream_offers"] == 3
    # every group of every request but the last group was answered before the forward ended
    assert p["kv_stream_early_reads"] == 3 * (LAYERS - 1)
    assert d["kv_streamed_transfers"] == 3 and d["kv_stream_groups"] == 3 * LAYERS
    assert d["num_remote_fallbacks"] == 0 and d["kv_transfer_failures"] == 0


def test_abort_mid_stream_frees_both_sides(model_dir) -> None:
    """The decode side aborts after the first group (a client abort): its load stops, the
    prefill lease is aborted while the forward still runs, and both pools end full."""
    pair = Pair(model_dir)

    def abort_after_first_group(layer: int) -> None:
        if layer == 1:
            pair.decode.abort_request("r0")

    pair.on_layer = abort_after_first_group
    pair.run(_prompts(1))
    assert pair.finished["r0"].outputs[0].finish_reason == "abort"
    assert pair.decode.stats()["kv_stream_groups"] == 1
    assert pair.decode.stats()["num_remote_fallbacks"] == 0  # the request ended, not recomputed


def test_corrupted_groups_are_recomputed_locally(model_dir, single: LLM) -> None:
    pair = Pair(model_dir, fault=FaultInjector(corrupt_sends=100))
    prompts = _prompts(1)
    pair.run(prompts)
    want = single.generate(list(prompts.values()), PARAMS)[0].outputs[0].token_ids
    assert pair.tokens["r0"] == want
    d = pair.decode.stats()
    assert d["num_remote_fallbacks"] == 1 and d["kv_stream_groups"] == 0


def test_first_token_ends_the_request_at_prefill(model_dir, single: LLM) -> None:
    """max_tokens=1: the prefill engine finishes the request itself; its early lease is
    aborted and the decode side's request ends without running."""
    pair = Pair(model_dir)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    prompts = _prompts(1)
    pair.run(prompts, one)
    want = single.generate(list(prompts.values()), one)[0].outputs[0].token_ids
    assert pair.tokens["r0"][:1] == want
    assert pair.decode.stats()["num_running"] == 0
