"""Tiny random models of every served family, written by transformers itself, and the
reference greedy decoding (with each step's top-2 logit gap, to tell a true near-tie)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.utils import _tiny_init

WINDOW = 24
"""Sliding window of the tiny windowed models: shorter than most test prompts, not a
multiple of the block size."""

VOCAB = 4096
"""Vocabulary of the tiny models: the first 4096 SmolLM2 tokens (a small logits head keeps
the reference runs short; prompts and outputs stay inside it)."""

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False,
)
_WINDOWS = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def _longrope(rotary_dim: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    short = (1 + 2 * torch.rand(rotary_dim // 2, generator=g)).tolist()
    long = (2 + 4 * torch.rand(rotary_dim // 2, generator=g)).tolist()
    return {"rope_type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": 512, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5}


FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": ("Qwen3", dict(head_dim=32, use_sliding_window=True, sliding_window=WINDOW,
                            max_window_layers=2)),
    "phi3": ("Phi3", dict(sliding_window=WINDOW,
                          original_max_position_embeddings=512)),
    "gemma2": ("Gemma2", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                              attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                              tie_word_embeddings=True)),
    "gemma3": ("Gemma3Text", dict(head_dim=16, sliding_window=WINDOW, layer_types=_WINDOWS,
                                  query_pre_attn_scalar=16, tie_word_embeddings=True,
                                  rope_parameters={
                                      "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                         "rope_theta": 100000.0},
                                      "sliding_attention": {"rope_type": "default",
                                                            "rope_theta": 1000.0}})),
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                   norm_topk_prob=False, mlp_only_layers=[1])),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    # multipliers far from 1 (and from each other); untied: with Granite's tied embeddings
    # and a small residual multiplier a random model only repeats its last token
    "granite": ("Granite", dict(embedding_multiplier=6.0, residual_multiplier=0.22,
                                attention_multiplier=0.09, logits_scaling=4.0)),
    # multipliers too, but a stream the experts still move (with Granite's 6x embeddings
    # they hardly change a random model's tokens)
    "granite_moe": ("GraniteMoe", dict(num_local_experts=4, num_experts_per_tok=2,
                                       embedding_multiplier=1.5, residual_multiplier=0.6,
                                       attention_multiplier=0.09, logits_scaling=4.0)),
    # no pre-norms: each sub-block normed after; q/k norms over the whole projection
    "olmo2": ("Olmo2", dict()),
    # NoPE on layers 1 and 3 (rotary on 0 and 2), windows on the NoPE layer 1 only
    "smollm3": ("SmolLM3", dict(no_rope_layers=[1, 0, 1, 0], use_sliding_window=True,
                                sliding_window=WINDOW,
                                layer_types=["full_attention", "sliding_attention",
                                             "full_attention", "full_attention"])),
}


def make_family_model(
    family: str, path: Path, tokenizer_dir: Path, seed: int = 0,
    overrides: dict[str, Any] | None = None, max_shard_size: str | None = None,
) -> Path:
    """A random ``family`` model saved with ``save_pretrained`` plus the SmolLM2 tokenizer
    (``overrides``: config values to change, e.g. a larger size for benchmarks).

    Weights are redrawn at wider scales than transformers' init (``tests.utils._tiny_init``)
    so greedy margins are wide and a reference check does not hinge on float noise.
    """
    import transformers
    from transformers import AutoTokenizer

    prefix, extra = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config_cls = getattr(transformers, f"{prefix}Config")
    values = {**_COMMON, **extra, **(overrides or {})}
    if family == "phi3":  # its LongRoPE factors cover exactly the rotary dims
        rotary = values.get("head_dim", values["hidden_size"] // values["num_attention_heads"]) // 2
        values["rope_scaling"] = _longrope(rotary)
    if family != "qwen3_moe":
        values.pop("num_experts", None)
        values.pop("moe_intermediate_size", None)
    if family not in ("mixtral", "granite_moe"):
        values.pop("num_local_experts", None)
    config = config_cls(vocab_size=VOCAB, **values)
    model_cls = getattr(transformers, f"{prefix.removesuffix('Text')}ForCausalLM")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_tiny_init(name, p, g))
    model.save_pretrained(str(path), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(str(path))
    return path


def hf_greedy(model: Any, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens with transformers' own KV cache, and each step's top-2 logit gap."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens, gaps = [], []
    for _ in range(n):
        logits = out.logits[0, -1].float()
        top = torch.topk(logits, 2).values
        tokens.append(int(logits.argmax()))
        gaps.append(float(top[0] - top[1]))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                    use_cache=True)
    return tokens, gaps


NEAR_TIE = 1e-3


def count_near_ties(ours: list[list[int]], ref: list[tuple[list[int], list[float]]]) -> int:
    """Compare greedy sequences; a divergence is accepted only where the reference's top-2
    gap is below NEAR_TIE (the rest of that sequence is then not compared). Returns how many
    were accepted; any other difference fails with the position and gap."""
    ties = 0
    for i, (got, (want, gaps)) in enumerate(zip(ours, ref, strict=True)):
        assert len(got) == len(want), f"prompt {i}: {len(got)} tokens, expected {len(want)}"
        for pos, (a, b) in enumerate(zip(got, want, strict=True)):
            if a != b:
                assert gaps[pos] < NEAR_TIE, (
                    f"prompt {i} token {pos}: got {a}, transformers {b} (top-2 gap {gaps[pos]:.4g})"
                )
                ties += 1
                break
    return ties
