"""Allowed token ids, logit bias and repetition / frequency / presence penalties: against Hugging Face's forward
with the penalties applied by a reference written from their definitions (transformers' own
``RepetitionPenaltyLogitsProcessor`` for the repetition penalty), the same tokens across a
prefill -> decode hand-off and under speculation, and clear errors for bad values."""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.errors import InvalidRequestError
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.llm_engine import LLMEngine
from tests.unit.test_disagg_engine import _drive, _engines

PROMPTS = [list(range(700 + 37 * i, 730 + 37 * i)) for i in range(3)]


def _reference(tiny_hf, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    """Greedy tokens with the bias and penalties applied by their definitions."""
    from transformers import RepetitionPenaltyLogitsProcessor

    rep = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = tiny_hf(input_ids=torch.tensor([ids])).logits[0, -1].clone()
            if params.allowed_token_ids:
                keep = torch.full_like(logits, float("-inf"))
                keep[params.allowed_token_ids] = logits[params.allowed_token_ids]
                logits = keep
            for token, bias in (params.logit_bias or {}).items():
                logits[token] += bias
            if params.repetition_penalty != 1.0:
                logits = rep(torch.tensor([ids]), logits[None])[0]
            for token in set(out):  # OpenAI: mu - c * alpha_freq - (c > 0) * alpha_presence
                logits[token] -= out.count(token) * params.frequency_penalty
                logits[token] -= params.presence_penalty
            nxt = int(logits.argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def _greedy(n: int = 20, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [
    {"repetition_penalty": 1.8},
    {"repetition_penalty": 0.6},
    {"repetition_penalty": 0.6, "frequency_penalty": -2.0, "presence_penalty": -2.0},
    # the random model's logits spread ~4 and it seldom repeats itself: a bias makes it
    # repeat a token, which the penalties then push back
    {"logit_bias": {1234: 20.0}, "frequency_penalty": 2.0},
    {"logit_bias": {1234: 20.0}, "presence_penalty": 2.0, "frequency_penalty": 1.0},
    {"logit_bias": {1234: 20.0}, "presence_penalty": 2.0, "repetition_penalty": 1.5},
    {"logit_bias": {5: 16.0, 900: -100.0, 1234: 15.0}},
    {"allowed_token_ids": [5, 77, 900, 1234, 4000, 30000]},
    {"allowed_token_ids": [5, 77, 900, 1234], "logit_bias": {77: 5.0}, "frequency_penalty": 2.0},
])
def test_greedy_with_penalties_equals_the_reference(tiny_llm: LLM, tiny_hf, kw: dict) -> None:
    params = _greedy(**kw)
    got = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, params)]
    want = [_reference(tiny_hf, p, 20, params) for p in PROMPTS]
    assert got == want
    # the penalties, and the bias, each changed the output (a test that passes when they are
    # ignored proves nothing)
    if "allowed_token_ids" in kw:
        assert {t for ids in got for t in ids} <= set(kw["allowed_token_ids"])
    penalties = {k: v for k, v in kw.items() if k != "logit_bias"}
    others = [_greedy(**penalties), _greedy(logit_bias=kw["logit_bias"])] if (
        penalties and "logit_bias" in kw) else [_greedy()]
    for other in others:
        assert [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, other)] != got


def test_logit_bias_forces_and_bans_tokens_when_sampling_too(tiny_llm: LLM) -> None:
    forced = tiny_llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=3, max_tokens=12,
                                                   ignore_eos=True, logit_bias={4321: 100.0}))
    assert all(o.outputs[0].token_ids == [4321] * 12 for o in forced)
    free = tiny_llm.generate(PROMPTS, _greedy(12))
    banned = {t for o in free for t in o.outputs[0].token_ids}
    out = tiny_llm.generate(PROMPTS, _greedy(12, logit_bias={t: -100.0 for t in banned}))
    assert not banned & {t for o in out for t in o.outputs[0].token_ids}


def test_logprobs_stay_the_models(tiny_llm: LLM) -> None:
    """As vLLM's default (raw logprobs): a bias changes the pick, not the reported logprob."""
    free = tiny_llm.generate(PROMPTS[:1], _greedy(1, logprobs=0))[0].outputs[0]
    first = free.token_ids[0]
    biased = tiny_llm.generate(PROMPTS[:1], _greedy(1, logprobs=0, logit_bias={first: -100.0}))
    out = biased[0].outputs[0]
    assert out.token_ids[0] != first
    assert out.logprobs[0][out.token_ids[0]].logprob < free.logprobs[0][first].logprob


def test_seeded_sampling_with_penalties_survives_the_handoff(tiny_model_dir, tiny_llm: LLM) -> None:
    """Prefill worker samples the first token, the decode worker the rest: the penalties see
    the same tokens there, so the output is the single engine's."""
    for params in (
        SamplingParams(temperature=0.8, seed=11, max_tokens=24, ignore_eos=True,
                       frequency_penalty=1.2, repetition_penalty=1.4),
        _greedy(24, presence_penalty=1.5, logit_bias={77: 4.0}),
    ):
        prefill, decode = _engines(tiny_model_dir)
        got = _drive(prefill, decode, PROMPTS, params)
        want = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, params)]
        assert [got[f"r{i}"] for i in range(len(PROMPTS))] == want
        for eng in (prefill, decode):
            assert eng.kv.pool.num_free_blocks == eng.num_blocks


def test_speculation_with_penalties_is_exact(tiny_model_dir, tiny_llm: LLM) -> None:
    """Each verify row is adjusts_logits with the draft before it: outputs equal the engine's
    without speculation, with drafts both accepted and rejected."""
    from tests.unit.test_structured_engine import _OracleProposer

    params = [
        _greedy(30, frequency_penalty=1.0, repetition_penalty=1.2),
        SamplingParams(temperature=0.9, seed=5, max_tokens=30, ignore_eos=True,
                       presence_penalty=1.0),
        _greedy(30),
    ]
    want = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, params)]
    spec = LLM(str(tiny_model_dir), num_kv_blocks=256,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "adaptive": False})
    eos = min(spec.engine.tokenizer.eos_token_ids)
    spec.engine.scheduler.speculator.proposer = _OracleProposer(
        {tuple(p): w for p, w in zip(PROMPTS, want, strict=True)}, eos)
    got = spec.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in got] == want
    stats = spec.engine.stats()
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(tiny_llm: LLM) -> None:
    """As vLLM: until ``min_tokens`` the stop tokens (EOS, ``stop_token_ids``) are banned, so
    the model says something else (not: EOS drawn and ignored), and stop strings do not end
    the request."""
    eos = min(tiny_llm.engine.tokenizer.eos_token_ids)
    plain = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, _greedy(8))]
    assert not {eos, 1234} & {t for ids in plain for t in ids}
    # a bias makes the stop token the pick at every step: the first min_tokens are the
    # model's own choice without it, the next one stops
    for stop_kw, stop in (({}, eos), ({"stop_token_ids": [1234]}, 1234)):
        params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=5,
                                logit_bias={stop: 100.0}, **stop_kw)  # type: ignore[arg-type]
        for out, want in zip(tiny_llm.generate(PROMPTS, params), plain, strict=True):
            c = out.outputs[0]
            assert c.token_ids == want[:5] + [stop] and c.finish_reason == "stop", c
        sampled = SamplingParams(temperature=1.0, seed=4, max_tokens=20, min_tokens=5,
                                 logit_bias={stop: 100.0}, **stop_kw)  # type: ignore[arg-type]
        for out in tiny_llm.generate(PROMPTS, sampled):
            ids = out.outputs[0].token_ids
            assert len(ids) == 6 and ids[-1] == stop and stop not in ids[:5]
    # the text of the first token as a stop string: it ends a plain request there, not one
    # that asks for 4 tokens at least (an occurrence within them is never looked for)
    tok = tiny_llm.get_tokenizer()
    first = next(i for i, ids in enumerate(plain) if tok.decode(ids[:1]).strip())
    stop_str = tok.decode(plain[first][:1])
    kw = {"temperature": 0.0, "max_tokens": 4, "stop": [stop_str], "ignore_eos": True}
    early = tiny_llm.generate([PROMPTS[first]], SamplingParams(**kw))[0].outputs[0]
    assert early.token_ids == plain[first][:1] and early.finish_reason == "stop"
    held = tiny_llm.generate([PROMPTS[first]], SamplingParams(min_tokens=4, **kw))[0].outputs[0]
    assert held.token_ids == plain[first][:4]


def test_min_tokens_survives_the_handoff_and_speculation(tiny_model_dir, tiny_llm: LLM) -> None:
    """The prefill worker draws the first token, the decode worker the rest; verify rows ban
    the stop tokens by their own position: the single engine's tokens either way."""
    from tests.unit.test_structured_engine import _OracleProposer

    eos = min(tiny_llm.engine.tokenizer.eos_token_ids)
    params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=7,
                            logit_bias={eos: 100.0})
    want = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, params)]
    assert all(len(w) == 8 and w[-1] == eos for w in want)
    prefill, decode = _engines(tiny_model_dir)
    got = _drive(prefill, decode, PROMPTS, params)
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == want
    spec = LLM(str(tiny_model_dir), num_kv_blocks=256,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "adaptive": False})
    # the oracle drafts the true tokens with EOS in place of output token 2 (and every sixth
    # after it): the verify rows before min_tokens must refuse it
    spec.engine.scheduler.speculator.proposer = _OracleProposer(
        {tuple(p): w for p, w in zip(PROMPTS, want, strict=True)}, eos)
    assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, params)] == want
    stats = spec.engine.stats()
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]


@pytest.mark.parametrize(("kw", "field"), [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [3, -1]}, "allowed_token_ids"),
    ({"allowed_token_ids": [True]}, "allowed_token_ids"),
])
def test_bad_values_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    assert e.value.field == field


def test_a_bias_outside_the_vocabulary_is_refused_at_intake(tiny_model_dir) -> None:
    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))
    vocab = eng.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as e:
        eng.add_request("a", [5, 6, 7], SamplingParams(logit_bias={vocab: 1.0}))
    assert e.value.field == "logit_bias"
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as e:
        eng.add_request("a", [5, 6, 7], SamplingParams(allowed_token_ids=[4, vocab]))
    assert e.value.field == "allowed_token_ids"
    assert not eng.has_unfinished_requests()
    eng.add_request("b", [5, 6, 7], SamplingParams(logit_bias={vocab - 1: 1.0}, max_tokens=2))
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.kv.pool.num_free_blocks == eng.num_blocks
