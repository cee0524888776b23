"""Priority scheduling (vLLM's ``scheduling_policy="priority"``): admission and preemption by
``SamplingParams.priority`` (lower first); refused under fcfs, with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve import LLM, SamplingParams
from splitserve.errors import ConfigError, InvalidRequestError
from splitserve.roles.engine.scheduler import Scheduler
from tests.utils import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _finish_order(llm: LLM, requests: list[tuple[str, list[int], int]]) -> list[str]:
    eng = llm.engine
    order: list[str] = []
    for rid, prompt, prio in requests:
        eng.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=6,
                                                    ignore_eos=True, priority=prio))
    while eng.has_unfinished_requests():
        order += [o.request_id for o in eng.step() if o.finished]
    return order


def test_one_slot_serves_the_lowest_priority_value_first(tiny_model_dir: Path) -> None:
    prompts = random_prompts(5, seed=1, lo=10, hi=20)
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64, max_num_seqs=1,
              scheduling_policy="priority")
    requests = [("first", prompts[0], 3), ("low", prompts[1], 7), ("mid", prompts[2], 3),
                ("high", prompts[3], -2), ("mid2", prompts[4], 3)]
    # everything queued before the first step: priority, then arrival within a level
    assert _finish_order(llm, requests) == ["high", "first", "mid", "mid2", "low"]
    fcfs = LLM(str(tiny_model_dir), num_kv_blocks=64, max_num_seqs=1)
    assert _finish_order(fcfs, [(r, p, 0) for r, p, _ in requests]) == [r for r, _, _ in requests]


def test_kv_pressure_preempts_the_lowest_priority_not_the_newest(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests outgrow an 8-block cache. fcfs preempts the newest; priority scheduling
    the one of lower priority though it came first; the tokens equal a roomy engine's."""
    prompts = random_prompts(2, seed=4, lo=40, hi=41)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    want = [o.outputs[0].token_ids
            for o in LLM(str(tiny_model_dir), num_kv_blocks=64).generate(prompts, params)]
    preempted: list[str] = []
    original = Scheduler._preempt

    def record(self: Scheduler, req) -> None:  # type: ignore[no-untyped-def]
        preempted.append(req.request_id)
        original(self, req)

    monkeypatch.setattr(Scheduler, "_preempt", record)
    for policy, victim in (("fcfs", "newer"), ("priority", "older")):
        preempted.clear()
        llm = LLM(str(tiny_model_dir), num_kv_blocks=8, scheduling_policy=policy,
                  enable_prefix_caching=False)
        prio = {"older": 5 if policy == "priority" else 0, "newer": 0}
        eng = llm.engine
        eng.add_request("older", prompts[0], SamplingParams(
            temperature=0.0, max_tokens=60, ignore_eos=True, priority=prio["older"]))
        tokens: dict[str, list[int]] = {"older": [], "newer": []}
        for o in eng.step():  # older is running first
            tokens[o.request_id] += o.outputs[0].token_ids
        eng.add_request("newer", prompts[1], SamplingParams(
            temperature=0.0, max_tokens=60, ignore_eos=True, priority=prio["newer"]))
        while eng.has_unfinished_requests():
            for o in eng.step():
                tokens[o.request_id] += o.outputs[0].token_ids
        assert preempted and preempted[0] == victim, (policy, preempted)
        assert [tokens["older"], tokens["newer"]] == want


def test_priority_needs_the_priority_policy(tiny_model_dir: Path) -> None:
    fcfs = LLM(str(tiny_model_dir), num_kv_blocks=16)
    with pytest.raises(InvalidRequestError) as e:
        fcfs.generate(["hi"], SamplingParams(max_tokens=2, priority=1))
    assert e.value.field == "priority"
    assert not fcfs.engine.has_unfinished_requests()
    llm = LLM(str(tiny_model_dir), num_kv_blocks=16, scheduling_policy="priority")
    outs = llm.generate(["a", "b"], GREEDY, priority=[2, -1])
    assert all(o.finished for o in outs)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(["a", "b"], GREEDY, priority=[1])
    assert e.value.field == "priority"
    for bad in (1.5, True, 2**31, "high"):
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(priority=bad)  # type: ignore[arg-type]
        assert e.value.field == "priority"
    with pytest.raises(ConfigError, match="scheduling_policy"):
        LLM(str(tiny_model_dir), num_kv_blocks=16, scheduling_policy="lifo")


def test_the_cluster_refuses_a_priority_before_placement(tiny_model_dir: Path) -> None:
    from splitserve.cluster.inputs import InputPreparer
    from splitserve.roles.models.loader import load_tokenizer

    llm = LLM(str(tiny_model_dir), num_kv_blocks=8)
    cfg, tok = llm.engine.model_config, load_tokenizer(str(tiny_model_dir))
    fcfs = InputPreparer("tiny", cfg, tok, 512, 16)
    with pytest.raises(InvalidRequestError) as e:
        fcfs.check_params(SamplingParams(priority=3))
    assert e.value.field == "priority"
    InputPreparer("tiny", cfg, tok, 512, 16, scheduling_policy="priority").check_params(
        SamplingParams(priority=3))
