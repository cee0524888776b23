"""Speculative decoding on SmolLM2 with the real proposers: same tokens, drafts accepted.

The session's SmolLM2 engine is reused: its scheduler gets a speculator for the speculative
side of each comparison and loses it afterwards (the weights and the KV pool are the same).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve import SamplingParams
from splitserve.roles.engine.speculative import SpeculativeConfig, Speculator

_CODE = "\n".join(
    ln for ln in (Path(__file__).resolve().parents[2] / "roles" / "engine" / "block_pool.py")
    .read_text().splitlines()[40:70] if ln.strip()
)


def _copy_prompt(llm) -> list[int]:  # type: ignore[no-untyped-def]
    msg = f"Repeat this code exactly:\n\n```python\n{_CODE}\n```"
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": msg}], True)


def _run(llm, prompts, params, config=None):  # type: ignore[no-untyped-def]
    sched = llm.engine.scheduler
    sched.speculator = Speculator(SpeculativeConfig(**config)) if config else None
    try:
        outs = llm.generate(prompts, params)
        stats = sched.speculator.stats if sched.speculator else None
    finally:
        sched.speculator = None
    return [o.outputs[0].token_ids for o in outs], stats


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_copy_prompt_greedy_equal_and_accepted(smollm, method: str) -> None:
    prompt = _copy_prompt(smollm)
    params = SamplingParams(temperature=0.0, max_tokens=48)
    want, _ = _run(smollm, [prompt], params)
    got, stats = _run(smollm, [prompt], params,
                      {"method": method, "num_speculative_tokens": 5, "adaptive": False})
    assert got == want
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0, stats
    assert smollm.engine.kv.pool.num_free_blocks == smollm.engine.num_blocks


def test_seeded_sampling_and_a_batch_equal(smollm) -> None:
    prompts = [_copy_prompt(smollm), smollm.get_tokenizer().encode("The capital of France is")]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=32)
    want, _ = _run(smollm, prompts, params)
    got, stats = _run(smollm, prompts, params, {"method": "ngram", "num_speculative_tokens": 4})
    assert got == want
    assert stats.num_accepted_tokens > 0
