"""Prompt logprobs (vLLM's ``prompt_logprobs``): each prompt token's log-probability under the
model given the tokens before it, against Hugging Face's forward over the prompt; the same
values whatever the chunking, the batch or an earlier identical prompt in the prefix cache;
once per request across a prefill -> decode hand-off (the decode worker, which pulls the KV,
computes none); clear errors for bad values."""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.errors import InvalidRequestError
from tests.unit.test_disagg_engine import _drive, _engines

PROMPTS = [list(range(300 + 41 * i, 300 + 41 * i + 20 + 23 * i)) for i in range(3)]  # 20-66


def _hf_logprobs(tiny_hf, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V]: row p is the distribution of token p + 1."""
    with torch.no_grad():
        logits = tiny_hf(input_ids=torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _params(k: int = 3, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=k,
                          **kw)  # type: ignore[arg-type]


def _values(pl) -> list[tuple[int, float, int]]:
    """(token, logprob, rank) of each prompt token after the first."""
    out = []
    for step in pl[1:]:
        token, lp = next(iter(step.items()))  # the prompt token's own entry comes first
        out.append((token, lp.logprob, lp.rank))
    return out


def test_prompt_logprobs_equal_the_reference(tiny_llm: LLM, tiny_hf) -> None:
    outs = tiny_llm.generate(PROMPTS, _params(3))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        pl = out.prompt_logprobs
        assert pl is not None and len(pl) == len(prompt) and pl[0] is None
        ref = _hf_logprobs(tiny_hf, prompt)
        for p, step in enumerate(pl[1:]):
            token = prompt[p + 1]
            assert next(iter(step)) == token
            assert step[token].logprob == pytest.approx(float(ref[p, token]), abs=1e-4)
            assert step[token].rank == int((ref[p] > ref[p, token]).sum()) + 1
            top = torch.topk(ref[p], 3)
            gap = float(top.values[-1] - torch.topk(ref[p], 4).values[-1])
            others = {t: lp for t, lp in step.items() if lp.rank <= 3}
            assert len(others) == 3
            if gap > 1e-4:  # no near-tie at the cut: the same top 3
                assert set(others) == set(top.indices.tolist())
            for t, lp in others.items():
                assert lp.logprob == pytest.approx(float(ref[p, t]), abs=1e-4)
                assert lp.decoded_token is not None
        # the generated tokens are the ones a request without prompt logprobs gets
        plain = tiny_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4,
                                                       ignore_eos=True))[0]
        assert out.outputs[0].token_ids == plain.outputs[0].token_ids
        assert plain.prompt_logprobs is None


def test_zero_top_gives_the_prompt_tokens_own(tiny_llm: LLM) -> None:
    pl = tiny_llm.generate(PROMPTS[:1], _params(0))[0].prompt_logprobs
    assert pl is not None and all(len(step) == 1 for step in pl[1:])
    assert [next(iter(step)) for step in pl[1:]] == PROMPTS[0][1:]


def test_chunked_prompt_and_batch_give_the_same_values(tiny_model_dir, tiny_llm: LLM) -> None:
    whole = [_values(o.prompt_logprobs) for o in tiny_llm.generate(PROMPTS, _params(2))]
    chunked = LLM(str(tiny_model_dir), num_kv_blocks=256, max_num_batched_tokens=16)
    outs = chunked.generate(PROMPTS, _params(2))
    for got, want in zip((_values(o.prompt_logprobs) for o in outs), whole, strict=True):
        assert [t for t, _, _ in got] == [t for t, _, _ in want]
        assert [lp for _, lp, _ in got] == pytest.approx([lp for _, lp, _ in want], abs=1e-5)
    stats = chunked.engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_a_cached_prompt_is_computed_again_for_its_logprobs(tiny_model_dir) -> None:
    llm = LLM(str(tiny_model_dir), num_kv_blocks=256)
    prompt = PROMPTS[2]
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([prompt], plain)
    again = llm.generate([prompt], plain)[0]
    assert again.num_cached_tokens > 0  # the prefix cache holds the prompt...
    first = llm.generate([prompt], _params(1))[0]
    assert first.num_cached_tokens == 0  # ...which a prompt-logprobs request does not read
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(prompt)
    second = llm.generate([prompt], _params(1))[0]
    assert _values(second.prompt_logprobs) == _values(first.prompt_logprobs)
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


def test_other_requests_in_the_batch_are_unchanged(tiny_llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS[1:], greedy)]
    mixed = tiny_llm.generate([PROMPTS[0], *PROMPTS[1:]], [_params(2), greedy, greedy])
    assert [o.outputs[0].token_ids for o in mixed[1:]] == alone
    assert all(o.prompt_logprobs is None for o in mixed[1:])
    assert mixed[0].prompt_logprobs is not None


def test_n_samples_share_one_list(tiny_llm: LLM) -> None:
    out = tiny_llm.generate(PROMPTS[:1], SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=3,
                                                    prompt_logprobs=1))[0]
    assert len(out.outputs) == 3
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(PROMPTS[0])


def test_a_one_token_prompt_has_only_none(tiny_llm: LLM) -> None:
    assert tiny_llm.generate([[1234]], _params(2))[0].prompt_logprobs == [None]


def test_sent_once_across_the_handoff(tiny_model_dir, tiny_llm: LLM) -> None:
    """The prefill worker computes them and sends them with its hand-off; the decode worker
    pulls the prompt's KV instead of computing it, so it has none to send (were the KV not
    moved, it would compute the prompt and send them again)."""
    params = _params(2)
    want = {f"r{i}": o for i, o in enumerate(tiny_llm.generate(PROMPTS, params))}
    prefill, decode = _engines(tiny_model_dir)
    seen: dict[str, list] = {}
    for name, engine in (("prefill", prefill), ("decode", decode)):
        step = engine.step

        def spy(step=step, name=name):  # type: ignore[no-untyped-def]
            outs = step()
            for out in outs:
                if out.prompt_logprobs is not None:
                    seen.setdefault(out.request_id, []).append((name, out.prompt_logprobs))
            return outs

        engine.step = spy  # type: ignore[method-assign]
    got = _drive(prefill, decode, PROMPTS, params)
    for rid, out in want.items():
        assert got[rid] == out.outputs[0].token_ids
        assert [name for name, _ in seen[rid]] == ["prefill"]
        got_v, want_v = _values(seen[rid][0][1]), _values(out.prompt_logprobs)
        assert [t for t, _, _ in got_v] == [t for t, _, _ in want_v]
        assert [v for _, v, _ in got_v] == pytest.approx([v for _, v, _ in want_v], abs=1e-5)
    assert decode.stats()["num_loading_kv"] == 0
    for eng in (prefill, decode):
        assert eng.kv.pool.num_free_blocks == eng.num_blocks


@pytest.mark.parametrize("value", [-1, 21, True, 2.0, "3"])
def test_bad_values_name_the_field(value: object) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(prompt_logprobs=value)  # type: ignore[arg-type]
    assert e.value.field == "prompt_logprobs"
