"""Structured outputs: throughput of constrained vs unconstrained generation, same run.

16 concurrent chat requests on the embedded SmolLM2 (one engine, continuous batching), each
asking for JSON; run once free and once under a JSON schema per request (the same prompts,
``ignore_eos`` so both produce exactly ``--max-tokens`` tokens per request: after the grammar
completes only EOS is allowed, and the mask is still computed). Grammars are compiled in a
warm-up (compile time is reported apart: the cache makes it a once-per-schema cost). Prints
output tokens/s of both, their ratio (target >= 0.85) and the engine's mask time per masked
token (bitmask fill + batched apply). ``--engines`` adds a grammar-engine comparison on the 20
schemas of the serve test (xgrammar, and llguidance when it is installed).

    python bench/structured.py [--max-tokens 64] [--rounds 2] [--engines | --engines-only]
                               [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import splitserve  # noqa: E402

if str(ROOT) not in splitserve.__path__:
    splitserve.__path__.append(str(ROOT))  # splitserve.roles -> roles/, as pyproject maps it

from splitserve import LLM, SamplingParams  # noqa: E402
from tests.integration.test_structured_serve import SCHEMAS  # noqa: E402

NUM_REQUESTS = 16


def _run(llm: LLM, convs: list[Any], params: list[SamplingParams]) -> tuple[float, int, dict]:
    before = llm.engine.stats()
    llm.engine.kv.pool.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.chat(convs, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    after = llm.engine.stats()
    delta = {k: after[k] - before[k] for k in ("grammar_mask_seconds", "grammar_masked_rows")}
    return elapsed, tokens, delta


def throughput(max_tokens: int, rounds: int) -> dict[str, Any]:
    llm = LLM(kv_cache_memory_bytes=1 << 30, quantization="none")  # docs' figures: fp32 weights
    picks = [SCHEMAS[i % len(SCHEMAS)] for i in range(NUM_REQUESTS)]
    convs = [[{"role": "user", "content": f"Reply with JSON describing {what}."}]
             for what, _ in picks]
    free = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)] * len(picks)
    constrained = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                  structured_outputs={"json": schema}) for _, schema in picks]
    t0 = time.perf_counter()
    llm.chat(convs, [SamplingParams(max_tokens=1, structured_outputs={"json": s})
                     for _, s in picks])  # compiles every grammar; warms the engine
    compile_s = time.perf_counter() - t0
    best = {"free": float("inf"), "constrained": float("inf")}
    tokens = {"free": 0, "constrained": 0}
    mask_s, masked = 0.0, 0
    for _ in range(rounds):  # alternate so background load hits both alike
        for name, params in (("free", free), ("constrained", constrained)):
            elapsed, n, delta = _run(llm, convs, params)
            best[name] = min(best[name], elapsed)
            tokens[name] = n
            mask_s += delta["grammar_mask_seconds"]
            masked += delta["grammar_masked_rows"]
    free_tps = tokens["free"] / best["free"]
    cons_tps = tokens["constrained"] / best["constrained"]
    return {
        "num_requests": NUM_REQUESTS, "max_tokens": max_tokens,
        "free_tok_s": round(free_tps, 2), "constrained_tok_s": round(cons_tps, 2),
        "throughput_ratio": round(cons_tps / free_tps, 4),
        "mask_ms_per_token": round(1000 * mask_s / max(masked, 1), 4),
        "warmup_with_compile_s": round(compile_s, 2),
    }


def compare_engines() -> dict[str, Any]:
    """Compile time and per-token mask time of each grammar engine on the 20 test schemas."""
    import torch

    from splitserve.roles.models.loader import load_tokenizer

    _, config, tok = load_tokenizer(None)
    vocab = config.vocab_size
    out: dict[str, Any] = {}
    out["xgrammar"] = _measure_xgrammar(tok, vocab, torch)
    try:
        out["llguidance"] = _measure_llguidance(tok, vocab, torch)
    except ImportError:
        out["llguidance"] = "not installed (pip install llguidance in a side venv)"
    return out


def _walk(fill: Any, accept: Any, done: Any, vocab: int, torch: Any, bitmask: Any) -> list[float]:
    """Step a matcher through 48 allowed tokens (the middle allowed id each time)."""
    times = []
    for _ in range(48):
        if done():
            break
        t0 = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t0)
        bits = ((bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
        allowed = torch.nonzero(bits[:vocab]).flatten()
        accept(int(allowed[len(allowed) // 2]))
    return times


def _measure_xgrammar(tok: Any, vocab: int, torch: Any) -> dict[str, Any]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok.hf, vocab_size=vocab,
                                              stop_token_ids=sorted(tok.eos_token_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    compiles, masks, ok = [], [], 0
    for _, schema in SCHEMAS:
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        compiles.append(time.perf_counter() - t0)
        m = xgr.GrammarMatcher(compiled)
        bm = xgr.allocate_token_bitmask(1, vocab)
        masks += _walk(lambda m=m, bm=bm: m.fill_next_token_bitmask(bm, 0), m.accept_token,
                       m.is_terminated, vocab, torch, bm)
        ok += 1
    return _summary(ok, compiles, masks)


def _measure_llguidance(tok: Any, vocab: int, torch: Any) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lgt

    lltok = llguidance.hf.from_tokenizer(tok.hf, n_vocab=vocab)
    compiles, masks, ok = [], [], 0
    for _, schema in SCHEMAS:
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False})
        m = llguidance.LLMatcher(lltok, grammar)
        compiles.append(time.perf_counter() - t0)
        if m.get_error():
            continue
        bm = lgt.allocate_token_bitmask(1, vocab)
        masks += _walk(lambda m=m, bm=bm: lgt.fill_next_token_bitmask(m, bm, 0),
                       m.consume_token, m.is_stopped, vocab, torch, bm)
        ok += 1
    return _summary(ok, compiles, masks)


def _summary(ok: int, compiles: list[float], masks: list[float]) -> dict[str, Any]:
    compiles.sort()
    return {"schemas_supported": f"{ok}/{len(SCHEMAS)}",
            "compile_ms_median": round(1000 * compiles[len(compiles) // 2], 2),
            "compile_ms_max": round(1000 * compiles[-1], 2),
            "mask_us_mean": round(1e6 * sum(masks) / max(len(masks), 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", action="store_true", help="also compare grammar engines")
    ap.add_argument("--engines-only", action="store_true", help="only the engine comparison")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    result = {} if args.engines_only else throughput(args.max_tokens, args.rounds)
    if args.engines or args.engines_only:
        result["engines"] = compare_engines()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
