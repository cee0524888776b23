"""Speculative decoding: the same requests with and without it, in one run, on SmolLM2.

Two workloads, each at 1 and 16 concurrent streams, greedy:

- copy: chat requests that ask the model to repeat a given source file (this repository's
  own code) with one small edit; the answer reuses long spans of the prompt.
- chat: the plain workload of bench/engine_throughput.py (random-token prompts of 32-512
  tokens, EOS ignored).

One engine runs both sides (the speculator is switched on and off between runs, so the
weights, threads and KV pool are the same); each side is timed best of ``--reps``, the
sides interleaved, because the machine is shared. Outputs must be token for token equal
(greedy), or the run fails. Prints output tok/s, speedup and acceptance;
``--json PATH`` writes ``copy_single_speedup``, ``copy_16_speedup``,
``chat_single_speedup``, ``chat_16_speedup``, ``acceptance_rate`` (copy workload, 1
stream) and the raw figures.

    python bench/spec_decode.py [--method ngram|suffix] [-k 5] [--workloads copy,chat]
                                [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from engine_throughput import make_requests  # noqa: E402

COPY_SOURCES = sorted((ROOT / "roles" / "engine").glob("*.py")) + sorted(
    (ROOT / "kvtransfer").glob("*.py")
)


def copy_prompts(llm, n: int, lines: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Chat prompts asking to repeat a code excerpt with one rename."""
    tok = llm.get_tokenizer()
    prompts = []
    for path in COPY_SOURCES:
        text = path.read_text().splitlines()
        body = [ln for ln in text if ln.strip()][10 : 10 + lines]
        if len(body) < lines:
            continue
        code = "\n".join(body)
        msg = ("Here is a Python code excerpt:\n\n```python\n" + code + "\n```\n\n"
               "Repeat the excerpt exactly, but rename the variable `self` to `this`. "
               "Output only the code.")
        prompts.append(tok.apply_chat_template([{"role": "user", "content": msg}], True))
        if len(prompts) == n:
            break
    return prompts


def timed(llm, prompts, params) -> tuple[float, list[list[int]]]:  # type: ignore[no-untyped-def]
    llm.engine.kv.pool.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = [o.outputs[0].token_ids for o in outs]
    return sum(len(t) for t in tokens) / elapsed, tokens


def compare(llm, speculator, prompts, params, reps: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Best-of-reps tok/s without and with speculation (interleaved); outputs must match."""
    sched = llm.engine.scheduler
    best = {"off": 0.0, "on": 0.0}
    before = dict(speculator.stats.as_dict())
    for _ in range(reps):
        for side in ("off", "on"):
            sched.speculator = speculator if side == "on" else None
            rate, tokens = timed(llm, prompts, params)
            if side == "off":
                want = tokens
            elif tokens != want:
                raise SystemExit("speculative output differs from plain decoding")
            best[side] = max(best[side], rate)
    sched.speculator = None
    after = speculator.stats.as_dict()
    drafted = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    drafts = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
    return {
        "plain_tok_s": best["off"], "spec_tok_s": best["on"],
        "speedup": best["on"] / best["off"],
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_length": 1 + accepted / drafts if drafts else 0.0,
        "num_drafts": drafts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="ngram", choices=["ngram", "suffix"])
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=5)
    ap.add_argument("--copy-lines", type=int, default=40, help="lines of code per copy prompt")
    ap.add_argument("--copy-tokens", type=int, default=256, help="max output tokens, copy")
    ap.add_argument("--chat-tokens", type=int, default=128, help="output tokens, chat")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workloads", default="copy,chat",
                    help="comma-separated subset of copy,chat to run (default: both)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not set(args.workloads.split(",")) <= {"copy", "chat"}:
        ap.error(f"--workloads: expected a subset of copy,chat, got {args.workloads!r}")

    from splitserve import LLM, SamplingParams
    from splitserve.roles.engine.speculative import SpeculativeConfig, Speculator

    # fp32 weights: the format docs/serving.md's figures were measured in
    llm = LLM(kv_cache_memory_bytes=2 << 30, max_num_seqs=32, quantization="none")
    config = SpeculativeConfig(args.method, args.num_speculative_tokens)
    speculator = Speculator(config)
    vocab = llm.engine.model_config.vocab_size
    copy = copy_prompts(llm, 16, args.copy_lines)
    chat = make_requests(16, 32, 512, vocab)
    copy_params = SamplingParams(temperature=0.0, max_tokens=args.copy_tokens)
    chat_params = SamplingParams(temperature=0.0, max_tokens=args.chat_tokens, ignore_eos=True)
    llm.generate([chat[0][:16]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up

    results = {}
    chosen = set(args.workloads.split(","))
    workloads = (("copy", copy, copy_params), ("chat", chat, chat_params))
    for name, prompts, params in (w for w in workloads if w[0] in chosen):
        for streams, label in ((1, "single"), (16, "16")):
            r = compare(llm, speculator, prompts[:streams], params, args.reps)
            results[f"{name}_{label}"] = r
            print(f"{name:4s} x{streams:2d}: plain {r['plain_tok_s']:7.1f} tok/s, "
                  f"spec {r['spec_tok_s']:7.1f} tok/s, speedup {r['speedup']:.2f}x, "
                  f"acceptance {r['acceptance_rate']:.2f}, "
                  f"mean accepted length {r['mean_accepted_length']:.2f}", flush=True)
    summary = {f"{key}_speedup": r["speedup"] for key, r in results.items()}
    if "copy_single" in results:
        summary["acceptance_rate"] = results["copy_single"]["acceptance_rate"]
    summary.update({"method": args.method, "num_speculative_tokens": args.num_speculative_tokens,
                    "runs": results})
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
