"""The single engine on a tiny random Llama: batching, prefix caching, preemption, sampling."""

from __future__ import annotations

import dataclasses
import random

import pytest

from splitserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=512, max_num_batched_tokens=256)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_batch_equals_alone(llm: LLM) -> None:
    prompts = _prompts(16)
    together = _tokens(llm.generate(prompts, GREEDY))
    alone = [_tokens(llm.generate([p], GREEDY))[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 12 for t in together)
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


def test_prefix_cache_hits_and_same_tokens(llm: LLM, tiny_model_dir) -> None:
    prefix = _prompts(1, seed=1, lo=64, hi=64)[0]
    first, second = prefix + [11, 12, 13], prefix + [21, 22]
    llm.generate([first], GREEDY)
    hits_before = llm.engine.kv.num_prefix_hits
    out = llm.generate([second], GREEDY)[0]
    assert out.num_cached_tokens == 64
    assert llm.engine.kv.num_prefix_hits - hits_before == 64
    no_cache = LLM(str(tiny_model_dir), num_kv_blocks=512, enable_prefix_caching=False)
    assert out.outputs[0].token_ids == _tokens(no_cache.generate([second], GREEDY))[0]
    assert no_cache.generate([second], GREEDY)[0].num_cached_tokens == 0


def test_preemption_gives_same_tokens(llm: LLM, tiny_model_dir) -> None:
    prompts = _prompts(8, seed=2, lo=20, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    big = _tokens(llm.generate(prompts, params))
    # 12 blocks of 16 = 192 slots: every request fits alone (<= 80 tokens), not all at once
    small = LLM(str(tiny_model_dir), num_kv_blocks=12, enable_prefix_caching=False)
    assert _tokens(small.generate(prompts, params)) == big
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv.pool.num_free_blocks == 12


def test_chunked_prefill_equals_whole(tiny_model_dir) -> None:
    prompts = _prompts(4, seed=3, lo=100, hi=300)
    whole = LLM(str(tiny_model_dir), num_kv_blocks=256, max_num_batched_tokens=2048)
    chunked = LLM(str(tiny_model_dir), num_kv_blocks=256, max_num_batched_tokens=37)
    assert _tokens(chunked.generate(prompts, GREEDY)) == _tokens(whole.generate(prompts, GREEDY))


def test_seeded_sampling_is_reproducible_and_replayable(llm: LLM) -> None:
    prompt = _prompts(1, seed=4)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16,
                            ignore_eos=True)
    a = _tokens(llm.generate([prompt], params))[0]
    b = _tokens(llm.generate([prompt, _prompts(1, seed=5)[0]], params))[0]
    assert a == b
    other = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=16,
                           ignore_eos=True)
    assert _tokens(llm.generate([prompt], other))[0] != a
    # replay: prompt + the first 6 tokens, same seed, continues identically
    replay = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=10,
                            ignore_eos=True)
    assert _tokens(llm.generate([prompt + a[:6]], replay))[0] == a[6:]


def test_unseeded_sampling_differs_between_requests(llm: LLM) -> None:
    prompt = _prompts(1, seed=6)[0]
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    outs = _tokens(llm.generate([prompt] * 4, params))
    assert len({tuple(t) for t in outs}) > 1


def test_n_samples(llm: LLM) -> None:
    prompt = _prompts(1, seed=7)[0]
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert out.finished


def test_stop_strings_never_leak(llm: LLM) -> None:
    prompt = _prompts(1, seed=8)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    text = full[0].outputs[0].text
    stop = text[10:13]
    assume = text.index(stop)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]))[0]
    c = out.outputs[0]
    assert c.text == text[:assume]
    assert stop not in c.text
    assert c.finish_reason == "stop" and c.stop_reason == stop
    keep = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, stop=stop,
                                                 include_stop_str_in_output=True))[0]
    assert keep.outputs[0].text == text[: assume + len(stop)]
    # a stop string in the last token max_tokens allows: stopped by it, not by length
    for prompt in _prompts(8, seed=18):  # one whose last token's text appears only there
        short = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6,
                                                      ignore_eos=True))[0].outputs[0]
        tail = short.text[len(llm.engine.tokenizer.decode(short.token_ids[:5])):]
        if tail.strip() and short.text.index(tail) == len(short.text) - len(tail):
            break
    else:
        pytest.fail("no prompt of 8 ends on a token whose text is new")
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                stop=[tail]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == tail
    assert cut.text == short.text[: -len(tail)] and cut.token_ids == short.token_ids


def test_stop_token_ids_and_length(llm: LLM) -> None:
    prompt = _prompts(1, seed=9)[0]
    toks = _tokens(llm.generate([prompt], GREEDY))[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                stop_token_ids=[toks[3]]))[0].outputs[0]
    assert out.token_ids == toks[: toks.index(toks[3]) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == toks[3]
    assert llm.generate([prompt], GREEDY)[0].outputs[0].finish_reason == "length"
    # the ending token's text is left out (vLLM's detokenizer skips it), its id kept;
    # include_stop_str_in_output keeps the text too
    tok = llm.engine.tokenizer
    assert out.text == tok.decode(out.token_ids[:-1])
    keep = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                 stop_token_ids=[toks[3]],
                                                 include_stop_str_in_output=True))[0].outputs[0]
    assert keep.token_ids == out.token_ids and keep.text == tok.decode(out.token_ids)
    assert keep.text != out.text
    # so is an end id's, special tokens shown or not
    eos = tok.eos_token_id
    ends = SamplingParams(temperature=0.0, max_tokens=4, logit_bias={eos: 100.0},
                          skip_special_tokens=False)
    first = llm.generate([prompt], ends)[0].outputs[0]
    assert first.token_ids == [eos] and first.text == "" and first.finish_reason == "stop"
    shown = llm.generate([prompt], dataclasses.replace(ends, include_stop_str_in_output=True))
    assert shown[0].outputs[0].text == tok.decode([eos], skip_special_tokens=False) != ""


def test_logprobs(llm: LLM) -> None:
    out = llm.generate([_prompts(1, seed=10)[0]],
                       SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry[tok].rank == 1  # greedy picks the most likely
        assert len(entry) == 3
        assert all(lp.logprob <= 0 for lp in entry.values())
