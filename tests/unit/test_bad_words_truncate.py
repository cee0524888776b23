"""vLLM's ``bad_words`` and ``truncate_prompt_tokens``: bad words banned by their definition
(the last token of a word wherever the output ends with its other tokens), against Hugging
Face's forward with that ban applied, across a prefill -> decode hand-off; prompts cut to their
last k tokens; clear errors for bad values."""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.errors import InvalidRequestError
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.llm_engine import LLMEngine
from tests.unit.test_disagg_engine import _drive, _engines

PROMPTS = [list(range(900 + 53 * i, 930 + 53 * i)) for i in range(3)]


def _greedy(n: int = 16, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)  # type: ignore[arg-type]


def _reference(tiny_hf, prompt: list[int], n: int, words: list[list[int]]) -> list[int]:
    """Greedy tokens with each word's last token set to -inf where the output ends with the
    word's other tokens."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = tiny_hf(input_ids=torch.tensor([ids])).logits[0, -1].clone()
            for w in words:
                head = w[:-1]
                if not head or (len(head) <= len(out) and out[len(out) - len(head):] == head):
                    logits[w[-1]] = float("-inf")
            nxt = int(logits.argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def _resolved(llm: LLM, words: list[str]) -> list[list[int]]:
    return llm.engine._bad_words_ids(words)


def test_each_word_is_taken_as_written_and_after_a_space(tiny_llm: LLM) -> None:
    tok = tiny_llm.engine.tokenizer
    ids = _resolved(tiny_llm, ["hello", " world"])
    assert tok.encode("hello", add_special_tokens=False) in ids
    assert tok.encode(" hello", add_special_tokens=False) in ids
    assert tok.encode("world", add_special_tokens=False) in ids  # leading space stripped first
    assert tok.encode(" world", add_special_tokens=False) in ids


def _word_of(tok, outputs: list[list[int]], size: int) -> tuple[str, list[int]]:
    """A word whose tokens (as written or after a space) are ``size`` consecutive tokens of
    one of ``outputs``: banning it must change that output."""
    for out in outputs:
        for i in range(len(out) - size + 1):
            ids = out[i:i + size]
            word = tok.decode(ids, skip_special_tokens=False).strip()
            if word and ids in (tok.encode(word, add_special_tokens=False),
                                tok.encode(" " + word, add_special_tokens=False)):
                return word, ids
    raise AssertionError(f"no word of {size} tokens round-trips in these outputs")


def test_greedy_with_bad_words_equals_the_reference(tiny_llm: LLM, tiny_hf) -> None:
    tok = tiny_llm.engine.tokenizer
    free = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, _greedy())]
    single, single_ids = _word_of(tok, free, 1)
    double, double_ids = _word_of(tok, free, 2)
    resolved = _resolved(tiny_llm, [single, double])
    assert single_ids in resolved and double_ids in resolved
    params = _greedy(bad_words=[single, double])
    got = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, params)]
    assert got == [_reference(tiny_hf, p, 16, resolved) for p in PROMPTS]
    assert got != free  # the ban changed the output
    for out in got:
        for w in resolved:
            assert not any(out[i:i + len(w)] == w for i in range(len(out)))


def test_every_sample_bans_them(tiny_llm: LLM) -> None:
    """With ``n`` > 1 and prompt logprobs (the first sample alone computes those), the other
    samples keep the resolved words."""
    tok = tiny_llm.engine.tokenizer
    free = tiny_llm.generate(PROMPTS[:1], SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=16,
                                                     ignore_eos=True))[0]
    outs = [c.token_ids for c in free.outputs]
    word, ids = _word_of(tok, outs[1:], 1)
    banned = tiny_llm.generate(PROMPTS[:1], SamplingParams(
        n=3, temperature=1.0, seed=4, max_tokens=16, ignore_eos=True, bad_words=[word],
        prompt_logprobs=0))[0]
    assert banned.prompt_logprobs is not None
    for c in banned.outputs:
        assert ids[0] not in c.token_ids


def test_bad_words_survive_the_handoff(tiny_model_dir, tiny_llm: LLM) -> None:
    tok = tiny_llm.engine.tokenizer
    free = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, _greedy(20))]
    params = _greedy(20, bad_words=[_word_of(tok, free, 2)[0], _word_of(tok, free[1:], 1)[0]])
    want = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, params)]
    assert want != free
    prefill, decode = _engines(tiny_model_dir)
    got = _drive(prefill, decode, PROMPTS, params)
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == want


def test_truncate_keeps_the_last_tokens(tiny_model_dir) -> None:
    llm = LLM(str(tiny_model_dir), num_kv_blocks=256, max_model_len=64)
    long = list(range(1000, 1100))  # 100 tokens: over the 64-token context
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([long], _greedy(4))
    assert e.value.field == "prompt"
    out = llm.generate([long], _greedy(4, truncate_prompt_tokens=40))[0]
    assert out.prompt_token_ids == long[-40:]
    assert out.outputs[0].token_ids == llm.generate([long[-40:]], _greedy(4))[0].outputs[0].token_ids
    short = llm.generate([long[:10]], _greedy(4, truncate_prompt_tokens=-1))[0]
    assert short.prompt_token_ids == long[:10]  # -1: up to the context; nothing cut here
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([long], _greedy(4, truncate_prompt_tokens=65))
    assert e.value.field == "truncate_prompt_tokens"
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


@pytest.mark.parametrize(("kw", "field"), [
    ({"bad_words": "word"}, "bad_words"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": ["  "]}, "bad_words"),
    ({"bad_words": [3]}, "bad_words"),
    ({"bad_words": ["w"] * 257}, "bad_words"),
    ({"bad_words": ["w" * 257]}, "bad_words"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": True}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 2.0}, "truncate_prompt_tokens"),
])
def test_bad_values_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    assert e.value.field == field


def test_truncating_an_image_prompt_is_refused(tiny_model_dir) -> None:
    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("a", {"prompt_token_ids": [5, 6, 7],
                              "multi_modal_data": {"image": [object()]}},
                        SamplingParams(truncate_prompt_tokens=2))
    assert e.value.field == "truncate_prompt_tokens"
    assert not eng.has_unfinished_requests()
