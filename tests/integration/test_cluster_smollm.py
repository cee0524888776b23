"""SmolLM2 through 1 prefill + 1 decode worker equals the single engine, token for token."""

from __future__ import annotations

import pytest

from splitserve import Cluster, SamplingParams
from tests.utils import assert_workers_intact

pytestmark = [pytest.mark.ray, pytest.mark.ucx]

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
    "Write a haiku about autumn.", "Who wrote Romeo and Juliet?", "What is photosynthesis?",
    "Give me a synonym for happy.", "How many legs does a spider have?",
    "What is the boiling point of water?", "Translate 'thank you' into French.",
    "What does a compiler do?", "Name a planet with rings.", "What is the largest ocean?",
    "Explain gravity in one sentence.", "What color is the sky on a clear day?",
    "What is the square root of 81?",
]


def test_smollm_pd_equals_single_engine(smollm) -> None:
    tok = smollm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    want = [o.outputs[0].token_ids for o in smollm.generate(prompts, params)]
    with Cluster.local(prefill=1, decode=1, kv_cache_memory_bytes=256 << 20,
                       router={"local_prefill_max_tokens": 0}) as cluster:
        got = [o.outputs[0].token_ids for o in cluster.generate(prompts, params)]
        status = cluster.status()
        assert_workers_intact(h for h in cluster.workers.values() if h.healthy)
    assert got == want
    prefill = next(w for w in status["workers"] if w["role"] == "prefill")
    assert prefill["prefix_cache_queries"] >= sum(len(p) for p in prompts)
