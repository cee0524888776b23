"""The last layer runs only for the sampled rows in steps with prompt rows
(``model_runner._prune``): every row still stores its K/V, the other rows' attention, MLP and
final norm are skipped, and what is sampled does not change: the same tokens and the same
log-probabilities, bit for bit, with the pruning off (``SPLITSERVE_PRUNE_LAST_LAYER=0``),
through chunked prefill (chunks that do not end their prompt keep no row), prefix-cache hits
and steps that mix decodes with prompt chunks. (Bit for bit because the CPU's prompt
attention runs each row as a decode row up to a 256-token span, and a kept row attends as a
decode row; past that span the prompt path is torch's fused SDPA, whose rounding differs.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from splitserve import LLM, SamplingParams
from tests.families import make_family_model

PROMPTS = [[5 + (7 * i + j) % 900 for j in range(n)] for i, n in enumerate((3, 40, 97, 150))]


def _run(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[Any]]]:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, params)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _rows_through_last_mlp(llm: LLM) -> list[int]:
    """Wrap the last layer's MLP: the row count of each call is recorded."""
    model = llm.engine.runner.model  # type: ignore[attr-defined]
    layer = model.layers[-1]
    seen: list[int] = []
    forward = layer.mlp.forward_normed  # the layers' entry: norm, then the MLP

    def counting(x: torch.Tensor, residual: torch.Tensor, norm: object) -> object:
        seen.append(x.shape[0])
        return forward(x, residual, norm)

    layer.mlp.forward_normed = counting
    return seen


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])  # pre-norm and sandwich layers
def test_pruning_keeps_every_sampled_bit(family: str, tmp_path: Path, tokenizer_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_family_model(family, tmp_path / family, tokenizer_dir)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SPLITSERVE_PRUNE_LAST_LAYER", flag)
        # a 64-token step budget: the long prompts take several chunks, and later steps mix
        # decodes with the chunks of prompts still running
        llm = LLM(str(folder), num_kv_blocks=128, max_num_batched_tokens=64, max_num_seqs=4)
        seen = _rows_through_last_mlp(llm)
        first = _run(llm, PROMPTS)
        again = _run(llm, PROMPTS[1:3])  # prefix-cache hits: only the prompts' tails run
        results[flag] = (first, again, seen)
    assert results["1"][0] == results["0"][0]  # tokens and log-probabilities, exactly
    assert results["1"][1] == results["0"][1]
    assert results["1"][1] == [results["0"][0][1], results["0"][0][2]]
    unpruned, pruned = results["0"][2], results["1"][2]
    assert max(unpruned) > 4  # prompt chunks ran every row through the last MLP ...
    assert max(pruned) <= 4  # ... and now only the sampled rows (at most 4 sequences)
    assert sum(pruned) < sum(unpruned)


def test_a_chunk_that_ends_no_prompt_keeps_no_row(tmp_path: Path, tokenizer_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A 150-token prompt in 64-token chunks: the first two chunks sample nothing, so the last
    layer computes only their K/V (the MLP never runs for them); the third samples one row."""
    monkeypatch.setenv("SPLITSERVE_PRUNE_LAST_LAYER", "1")
    folder = make_family_model("qwen3", tmp_path / "q", tokenizer_dir)
    llm = LLM(str(folder), num_kv_blocks=64, max_num_batched_tokens=64)
    seen = _rows_through_last_mlp(llm)
    out = llm.generate([PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=3,
                                                    ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    assert seen == [1, 1, 1]  # the last chunk's sampled row, then two decode steps
