"""Per-architecture throughput: splitserve vs Hugging Face `generate`, same requests, same run.

For each family (Qwen3, Phi-3, Gemma 2, Gemma 3 text, Qwen3-MoE, Mixtral) a tiny random
model (the tests' ``tests/families.py``) and, with ``--medium``, a ~100M-parameter random
model of the same family (MoE included); 16 concurrent requests (prompts of 64-192 tokens,
--out-len output tokens each, greedy, EOS ignored). splitserve takes all 16 at once (``LLM``
with its defaults: float32, chunked prefill, prefix caching); Hugging Face runs them as one
left-padded batch of 16 in one ``generate`` call (float32, the model's default attention:
SDPA, eager for Gemma 2's soft-capped scores; MoE experts as ``grouped_mm``, its default). Both sides load once, then take turns
on --repeats fresh request sets (no prefix-cache hit across sets); each side's best set
counts, so a burst of load from other jobs on a shared machine skews neither side alone.
Prints output tokens/s of each, the ratio (target: splitserve >= 2x) and the load average.
``--clock cpu --threads 1`` divides by the process's CPU time instead of wall time: on a
machine that other jobs keep busy it shows what each side itself costs (wall time then
measures the other jobs as much as ours).

    python bench/models.py [--families gemma2,mixtral] [--medium | --only-medium]
                           [--out-len 32] [--repeats 3] [--clock wall|cpu] [--threads N]
                           [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_throughput import hf_generate, make_requests  # noqa: E402
from tests.families import FAMILIES, VOCAB, make_family_model  # noqa: E402
from tests.utils import smollm_tokenizer_dir  # noqa: E402

NUM_REQUESTS = 16
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]
"""The timer both sides use (``--clock``)."""
MEDIUM = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=4, head_dim=64)
"""~100M parameters with the 4096-token vocabulary (MoE: experts of 512, fewer layers)."""
MEDIUM_MOE = dict(MEDIUM, num_hidden_layers=8, moe_intermediate_size=512, intermediate_size=512,
                  num_experts=8, num_local_experts=8)


def build(family: str, size: str, root: Path, tokenizer: Path) -> Path:
    overrides = None
    if size == "medium":
        overrides = MEDIUM_MOE if family in ("qwen3_moe", "mixtral") else MEDIUM
        if "layer_types" in FAMILIES[family][1]:  # the tiny's per-layer list has 4 entries
            overrides = {**overrides, "layer_types": None}
    return make_family_model(family, root / f"{family}-{size}", tokenizer, overrides=overrides)


class Ours:
    """splitserve's offline ``LLM`` over one model folder, loaded once."""

    def __init__(self, folder: Path) -> None:
        from splitserve import LLM, SamplingParams

        self.params = SamplingParams
        self.llm = LLM(str(folder))
        warm = make_requests(1, 16, 16, VOCAB, seed=1000)  # shares no block with a timed set
        self.llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4))

    def rate(self, prompts: list[list[int]], out_len: int) -> float:
        params = self.params(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        start = clock()
        outs = self.llm.generate(prompts, params)
        elapsed = clock() - start
        return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


class HF:
    """transformers' ``generate`` over the same folder: one left-padded batch per call."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.inference_mode():
            hf_generate(self.model, make_requests(1, 16, 16, VOCAB, seed=1000), 4)

    @property
    def attention(self) -> str:
        """Its attention implementation, and its experts' for a mixture-of-experts model."""
        cfg = self.model.config
        experts = getattr(cfg, "_experts_implementation", None)
        moe = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
        return str(cfg._attn_implementation) + (f", experts {experts}" if moe else "")

    def rate(self, prompts: list[list[int]], out_len: int) -> float:
        with torch.inference_mode():
            start = clock()
            tokens = hf_generate(self.model, prompts, out_len)
            return tokens / (clock() - start)


def compare(folder: Path, out_len: int, repeats: int) -> dict[str, Any]:
    """Best output tok/s of each side over ``repeats`` request sets, taken in turns."""
    ours, hf = Ours(folder), HF(folder)
    best = {"splitserve": 0.0, "hf": 0.0}
    for rep in range(repeats):
        prompts = make_requests(NUM_REQUESTS, 64, 192, VOCAB, seed=rep + 1)
        best["splitserve"] = max(best["splitserve"], ours.rate(prompts, out_len))
        best["hf"] = max(best["hf"], hf.rate(prompts, out_len))
    row = {"splitserve_tok_s": round(best["splitserve"], 1), "hf_tok_s": round(best["hf"], 1),
           "ratio": round(best["splitserve"] / best["hf"], 2), "hf_attention": hf.attention}
    del ours, hf
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(sorted(FAMILIES)))
    parser.add_argument("--medium", action="store_true", help="also the ~100M-parameter models")
    parser.add_argument("--only-medium", action="store_true", help="the medium models only")
    parser.add_argument("--out-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="request sets per side (best counts)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = ("medium",) if args.only_medium else ("tiny", "medium") if args.medium else ("tiny",)
    print(f"torch threads {torch.get_num_threads()}, {args.clock} clock, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = smollm_tokenizer_dir(Path(tmp))
        for family in args.families.split(","):
            for size in sizes:
                folder = build(family, size, Path(tmp), tokenizer)
                row = {"family": family, "size": size,
                       **compare(folder, args.out_len, args.repeats),
                       "load_avg": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(f"{family:10s} {size:6s} splitserve {row['splitserve_tok_s']:8.1f} tok/s   "
                      f"HF generate ({row['hf_attention']}) {row['hf_tok_s']:8.1f} tok/s   "
                      f"ratio {row['ratio']:5.2f}x   load {row['load_avg']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
