"""Tiny random Llamas from Hugging Face folders equal transformers (Llama-3 RoPE, bf16, tied)."""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams
from tests.utils import make_tiny_llama

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}
PROMPTS = [[11, 400, 9000, 3, 77], list(range(1000, 1300)), [5] * 40 + list(range(60, 90))]


def _hf_greedy(folder, dtype, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("llama3-rope", {"rope_scaling": LLAMA3_ROPE, "max_pos": 2048}),
     ("tied-gqa3", {"tie": True, "heads": 6, "kv_heads": 2, "hidden": 96})],
)
def test_tiny_fp32_equals_transformers(tmp_path, tokenizer_dir, name, kwargs) -> None:
    folder = make_tiny_llama(tmp_path / name, tokenizer_dir, seed=3, **kwargs)
    llm = LLM(str(folder), num_kv_blocks=128)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert ours == [_hf_greedy(folder, torch.float32, p, 12) for p in PROMPTS]


def test_tiny_bf16_runs_and_follows_fp32(tmp_path, tokenizer_dir) -> None:
    folder = make_tiny_llama(tmp_path / "bf16", tokenizer_dir, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    bf16 = LLM(str(folder), dtype="bfloat16", num_kv_blocks=64)
    assert bf16.engine.runner.kv_caches[0].dtype == torch.bfloat16
    ours = [o.outputs[0].token_ids for o in bf16.generate(PROMPTS[:2], params)]
    alone = [bf16.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS[:2]]
    assert ours == alone
    # the first greedy token has a wide margin on this model: bf16 rounding must not move it
    fp32 = LLM(str(folder), num_kv_blocks=64)
    first32 = [o.outputs[0].token_ids[0] for o in fp32.generate(PROMPTS[:2], params)]
    assert [t[0] for t in ours] == first32
