"""One set of request checks for the cluster and the engine: the same prompts and ``n`` are
refused by both, naming the same field (a bool token id used to pass the cluster and fail
the engine, after placement)."""

from __future__ import annotations

import pytest

from splitserve import SamplingParams
from splitserve.cluster.inputs import InputPreparer
from splitserve.errors import InvalidRequestError
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.llm_engine import LLMEngine
from splitserve.validation import check_n, check_prompt_length, prompt_token_ids

BAD_PROMPTS = [
    ([1, True, 3], "prompt_token_ids"),
    ([1, 2.0, 3], "prompt_token_ids"),
    ([1, -1], "prompt_token_ids"),
    ([1, 10**9], "prompt_token_ids"),
    ([], "prompt"),
    ("", "prompt"),
    (b"bytes", "prompt"),
    ([7] * 64, "prompt"),  # no room to generate within max_model_len=64
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, max_model_len=64))


@pytest.fixture(scope="module")
def preparer(engine: LLMEngine) -> InputPreparer:
    return InputPreparer(engine.model_id, engine.model_config, engine.tokenizer,
                         engine.max_model_len, engine.config.block_size, max_n=4)


@pytest.mark.parametrize(("prompt", "field"), BAD_PROMPTS)
def test_cluster_and_engine_refuse_the_same_prompts(engine, preparer, prompt, field) -> None:
    with pytest.raises(InvalidRequestError) as at_cluster:
        preparer.prepare(prompt)
    with pytest.raises(InvalidRequestError) as at_engine:
        engine.add_request("r", prompt, SamplingParams(max_tokens=1))
    assert at_cluster.value.field == at_engine.value.field == field
    assert str(at_cluster.value) == str(at_engine.value)
    assert not engine.has_unfinished_requests()


def test_both_accept_and_agree_on_good_prompts(engine, preparer) -> None:
    prompts = ([1, 2, 3], "hello there", (5, 6))
    for i, prompt in enumerate(prompts):
        ids = preparer.prepare(prompt).ids
        assert engine.add_request(f"ok-{i}", prompt, SamplingParams(max_tokens=1)) == ids
    engine.abort_request([f"ok-{i}" for i in range(len(prompts))])
    engine.step()
    assert not engine.has_unfinished_requests()


def test_n_cap_at_the_cluster_before_placement(preparer) -> None:
    preparer.check_params(SamplingParams(n=4))
    with pytest.raises(InvalidRequestError, match="limit of 4") as err:
        preparer.check_params(SamplingParams(n=5))
    assert err.value.field == "n"


def test_the_checks_themselves() -> None:
    assert prompt_token_ids("ab", lambda s: [ord(c) for c in s], 200) == [97, 98]
    with pytest.raises(InvalidRequestError, match=r"\[0, 10\)"):
        prompt_token_ids([False], lambda s: [], 10)
    with pytest.raises(InvalidRequestError, match="encodes to no tokens") as err:
        prompt_token_ids("\x16", lambda s: [], 10)  # a tokenizer may drop every character
    assert err.value.field == "prompt"
    check_prompt_length(63, 64)
    with pytest.raises(InvalidRequestError, match="no room"):
        check_prompt_length(64, 64)
    check_n(16, 16)
    with pytest.raises(InvalidRequestError):
        check_n(17, 16)
