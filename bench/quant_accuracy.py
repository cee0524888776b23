"""Accuracy of each weight format against the fp32-dequantized reference of the same GGUF.

On 16 prompts (chat template applied) the reference engine (``quantization="none"``,
float32: the file's values dequantized by the gguf package) greedily generates
``--tokens`` tokens. Along each reference sequence every format's next-token distribution
is compared with the reference's (mean KL(ref || format) over positions, top-1 agreement),
and each format's own greedy output is compared with the reference's (first position where
they differ; ``--tokens`` when they never do). Prints one row per format:

    python bench/quant_accuracy.py [--model PATH.gguf] [--tokens 32] [--json PATH] [--only TEXT]

Rows: weight formats (``quantization``, ``dtype``) and KV cache formats (``kv_cache_dtype``
fp8 over float32 weights and activations, and with the GGUF's own codes).
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain in two sentences what a hash function is.",
    "Give me three tips for learning a new language.",
    "What causes the seasons on Earth?",
    "Write a Python function that reverses a string.",
    "Who wrote Romeo and Juliet, and when?",
    "Describe a cat to someone who has never seen one.",
    "What is the difference between weather and climate?",
    "Translate 'good morning' into Spanish and German.",
    "List the planets of the solar system in order.",
    "Why is the sky blue?",
    "Summarize the plot of Cinderella in one paragraph.",
    "What is 17 times 23? Show your steps.",
    "Suggest a name for a bakery that sells bread and coffee.",
    "How does a refrigerator keep food cold?",
]

FORMATS = {  # label -> LLM options (the weight formats each row served are printed with it)
    "gguf-native (the file's codes)": {"quantization": "auto", "dtype": "auto"},
    "int4 (Q4 codes kept, the rest RTN int4 g32)": {"quantization": "int4", "dtype": "auto"},
    "int8 (int8 codes kept, the rest RTN int8/channel)": {"quantization": "int8", "dtype": "auto"},
    "w4a8 (the file's codes with 8-bit activations)": {"quantization": "w4a8", "dtype": "auto"},
    "bf16 activations, fp32-dequantized weights": {"quantization": "none", "dtype": "bfloat16"},
    # KV cache formats (kv_cache_dtype): alone over float32, then with gguf-native weights
    "fp32, fp8_e4m3 KV": {"quantization": "none", "dtype": "float32", "kv_cache_dtype": "fp8_e4m3"},
    "fp32, fp8_e5m2 KV": {"quantization": "none", "dtype": "float32", "kv_cache_dtype": "fp8_e5m2"},
    "gguf-native, fp8_e4m3 KV": {"quantization": "auto", "dtype": "auto",
                                 "kv_cache_dtype": "fp8_e4m3"},
    "gguf-native, fp8_e5m2 KV": {"quantization": "auto", "dtype": "auto",
                                 "kv_cache_dtype": "fp8_e5m2"},
}


def sequence_logits(llm: Any, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] float32 next-token logits of one prefill over a private KV cache."""
    from splitserve.roles.models.blocks import AttentionMetadata

    runner = llm.engine.runner
    cfg, model = runner.config, runner.model
    n, bs = len(tokens), 16
    blocks = (n + bs - 1) // bs
    caches = [
        torch.zeros(2, blocks, bs, cfg.num_kv_heads, cfg.head_dim, dtype=runner.kv_caches[0].dtype)
        for _ in range(cfg.num_layers)
    ]
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), num_decode=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.int32), decode_context_lens=i32([]),
        prefill_block_tables=i32([list(range(blocks))]), prefill_query_start_loc=i32([0, n]),
        prefill_context_lens=i32([n]),
    )
    with torch.inference_mode():
        hidden = model.forward(torch.tensor(tokens), torch.arange(n), caches, meta)
        return model.compute_logits(hidden).float()


def greedy(llm: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    from splitserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def compare(
    llm: Any, prompts: list[list[int]], ref_out: list[list[int]], ref_logp: list[torch.Tensor],
    n: int,
) -> dict[str, float]:
    """Mean KL, top-1 agreement along the reference sequences; mean first divergence."""
    kls, agree, total = [], 0, 0
    for prompt, out, want in zip(prompts, ref_out, ref_logp, strict=True):
        got = torch.log_softmax(sequence_logits(llm, prompt + out)[len(prompt) - 1 : -1], -1)
        kls.append(float((want.exp() * (want - got)).sum(-1).mean()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += got.shape[0]
    own = greedy(llm, prompts, n)
    firsts = [next((i for i, (a, b) in enumerate(zip(o, r, strict=True)) if a != b), n)
              for o, r in zip(own, ref_out, strict=True)]
    return {
        "mean_kl": sum(kls) / len(kls),
        "top1_agreement": agree / total,
        "mean_first_divergence": sum(firsts) / len(firsts),
        "min_first_divergence": min(firsts),
        "identical_outputs": sum(f == n for f in firsts),
    }


def main() -> None:
    from splitserve import LLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--only", default="", help="rows whose label contains this text")
    args = ap.parse_args()

    ref = LLM(args.model, quantization="none", dtype="float32", kv_cache_memory_bytes=256 << 20)
    tok = ref.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], True) for p in PROMPTS]
    ref_out = greedy(ref, prompts, args.tokens)
    ref_logp = [torch.log_softmax(sequence_logits(ref, p + o)[len(p) - 1 : -1], -1)
                for p, o in zip(prompts, ref_out, strict=True)]
    del ref
    gc.collect()
    print(f"{len(prompts)} prompts, {args.tokens} greedy tokens each; reference: fp32-dequantized "
          "GGUF (quantization='none', dtype float32)", flush=True)
    print(f"| format | weights served | dtype | KV | mean KL | top-1 agreement | "
          f"first divergence (mean / min) | identical of {len(prompts)} |")
    print("|---|---|---|---|---|---|---|---|")
    results: dict[str, Any] = {}
    for label, options in FORMATS.items():
        if args.only not in label:
            continue
        llm = LLM(args.model, kv_cache_memory_bytes=256 << 20, **options)
        r = compare(llm, prompts, ref_out, ref_logp, args.tokens)
        r["dtype"] = llm.engine.info()["dtype"]
        r["weight_formats"] = llm.engine.info()["weight_formats"]
        r["kv_cache_dtype"] = llm.engine.info()["kv_cache_dtype"]
        results[label] = r
        served = ", ".join(f"{f} x{n}" for f, n in sorted(r["weight_formats"].items())
                           if f not in ("float32", "bfloat16"))  # (norms stay float)
        print(f"| {label} | {served or 'float'} | {r['dtype']} | {r['kv_cache_dtype']} | "
              f"{r['mean_kl']:.4f} | {r['top1_agreement']:.3f} | "
              f"{r['mean_first_divergence']:.1f} / {r['min_first_divergence']} | "
              f"{r['identical_outputs']} |", flush=True)
        del llm
        gc.collect()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
