"""A pre-norm layer's decode step in one native call (``native.decode_layer``: the quantized
projections with their norm and activation prologues, rotary + K/V store, paged attention)
gives the bits of the separate calls: the same tokens and log-probabilities, with the one-call
path counted and then switched off. Where it does not apply (float weights, a prompt chunk in
the step) the separate calls run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from splitserve import LLM, SamplingParams
from splitserve.kernels import native
from tests.families import make_family_model

PROMPTS = [[5 + (11 * i + j) % 700 for j in range(n)] for i, n in enumerate((4, 33, 70))]


def _run(llm: LLM) -> list[tuple[list[int], Any]]:
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("family,quantization,dtype", [
    ("llama", "int4", "float32"), ("qwen3", "int8", "bfloat16"), ("phi3", "int4", "float32"),
    ("llama", "w4a8", "bfloat16"),
])
def test_one_call_layers_give_the_bits_of_the_separate_calls(
    tmp_path: Path, tokenizer_dir: Path, tiny_model_dir: Path, family: str, quantization: str,
    dtype: str,
) -> None:
    """Llama (the tiny GQA model), Qwen3 (q/k norms, a sliding window), Phi-3."""
    folder = (tiny_model_dir if family == "llama"
              else make_family_model(family, tmp_path / family, tokenizer_dir))
    llm = LLM(str(folder), quantization=quantization, dtype=dtype, num_kv_blocks=64)
    layers = llm.engine.runner.model.layers  # type: ignore[attr-defined]
    before = native.calls["decode_layer"]
    one_call = _run(llm)
    # every decode step after the prompts ran each layer in one call (9 steps of decodes)
    assert native.calls["decode_layer"] - before >= 9 * len(layers)
    for layer in layers:
        layer._one_call = False
    before = native.calls["decode_layer"]
    separate = _run(llm)
    assert native.calls["decode_layer"] == before
    assert one_call == separate


def test_float_weights_keep_the_separate_calls(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), quantization="none", num_kv_blocks=64)
    before = native.calls["decode_layer"]
    _run(llm)
    assert native.calls["decode_layer"] == before
    assert all(layer._one_call is False for layer in llm.engine.runner.model.layers)  # type: ignore[attr-defined]


def test_a_reported_error_reruns_the_separate_calls_which_name_it(tiny_model_dir: Path) -> None:
    """A block id past the cache: decode_layer reports it, the separate calls rerun and raise
    the kernel's error naming the entry; a good step through the same layer is unchanged."""
    import torch

    from splitserve.kernels.checks import KernelInputError
    from splitserve.roles.models.blocks import AttentionMetadata

    llm = LLM(str(tiny_model_dir), quantization="int4", num_kv_blocks=16)
    runner = llm.engine.runner  # type: ignore[attr-defined]
    layer, cache = runner.model.layers[0], runner.kv_caches[0]
    block_size = cache.shape[2]
    hidden = torch.randn(2, layer.attn.qkv.in_features)

    def meta(table: list[list[int]]) -> AttentionMetadata:
        empty = torch.zeros(0, 1, dtype=torch.int32)
        return AttentionMetadata(
            slot_mapping=torch.tensor([3, block_size + 1]), num_decode=2,
            decode_block_tables=torch.tensor(table, dtype=torch.int32),
            decode_context_lens=torch.tensor([4, 2], dtype=torch.int32),
            prefill_block_tables=empty, prefill_query_start_loc=torch.zeros(1, dtype=torch.int32),
            prefill_context_lens=torch.zeros(0, dtype=torch.int32))

    positions = torch.tensor([3, 1])
    before = native.calls["decode_layer"]
    good = layer.forward(positions, hidden, None, cache, meta([[0], [1]]))
    assert native.calls["decode_layer"] == before + 1
    layer._one_call = False
    assert all(torch.equal(a, b) for a, b in zip(
        good, layer.forward(positions, hidden, None, cache, meta([[0], [1]])), strict=True))
    layer._one_call = None
    with pytest.raises(KernelInputError, match=r"block_tables\[1, 0\] = 99"):
        layer.forward(positions, hidden, None, cache, meta([[0], [99]]))
    assert native.calls["decode_layer"] == before + 2
