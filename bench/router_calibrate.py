"""Calibrate the router simulator's cost model on measured prefill and decode timings.

Two steps, so that the measuring (GPU, torch) and the fitting (anywhere) are apart:

1. ``--measure OUT.jsonl`` (needs torch with CUDA and transformers): builds a
   Llama-3-8B-shaped model (32 layers, hidden 4096, 32 heads, 8 KV heads, MLP 14336)
   with random bf16 weights (no weights can be downloaded; timings do not depend on the
   values), times prefills of ``new`` tokens after ``cached`` tokens already in a KV
   cache, and decode steps at several batch sizes, and writes one JSON line per sample.
2. ``--fit IN.jsonl --out MODEL.json``: least-squares fit of
   ``splitserve.router.sim.cost_model`` (``CostModel``) to those samples.

The ``--measure`` timings are of Hugging Face transformers' Llama with SDPA attention, not
of the splitserve engine; a tuned engine (vLLM-class kernels, CUDA graphs) is faster, so
treat that fitted model as a conservative profile of the GPU.

``--measure-splitserve OUT.jsonl [--model M]`` times splitserve's own engine (``LLM``, on
this machine's CPU or GPU) instead: prefills of ``new`` tokens after ``cached`` tokens
already in its prefix cache (the prefix is generated first, then the longer prompt), and
decode steps of batches (``(T(33 tokens) - T(1 token)) / 32`` per batch and context). Its
device line carries the engine's KV geometry, so ``--fit`` sizes the profile's KV capacity
and transfer bytes from it. The fitted CPU profile of the embedded SmolLM2-135M is
``splitserve.router.sim.cost_model.CPU_SMOLLM2_135M``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

PREFILL_GRID = [(n, c) for c in (0, 4096, 16384) for n in (512, 1024, 2048, 4096, 8192, 16384)]
DECODE_GRID = [(1, 2048), (8, 2048), (16, 4096), (32, 2048)]  # (batch, context per sequence)
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=65536,
)
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads x 128, bf16


def measure(out: Path) -> None:
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA3_8B, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaModel(config).to(torch.bfloat16).eval()
    samples: list[dict[str, object]] = []
    sink = out.open("w")  # one line per sample as it comes, so a crash keeps what was measured

    def record(sample: dict[str, object]) -> None:
        samples.append(sample)
        sink.write(json.dumps(sample) + "\n")
        sink.flush()
        print(json.dumps(sample), flush=True)

    props = torch.cuda.get_device_properties(0)
    record(
        {
            "kind": "device",
            "name": props.name,
            "total_memory": props.total_memory,
            "torch": torch.__version__,
        }
    )

    def timed(fn) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def prefill(n: int, c: int) -> float:
        cache = DynamicCache(config=config)
        if c:
            model(
                input_ids=torch.randint(0, 32000, (1, c), device="cuda"),
                past_key_values=cache,
                use_cache=True,
            )
        ids = torch.randint(0, 32000, (1, n), device="cuda")
        pos = torch.arange(c, c + n, device="cuda")[None]
        return timed(
            lambda: model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
        )

    def decode(batch: int, context: int) -> float:
        cache = DynamicCache(config=config)
        model(
            input_ids=torch.randint(0, 32000, (batch, context), device="cuda"),
            past_key_values=cache,
            use_cache=True,
        )
        ids = torch.randint(0, 32000, (batch, 1), device="cuda")
        pos = torch.full((batch, 1), context, device="cuda")
        steps = [
            timed(
                lambda: model(
                    input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True
                )
            )
            for _ in range(3)
        ]
        return min(steps)

    with torch.inference_mode():
        prefill(2048, 0)  # warm-up: kernels, allocator
        for n, c in PREFILL_GRID:
            t = min(prefill(n, c) for _ in range(2))
            record({"kind": "prefill", "new": n, "cached": c, "seconds": t})
            torch.cuda.empty_cache()
        for batch, context in DECODE_GRID:
            t = decode(batch, context)
            record(
                {
                    "kind": "decode",
                    "batch": batch,
                    "context": context,
                    "kv_tokens": batch * context,
                    "seconds": t,
                }
            )
            torch.cuda.empty_cache()
    sink.close()


SPLITSERVE_PREFILL_GRID = [(n, c) for c in (0, 512) for n in (64, 256, 512, 1024)]
SPLITSERVE_DECODE_GRID = [(1, 128), (4, 128), (8, 512), (16, 256), (32, 256), (64, 128)]


def measure_splitserve(
    out: Path, model: str | None, threads: int | None = None, formats: dict[str, str] | None = None
) -> None:
    """Time splitserve's engine (``LLM``) on this machine; one JSON line per sample.

    ``formats``: ``quantization`` / ``dtype`` / ``kv_cache_dtype`` for ``LLM`` (left out: the
    engine's defaults, which a cluster's workers use too)."""
    import random

    import torch

    from splitserve import LLM, SamplingParams

    llm = LLM(model, enable_prefix_caching=True, num_threads=threads, **(formats or {}))
    engine = llm.engine
    info = engine.info()
    vocab = int(engine.model_config.vocab_size)
    rng = random.Random(0)
    sink = out.open("w")

    def record(sample: dict[str, object]) -> None:
        sink.write(json.dumps(sample) + "\n")
        sink.flush()
        print(json.dumps(sample), flush=True)

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    def run(prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return time.perf_counter() - t0

    record({
        "kind": "device", "engine": "splitserve", "model": str(model or "SmolLM2-135M-Instruct"),
        # model_config.kv_bytes_per_token is per byte of the cache's element
        "kv_bytes_per_token": int(engine.model_config.kv_bytes_per_token)
        * torch.empty((), dtype=engine.kv_dtype).element_size(),
        "kv_cache_memory_bytes": int(engine.config.kv_cache_memory_bytes),
        "threads": torch.get_num_threads(),
        "quantization": info["quantization"], "weight_formats": info["weight_formats"],
        "dtype": info.get("dtype"), "kv_cache_dtype": info["kv_cache_dtype"],
    })
    run([ids(64)], 2)  # warm-up
    for n, c in SPLITSERVE_PREFILL_GRID:
        best = math.inf
        for _ in range(2):
            prefix = ids(c)
            if c:
                run([prefix], 1)  # now cached
            best = min(best, run([prefix + ids(n)], 1))
        record({"kind": "prefill", "new": n, "cached": c, "seconds": best})
    for batch, context in SPLITSERVE_DECODE_GRID:
        prompts = [ids(context) for _ in range(batch)]
        run(prompts, 1)  # cache the prompts: the two runs below differ only in decode steps
        one = run(prompts, 1)
        many = run(prompts, 33)
        step = max(1e-6, (many - one) / 32)
        record({"kind": "decode", "batch": batch, "context": context,
                "kv_tokens": batch * (context + 16), "seconds": step})
    sink.close()


def fit(timings: Path, out: Path) -> None:
    from splitserve.router.sim.cost_model import fit_cost_model

    rows = [json.loads(line) for line in timings.read_text().splitlines() if line.strip()]
    device = next((r for r in rows if r["kind"] == "device"), None)
    if device is None:
        raise SystemExit(f"{timings}: no device line; was it written by --measure?")
    if device.get("engine") == "splitserve":
        fit_splitserve(rows, device, out)
        return
    weights_bytes = 8.03e9 * 2
    free = 0.9 * device["total_memory"] - weights_bytes - 4e9  # 4 GB for activations
    model = fit_cost_model(
        [(r["new"], r["cached"], r["seconds"]) for r in rows if r["kind"] == "prefill"],
        [(r["kv_tokens"], r["seconds"], r["batch"]) for r in rows if r["kind"] == "decode"],
        name=f"{device['name']}/llama-3-8b-shape/bf16/hf-transformers-sdpa (measured)",
        kv_capacity_blocks=int(free // (KV_BYTES_PER_TOKEN * 512)),
    )
    model.save(out)
    print(model.to_json())
    for r in rows:
        if r["kind"] == "prefill":
            predicted = model.prefill_time(r["new"], r["cached"])
            print(
                f"prefill new={r['new']:>6} cached={r['cached']:>6}: measured {r['seconds']:.4f} s,"
                f" model {predicted:.4f} s ({predicted / r['seconds'] - 1:+.1%})"
            )


def _splitserve_profile_name(device: dict) -> str:
    """``cpu/<model>/<quantization> (<weight formats>)/<dtype>, <kv> KV/<n> thread(s)/splitserve``;
    timings written before the device line carried the formats give the shorter old name."""
    if "quantization" not in device:
        return f"cpu/{device['model']}/splitserve (measured)"
    formats = ", ".join(
        f"{k} x{v}" for k, v in sorted(device["weight_formats"].items()) if k not in ("float32",)
    )
    threads = device["threads"]
    return (f"cpu/{device['model']}/{device['quantization']} ({formats})/{device['dtype']}, "
            f"{device['kv_cache_dtype']} KV/{threads} thread{'s' if threads != 1 else ''}"
            "/splitserve (measured)")


def fit_splitserve(rows: list[dict], device: dict, out: Path) -> None:
    """Fit a profile of splitserve's engine; KV capacity from its configured cache bytes."""
    from splitserve.router.sim.cost_model import fit_cost_model

    per_token = float(device["kv_bytes_per_token"])
    model = fit_cost_model(
        [(r["new"], r["cached"], r["seconds"]) for r in rows if r["kind"] == "prefill"],
        [(r["kv_tokens"], r["seconds"], r["batch"]) for r in rows if r["kind"] == "decode"],
        name=_splitserve_profile_name(device),
        kv_capacity_blocks=max(1, int(device["kv_cache_memory_bytes"] // (per_token * 512))),
        kv_bytes_per_token=per_token,
        link_bandwidth_bytes_per_s=1e9,  # UCX over TCP loopback, about 1 GB/s here
    )
    model.save(out)
    print(model.to_json())
    for r in rows:
        if r["kind"] == "prefill":
            predicted = model.prefill_time(r["new"], r["cached"])
            print(f"prefill new={r['new']:>5} cached={r['cached']:>5}: measured "
                  f"{r['seconds']:.4f} s, model {predicted:.4f} s "
                  f"({predicted / r['seconds'] - 1:+.1%})")
        elif r["kind"] == "decode":
            predicted = model.decode_step_time(r["kv_tokens"], r["batch"])
            print(f"decode batch={r['batch']:>3} context={r['context']:>5}: measured "
                  f"{r['seconds']:.4f} s/step, model {predicted:.4f} s "
                  f"({predicted / r['seconds'] - 1:+.1%})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--measure", type=Path, help="write timings (JSONL) here; needs a CUDA GPU")
    group.add_argument(
        "--measure-splitserve", type=Path, help="time splitserve's own engine; timings here"
    )
    group.add_argument("--fit", type=Path, help="fit a cost model to these timings")
    parser.add_argument("--out", type=Path, help="cost model JSON to write (with --fit)")
    parser.add_argument("--model", default=None, help="model for --measure-splitserve")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (splitserve)")
    for flag in ("quantization", "dtype", "kv-cache-dtype"):
        parser.add_argument(f"--{flag}", default=None,
                            help=f"splitserve's {flag} (default: the engine's, as a worker's)")
    args = parser.parse_args(argv)
    if args.measure_splitserve:
        formats = {k: v for k in ("quantization", "dtype", "kv_cache_dtype")
                   if (v := getattr(args, k)) is not None}
        measure_splitserve(args.measure_splitserve, args.model, args.threads, formats)
    elif args.measure:
        measure(args.measure)
    else:
        if args.out is None:
            parser.error("--fit needs --out")
        fit(args.fit, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
