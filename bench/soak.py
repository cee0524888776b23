"""Soak / chaos harness: a local cluster under a mixed HTTP workload while workers are SIGKILLed.

Owns the whole experiment and its verdict; it changes nothing in the system under test.

1. Start a local cluster (default 1 prefill + 2 decode; ``--multimodal``: plus 1 encode worker
   and a tiny LLaVA model, and some requests carry images) behind the real HTTP frontend, in
   float32 unless ``--dtype`` / ``--quantization`` / ``--kv-cache-dtype`` say otherwise (the
   reference engine of step 4 takes the same; both servers' ``/version`` must agree).
2. Quiet phase (no faults) to measure p99 latency, then the faulty phase: a steady mixed
   workload (streaming and not, greedy and seeded, short and long prompts, n > 1, a quarter
   with penalties, a logit bias, an allow-list or bad words, a tenth with stop strings, stop
   ids or min_tokens and a tenth with a JSON schema, regex or choice grammar
   (``structured_outputs``); 15% of the token-prompt completions through the gRPC API
   instead (its ``AsyncClient``, streamed; replayed through the reference's gRPC API); a
   fifth of the completions with
   prompt logprobs or echo, some of those with max_tokens 0; some chat turns through the
   Responses API, whole or streamed as its events; 8% of the token prompts as
   ``/v1/embeddings``, one or two inputs, float or base64) in which
   10% of requests are aborted by the client at a random point and 5% are malformed, while a
   random worker is SIGKILLed every ``--kill-every`` seconds. A 503 (documented while no worker
   of a role is alive) is retried by the client, as a real client would.
3. Stop the kills; wait for the worker set to be restored; run ``check_integrity()`` on every
   live worker (leaked blocks, stranded leases).
4. Replay every completed request on a fault-free single engine (same HTTP frontend) and
   compare text and finish reasons choice by choice, the prompt logprobs (received once
   per stream) and embeddings (bit for bit).

Prints a JSON summary (``requests, completed, aborted, kills, replacements, mismatches,
leaked_blocks, stranded_leases, p99_latency_s_faulty, p99_latency_s_quiet`` and more) and exits
1 on any mismatch, leak, stranded lease, lost request, unexpected status or unrestored worker.

    .venv/bin/python bench/soak.py --duration 600 --kill-every 6      # also: make soak
    .venv/bin/python bench/soak.py --duration 120 --dtype auto --quantization w4a8 \
        --kv-cache-dtype fp8                                          # formats past fp32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import faulthandler
import io
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.utils makes the tiny models
    sys.path.insert(0, str(ROOT))

MAX_MODEL_LEN = 512
MALFORMED_STATUSES = {400, 404, 413}
GRPC = "grpc:Generate"
"""``Spec.path`` of a request sent through the gRPC API (``AsyncClient.stream``)."""
_GRPC_SAMPLING = ("n", "max_tokens", "min_tokens", "temperature", "top_p", "seed", "stop",
                  "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "logit_bias", "allowed_token_ids", "bad_words",
                  "structured_outputs")
"""The completion body's keys a gRPC request carries (the others are HTTP-only)."""
RETRY_503_S = 0.2
REQUEST_TIMEOUT_S = 120.0
"""A request with no answer after this long is recorded as lost (a hang), not waited for."""


def log(message: str) -> None:
    """Progress on stderr (stdout is the JSON summary)."""
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SoakConfig:
    """One soak run."""

    duration_s: float = 600.0
    """Length of the faulty phase."""
    kill_every_s: float = 6.0
    """A random worker is SIGKILLed this often during the faulty phase."""
    quiet_s: float | None = None
    """Length of the fault-free phase before it (None: a fifth of the duration, 10-60 s)."""
    prefill: int = 1
    """Prefill workers; 0: colocated, each decode worker prefills its own prompts (what
    ``splitserve serve`` starts on a machine with fewer devices than roles)."""
    decode: int = 2
    runtime: str = "ray"
    """``ClusterConfig.runtime``: Ray actors, or child processes of this one (``processes``)."""
    multimodal: bool = False
    """Add 1 encode worker, serve a tiny LLaVA model and send some images."""
    concurrency: int = 6
    """Requests in flight at once."""
    reference_concurrency: int = 64
    """Requests in flight at once in the reference run on the fault-free single engine. Its
    outputs do not depend on what a request is batched with (batch invariance, which the
    comparison relies on anyway: the cluster batched them differently), so it runs wider
    than the soak itself; at the soak's own 4-6 it took longer than the faulty phase."""
    abort_fraction: float = 0.10
    malformed_fraction: float = 0.05
    seed: int = 0
    model: str | None = None
    """Model folder (None: a tiny random model made for the run)."""
    dtype: str = "float32"
    """Activations and float weights of every worker and of the reference engine
    (``ClusterConfig.dtype``; ``auto``: bfloat16 where the processor has it natively)."""
    quantization: str = "auto"
    """Weight format (``ClusterConfig.quantization``: ``auto``, serve's default, keeps a GGUF's
    codes and a folder's floats; ``none``, ``int4``, ``int8``, ``w4a8``)."""
    kv_cache_dtype: str = "auto"
    """KV cache elements (``ClusterConfig.kv_cache_dtype``: ``fp8`` moves fp8 blocks between
    the workers)."""
    speculative_config: dict[str, Any] | None = None
    """The decode workers' ``speculative_config`` (``{"method": "ngram", ...}``). The
    reference engine does not speculate: speculation is exact, so every output must still
    equal decoding one token at a time."""
    max_503_wait_s: float = 300.0
    """A request still refused with 503 after this long counts as lost. Replacing a killed
    worker (a new Ray actor loading the model) takes seconds on a quiet machine but can take
    over a minute on a loaded one, and the only prefill worker's death means 503s until then;
    a real client retries for its own deadline, as this one does."""

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.kill_every_s <= 0:
            raise ValueError("duration and kill_every must be > 0")
        if not 0 <= self.abort_fraction + self.malformed_fraction < 1:
            raise ValueError("abort + malformed fractions must be in [0, 1)")
        if self.prefill < 0 or self.decode < 1 or self.concurrency < 1:
            raise ValueError("need >= 0 prefill, >= 1 decode worker and concurrency >= 1")
        if self.reference_concurrency < 1:
            raise ValueError("reference concurrency must be >= 1")

    @property
    def formats(self) -> dict[str, str]:
        """The numeric formats, the same for the cluster and for the reference engine (its
        outputs are the cluster's only when both compute alike)."""
        return {"dtype": self.dtype, "quantization": self.quantization,
                "kv_cache_dtype": self.kv_cache_dtype}

    @property
    def quiet_phase_s(self) -> float:
        return self.quiet_s if self.quiet_s is not None else min(max(self.duration_s / 5, 10), 60)


# ====================================================================== workload


@dataclass
class Spec:
    """One request of the workload and what the client will do with it."""

    index: int
    kind: str
    """``ok``, ``abort`` or ``malformed``."""
    path: str
    body: Any
    """A JSON-able body, or raw bytes (a malformed one)."""
    abort_after_chunks: int = 0
    """For ``abort``: stream events read before the client hangs up (non-streaming: -1,
    cancel after ``abort_after_s``)."""
    abort_after_s: float = 0.0


@dataclass
class Outcome:
    """What one request got."""

    spec: Spec
    phase: str
    status: int = 0
    choices: dict[int, dict[str, Any]] = field(default_factory=dict)
    """index -> {"text", "finish_reason"} of a completed request."""
    latency_s: float = 0.0
    retries_503: int = 0
    error: str = ""


def _png(rng: random.Random) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (32, 32, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _sampling(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": rng.randint(4, 24), "ignore_eos": rng.random() < 0.7}
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    else:
        body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
    body["n"] = rng.choice([1, 1, 1, 2, 3])
    body["stream"] = rng.random() < 0.5
    if rng.random() < 0.25:  # logits adjusted from the tokens so far: replays must agree
        body.update(rng.choice([
            {"frequency_penalty": 1.5, "presence_penalty": 0.5},
            {"repetition_penalty": 1.3},
            {"logit_bias": {str(rng.randrange(3, 200)): 8.0}, "frequency_penalty": 1.0},
            {"allowed_token_ids": [rng.randrange(3, 500) for _ in range(8)]},
            {"bad_words": [rng.choice(["the", "and", ".", ",", "a", "of"])]},
        ]))
    if rng.random() < 0.1:  # text and token ends: a replay must stop at the same token
        body.update(rng.choice([{"stop": [rng.choice(["e", "a", " ", "."])]},
                                {"min_tokens": min(body["max_tokens"], 3), "ignore_eos": False},
                                {"stop_token_ids": [rng.randrange(3, 500)]}]))
    if rng.random() < 0.1:  # an output grammar: the matcher's state follows every replay
        body["structured_outputs"] = rng.choice(STRUCTURED)
    return body


STRUCTURED: list[dict[str, Any]] = [
    {"json": {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}},
    {"regex": "[a-z]{2,8}( [a-z]{2,8}){0,6}"},
    {"choice": ["red", "green", "blue", "a much longer answer"]},
]
"""``structured_outputs`` constraints some requests carry (vLLM's names)."""


def _ok_body(rng: random.Random, vocab: int, multimodal: bool) -> tuple[str, dict[str, Any]]:
    body = {"model": "soak", **_sampling(rng)}
    if multimodal and rng.random() < 0.3:
        content = [{"type": "text", "text": "Describe"},
                   {"type": "image_url", "image_url": {"url": _png(rng)}}]
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": content}]}
    long = rng.random() < 0.3
    length = rng.randint(100, 300) if long else rng.randint(4, 40)
    shared = [7] * 32 if rng.random() < 0.3 else []  # some prefix reuse for the router
    prompt = shared + [rng.randrange(3, vocab) for _ in range(length)]
    if rng.random() < 0.3:
        question = f"question {rng.randrange(10**6)}"
        if rng.random() < 0.3:  # the Responses API: one answer, the sampling as extras
            body = {k: v for k, v in body.items() if k not in ("n", "max_tokens")}
            return "/v1/responses", {**body, "input": question, "store": rng.random() < 0.5,
                                     "max_output_tokens": rng.randint(4, 24)}
        messages = [{"role": "user", "content": question}]
        return "/v1/chat/completions", {**body, "messages": messages}
    if rng.random() < 0.15:  # the gRPC API: the same engine behind another frontend
        grpc_body = {k: v for k, v in body.items() if k in _GRPC_SAMPLING}
        if "logit_bias" in grpc_body:  # a map of int32 there
            grpc_body["logit_bias"] = {int(k): v for k, v in grpc_body["logit_bias"].items()}
        return GRPC, {**grpc_body, "token_ids": prompt, "stream": body["stream"]}
    if rng.random() < 0.08:  # embeddings: end at the prompt, wherever it was computed
        inputs: Any = prompt if rng.random() < 0.5 else [prompt, prompt[: max(1, length // 2)]]
        return "/v1/embeddings", {"model": "soak", "input": inputs,
                                  "encoding_format": rng.choice(["float", "base64"])}
    draw = rng.random()
    if draw < 0.1:  # scored prompts: the prefill worker's logprobs reach the client once
        body["prompt_logprobs"] = 1
    elif draw < 0.15:
        body.update(echo=True, logprobs=1)
    elif draw < 0.2:  # an evaluation harness's loglikelihood request: the prompt alone
        body.update(echo=True, logprobs=1, max_tokens=0)
        body.pop("min_tokens", None)  # (more than max_tokens: a 400, rightly)
    return "/v1/completions", {**body, "prompt": prompt}


def _prompt_lp(slot: dict[str, Any], choice: dict[str, Any]) -> None:
    """Record a choice's prompt logprobs (the prompt tokens' own, 4 decimals) and count the
    copies (a stream must carry them once)."""
    pl = choice.get("prompt_logprobs")
    if pl is None:
        return
    slot["prompt_lp_copies"] = slot.get("prompt_lp_copies", 0) + 1
    slot["prompt_lp"] = [None if step is None else round(next(iter(step.values()))["logprob"], 4)
                         for step in pl]


_MALFORMED: list[tuple[str, Any]] = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", {"model": "soak", "prompt": {"a": 1}}),
    ("/v1/completions", {"model": "soak", "prompt": [1, 2], "max_tokens": -3}),
    ("/v1/completions", {"model": "soak", "prompt": [1, 2], "n": 0}),
    ("/v1/completions", {"model": "soak", "prompt": [1, 2], "temperature": 9}),
    ("/v1/completions", {"model": "no-such-model", "prompt": [1, 2]}),
    ("/v1/completions", {"model": "soak", "prompt": [10**9, 2]}),
    ("/v1/completions", {"model": "soak", "prompt": [5] * (MAX_MODEL_LEN + 8)}),
    ("/v1/chat/completions", {"model": "soak", "messages": []}),
    ("/v1/chat/completions", {"model": "soak", "messages": [{"role": "wizard", "content": "x"}]}),
    ("/v1/responses", {"model": "soak", "input": []}),
    ("/v1/responses", {"model": "soak", "input": "x", "tools": [{"type": "web_search"}]}),
    ("/v1/responses", {"model": "soak", "input": "x", "previous_response_id": "resp-none"}),
    ("/v1/embeddings", {"model": "soak", "input": []}),
    ("/v1/embeddings", {"model": "soak", "input": [10**9, 2]}),
    ("/v1/embeddings", {"model": "soak", "input": "x", "dimensions": 10**6}),
    (GRPC, {"token_ids": [10**9, 2], "max_tokens": 4}),  # INVALID_ARGUMENT, counted as 400
    (GRPC, {"token_ids": [1, 2], "max_tokens": 4, "top_p": 1.5}),
    (GRPC, {"token_ids": [], "max_tokens": 4}),
]


def make_spec(index: int, rng: random.Random, cfg: SoakConfig, vocab: int) -> Spec:
    """The ``index``-th request of the workload (deterministic for a seed)."""
    draw = rng.random()
    if draw < cfg.malformed_fraction:
        path, body = _MALFORMED[rng.randrange(len(_MALFORMED))]
        return Spec(index, "malformed", path, body)
    path, body = _ok_body(rng, vocab, cfg.multimodal)
    if draw < cfg.malformed_fraction + cfg.abort_fraction:
        chunks = rng.randint(0, 4) if body.get("stream") else -1
        return Spec(index, "abort", path, body, chunks, rng.uniform(0.0, 0.5))
    return Spec(index, "ok", path, body)


# ====================================================================== client


async def _read_stream(response: Any, outcome: Outcome, stop_after: int | None) -> bool:
    """Fold SSE chunks into choices; False if the client hung up (``stop_after`` events)."""
    seen = 0
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if stop_after is not None and seen >= stop_after:
            return False
        seen += 1
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return True
        chunk = json.loads(data)
        if "error" in chunk:
            outcome.error = f"stream error: {chunk['error'].get('message')}"
            continue
        if "type" in chunk:  # a Responses event (its stream ends without [DONE])
            _response_event(chunk, outcome)
            continue
        for c in chunk.get("choices", []):
            slot = outcome.choices.setdefault(c["index"], {"text": "", "finish_reason": None})
            slot["text"] += c.get("delta", {}).get("content") or c.get("text") or ""
            slot["finish_reason"] = c.get("finish_reason") or slot["finish_reason"]
            if c.get("prompt_logprobs") is not None:  # counted on choice 0, whichever has them
                _prompt_lp(outcome.choices.setdefault(0, {"text": "", "finish_reason": None}), c)
    return True


def _response_event(event: dict[str, Any], outcome: Outcome) -> None:
    slot = outcome.choices.setdefault(0, {"text": "", "finish_reason": None})
    kind = event["type"]
    if kind == "response.output_text.delta":
        slot["text"] += event["delta"]
    elif kind in ("response.completed", "response.incomplete"):
        slot["finish_reason"] = "stop" if kind == "response.completed" else "length"
    elif kind == "error":
        outcome.error = f"stream error: {event.get('message')}"


def _response_text(payload: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """A whole Responses answer as one choice (its message text; incomplete: length)."""
    text = "".join(part["text"] for item in payload["output"] if item["type"] == "message"
                   for part in item["content"])
    return {0: {"text": text,
                "finish_reason": "length" if payload["status"] == "incomplete" else "stop"}}


def _whole(payload: dict[str, Any]) -> dict[int, dict[str, Any]]:
    if payload.get("object") == "response":
        return _response_text(payload)
    if payload.get("object") == "list":  # embeddings: compared bit for bit, as tokens are
        return {d["index"]: {"embedding": _floats(d["embedding"])} for d in payload["data"]}
    out = {}
    for c in payload.get("choices", []):
        text = c["message"]["content"] if "message" in c else c["text"]
        out[c["index"]] = {"text": text, "finish_reason": c["finish_reason"]}
        if c["index"] == 0:  # every choice carries them whole; a stream, on one chunk
            _prompt_lp(out[0], c)
    return out


def _floats(embedding: list[float] | str) -> list[float]:
    """An embedding as numbers (``encoding_format`` base64: float32 little-endian bytes)."""
    if isinstance(embedding, list):
        return embedding
    raw = base64.b64decode(embedding)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


GRPC_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503,
               "RESOURCE_EXHAUSTED": 503, "CANCELLED": 499, "DEADLINE_EXCEEDED": 504}
"""gRPC codes as the HTTP statuses the verdicts count (UNAVAILABLE is retried as a 503 is)."""


def _grpc_choices(result: Any) -> dict[int, dict[str, Any]]:
    return {c.index: {"text": c.text, "finish_reason": c.finish_reason}
            for c in result.completions}


async def _send_grpc(client: Any, spec: Spec, outcome: Outcome) -> None:
    """``spec`` through the gRPC ``AsyncClient``; an abort closes the stream after
    ``abort_after_chunks`` messages (which cancels the call) or gives up at its deadline."""
    from splitserve.cluster.frontends.client import ClientError

    kwargs = {k: v for k, v in spec.body.items() if k != "stream"}
    try:
        if spec.kind == "abort" and spec.abort_after_chunks >= 0:
            stream = client.stream(**kwargs)
            try:
                seen = 0
                async for _ in stream:
                    if seen >= spec.abort_after_chunks:
                        outcome.status = 499
                        return
                    seen += 1
            finally:
                await stream.aclose()
            outcome.status = 200  # it ended before the client hung up
            return
        if spec.kind == "abort":  # give up after a while, as a non-streaming HTTP client does
            try:
                await asyncio.wait_for(client.generate(**kwargs), spec.abort_after_s)
            except TimeoutError:
                outcome.status = 499
                return
            outcome.status = 200
            return
        result = await client.generate(**kwargs)  # streamed, folded by the client
    except ClientError as e:
        outcome.status = GRPC_STATUS.get(e.code.name, 500)
        outcome.error = f"{e.code.name}: {e.message}"
        return
    outcome.status = 200
    outcome.choices = _grpc_choices(result)


@dataclass
class Clients:
    """The workload's two clients of one server: HTTP (httpx) and gRPC (``AsyncClient``)."""

    http: Any
    grpc: Any


async def _send_once(clients: Clients, spec: Spec, outcome: Outcome) -> None:
    if spec.path == GRPC:
        await _send_grpc(clients.grpc, spec, outcome)
        return
    http = clients.http
    body = spec.body
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    if isinstance(body, bytes):
        kwargs["headers"] = {"content-type": "application/json"}
    if isinstance(body, dict) and body.get("stream"):
        stop_after = spec.abort_after_chunks if spec.kind == "abort" else None
        async with http.stream("POST", spec.path, **kwargs) as r:
            outcome.status = r.status_code
            if r.status_code == 200:
                await _read_stream(r, outcome, stop_after)
            else:
                outcome.error = _error_message(await r.aread())
        return
    if spec.kind == "abort":
        try:
            r = await asyncio.wait_for(http.post(spec.path, **kwargs), spec.abort_after_s)
        except TimeoutError:
            outcome.status = 499  # the client gave up: the server must abort it
            return
    else:
        r = await http.post(spec.path, **kwargs)
    outcome.status = r.status_code
    if r.status_code == 200:
        outcome.choices = _whole(r.json())
    else:
        outcome.error = _error_message(r.content)


def _error_message(body: bytes) -> str:
    """The OpenAI error body's message (and param), else the raw body."""
    try:
        error = json.loads(body)["error"]
        return f"{error.get('message')} (param {error.get('param')})"
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace")


async def run_request(clients: Clients, spec: Spec, phase: str, cfg: SoakConfig) -> Outcome:
    """Send ``spec`` (retrying documented 503s); the outcome."""
    outcome = Outcome(spec, phase)
    start = time.monotonic()
    give_up = start + cfg.max_503_wait_s
    attempt = 0
    while True:
        outcome.choices, outcome.error = {}, ""
        try:
            await asyncio.wait_for(_send_once(clients, spec, outcome), REQUEST_TIMEOUT_S)
        except TimeoutError:
            outcome.status, outcome.error = -1, f"no answer within {REQUEST_TIMEOUT_S:g} s"
            log(f"request {spec.index} hung: {spec.path} {str(spec.body)[:200]}")
        except Exception as e:  # noqa: BLE001 - a transport failure is recorded, not raised
            outcome.status, outcome.error = -1, f"{type(e).__name__}: {e}"
        if outcome.status != 503 or spec.kind == "malformed" or time.monotonic() > give_up:
            break
        attempt += 1
        outcome.retries_503 = attempt
        await asyncio.sleep(RETRY_503_S)
    outcome.latency_s = time.monotonic() - start
    if spec.kind == "ok" and (outcome.status != 200 or outcome.error):
        log(f"request {spec.index} lost after {outcome.latency_s:.1f} s, "
            f"{outcome.retries_503} retried 503s: status {outcome.status} {_ends(outcome.error)}")
    return outcome


async def drive(base_url: str, grpc_target: str, cfg: SoakConfig, vocab: int, until: float,
                phase: str, rng: random.Random, start_index: int) -> list[Outcome]:
    """Keep ``cfg.concurrency`` requests in flight until ``until`` (monotonic); all outcomes."""
    import httpx

    from splitserve.cluster.frontends.client import AsyncClient

    outcomes: list[Outcome] = []
    counter = iter(range(start_index, 10**9))
    timeout = httpx.Timeout(300.0, connect=30.0)
    limits = httpx.Limits(max_connections=cfg.concurrency * 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as http, \
            AsyncClient(grpc_target, timeout=300.0) as grpc_client:
        clients = Clients(http, grpc_client)

        async def lane() -> None:
            while time.monotonic() < until:
                spec = make_spec(next(counter), rng, cfg, vocab)
                outcomes.append(await run_request(clients, spec, phase, cfg))

        await asyncio.gather(*(lane() for _ in range(cfg.concurrency)))
    return outcomes


# ====================================================================== chaos


class Killer:
    """SIGKILLs a random live worker every ``every_s`` seconds (on its own thread)."""

    def __init__(self, cluster: Any, every_s: float, rng: random.Random) -> None:
        self.cluster, self.every_s, self.rng = cluster, every_s, rng
        self.kills: list[dict[str, Any]] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stop.wait(), self.every_s)
                return
            except TimeoutError:
                self.kill_one()

    def stop(self) -> None:
        self._stop.set()

    def kill_one(self) -> None:
        live = [h for h in list(self.cluster.workers.values())
                if h.healthy and not h.draining and h.info.get("pid")]
        if not live:
            return
        victim = self.rng.choice(live)
        try:
            os.kill(int(victim.info["pid"]), signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills.append({"t": time.time(), "worker": victim.worker_id, "role": victim.role})
        log(f"SIGKILL {victim.worker_id} (pid {victim.info['pid']})")


def wait_restored(cluster: Any, wanted: dict[str, int], timeout_s: float,
                  killed: Sequence[str] = ()) -> bool:
    """Until every role has its configured number of healthy workers, none is starting, and
    every killed worker has been noticed as dead (a kill just before the faulty phase ended
    must not pass for a live worker)."""
    deadline = time.monotonic() + timeout_s
    killed = set(killed)
    while time.monotonic() < deadline:
        roles: dict[str, int] = {}
        unnoticed = False
        for h in list(cluster.workers.values()):
            if h.healthy and not h.draining:
                roles[h.role] = roles.get(h.role, 0) + 1
                unnoticed = unnoticed or h.worker_id in killed
        if roles == wanted and not cluster.membership.replacing and not unnoticed:
            return True
        time.sleep(0.2)
    return False


def integrity(cluster: Any, timeout_s: float = 120.0) -> dict[str, Any]:
    """``check_integrity()`` of every live worker, once each is idle; totals."""
    from splitserve.cluster.membership import WORKER_LOST

    get = cluster.launcher.get  # Ray's or a process worker's, as the cluster runs them
    totals: dict[str, Any] = {"leaked_blocks": 0, "stranded_leases": 0, "problems": []}
    live = [h for h in list(cluster.workers.values()) if h.healthy and h.role != "encode"]
    totals["checked_workers"] = [h.worker_id for h in live]
    for h in live:
        try:
            _wait_idle(h.actor, get, timeout_s)  # in-flight aborts settle first
            report = get(h.actor.check_integrity.remote(), timeout_s)
        except WORKER_LOST as e:
            totals["problems"].append(f"{h.worker_id}: died during the check: {e}")
            continue
        totals["leaked_blocks"] += report["leaked_blocks"]
        totals["stranded_leases"] += report["stranded_leases"]
        totals["problems"] += [f"{h.worker_id}: {p}" for p in report["problems"]]
    return totals


def _wait_idle(actor: Any, get: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = get(actor.stats.remote(), 30)
        if stats.get("num_running", 0) == 0 and stats.get("num_waiting", 0) == 0:
            return
        time.sleep(0.1)


# ====================================================================== reference


async def reference_choices(base_url: str, grpc_target: str, specs: Sequence[Spec],
                            concurrency: int) -> dict[int, dict[int, dict[str, Any]]]:
    """Each spec's choices from the fault-free server (whole, not streamed)."""
    import httpx

    from splitserve.cluster.frontends.client import AsyncClient

    results: dict[int, dict[int, dict[str, Any]]] = {}
    queue = list(specs)
    async with httpx.AsyncClient(base_url=base_url, timeout=300.0) as http, \
            AsyncClient(grpc_target, timeout=300.0) as grpc_client:

        async def lane() -> None:
            while queue:
                spec = queue.pop()
                if spec.path == GRPC:
                    kwargs = {k: v for k, v in spec.body.items() if k != "stream"}
                    results[spec.index] = _grpc_choices(await grpc_client.generate(**kwargs))
                    continue
                body = {**spec.body, "stream": False}
                r = await http.post(spec.path, json=body)
                r.raise_for_status()
                results[spec.index] = _whole(r.json())

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return results


def compare(outcomes: Sequence[Outcome],
            reference: dict[int, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Requests whose choices differ from the reference (first few details kept)."""
    mismatches = []
    for o in outcomes:
        want = reference.get(o.spec.index)
        if want is not None and o.choices != want:
            mismatches.append({"index": o.spec.index, "phase": o.phase, "path": o.spec.path,
                               "body": o.spec.body, "got": o.choices, "want": want,
                               "retries_503": o.retries_503})
    return mismatches


# ====================================================================== the run


def _models(cfg: SoakConfig, tmp: Path) -> str:
    if cfg.model is not None:
        return cfg.model
    from tests.utils import make_tiny_llama, make_tiny_llava, smollm_tokenizer_dir

    tok = smollm_tokenizer_dir(tmp / "tok")
    if cfg.multimodal:
        return str(make_tiny_llava(tmp / "tiny-llava", tok))
    return str(make_tiny_llama(tmp / "tiny-llama", tok))


FORMAT_KEYS = ("dtype", "quantization", "kv_cache_dtype", "weight_formats")
"""What ``/version`` says of the numeric formats served: the cluster's and the reference
engine's must agree (else a mismatch could be a format difference, not a fault)."""


def served_formats(base_url: str) -> dict[str, Any]:
    """``FORMAT_KEYS`` of a server's ``/version`` (over HTTP, as a client reads them)."""
    import httpx

    version = httpx.get(f"{base_url}/version", timeout=30.0).raise_for_status().json()
    return {k: version.get(k) for k in FORMAT_KEYS}


def _speculation(cfg: SoakConfig) -> dict[str, Any]:
    """Cluster overrides that make the decode workers speculate (none without a config)."""
    if cfg.speculative_config is None:
        return {}
    return {"roles": {"decode": {"speculative_config": cfg.speculative_config}}}


def spec_counters(cluster: Any) -> dict[str, int]:
    """Speculative-decoding counters summed over the live decode workers (drafts proposed and
    accepted): the mechanism ran, not only its outputs matched."""
    get = cluster.launcher.get
    totals: dict[str, int] = {}
    for h in list(cluster.workers.values()):
        if not (h.healthy and h.role == "decode"):
            continue
        stats = get(h.actor.stats.remote(), 60.0)
        for key, value in stats.items():
            if key.startswith("spec_decode_") and isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    return totals


def _p99(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4)


def _serve(backend: Any) -> Any:
    from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions

    opts = ServeOptions(port=0, grpc_port=0, served_model_name="soak", max_in_flight=None)
    return BackgroundServer(backend, opts)


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Run the whole experiment; the summary (``ok`` says whether it passed)."""
    from splitserve.cluster.cluster import Cluster
    from splitserve.cluster.frontends.backend import ClusterBackend, EngineBackend

    rng = random.Random(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        model = _models(cfg, Path(tmp))
        encode = 1 if cfg.multimodal else 0
        cluster = Cluster.local(prefill=cfg.prefill, decode=cfg.decode, encode=encode,
                                model=model, max_model_len=MAX_MODEL_LEN,
                                kv_cache_memory_bytes=64 << 20, runtime=cfg.runtime,
                                **cfg.formats, **_speculation(cfg))
        counts = {"prefill": cfg.prefill, "decode": cfg.decode, "encode": encode}
        wanted = {role: n for role, n in counts.items() if n}
        killer = Killer(cluster, cfg.kill_every_s, rng)
        with _serve(ClusterBackend(cluster)) as server:
            formats = served_formats(server.http_url)
            log(f"cluster formats {formats}")
            vocab = int(cluster.tokenizer.vocab_size)
            quiet_spec: dict[str, int] = {}

            def after_quiet() -> None:
                if cfg.speculative_config is not None:
                    quiet_spec.update(spec_counters(cluster))
                    log(f"speculation in the quiet phase: {quiet_spec}")

            outcomes = _phases(server.http_url, server.grpc_target, cfg, vocab, rng, killer,
                               after_quiet)
            log(f"{len(outcomes)} requests sent; waiting for the worker set {wanted}")
            restored = wait_restored(cluster, wanted, timeout_s=240,
                                     killed=[k["worker"] for k in killer.kills])
            log(f"restored={restored}; integrity checks")
            checks = integrity(cluster)
            replacements = int(cluster.status()["counters"].get("workers_replaced", 0))
        cluster.shutdown()
        completed = [o for o in outcomes if o.spec.kind == "ok" and o.status == 200
                     and not o.error]
        log(f"reference run of {len(completed)} requests on a fault-free single engine, "
            f"{cfg.reference_concurrency} at a time")
        reference_backend = EngineBackend.from_config(model=model, max_model_len=MAX_MODEL_LEN,
                                                      kv_cache_memory_bytes=256 << 20,
                                                      **cfg.formats)
        with _serve(reference_backend) as ref_server:
            reference_formats = served_formats(ref_server.http_url)
            reference = asyncio.run(reference_choices(
                ref_server.http_url, ref_server.grpc_target, [o.spec for o in completed],
                cfg.reference_concurrency))
        log("reference run done")
    summary = summarize(cfg, outcomes, killer, replacements, restored, checks,
                        compare(completed, reference))
    summary["formats"] = formats
    summary["reference_formats"] = reference_formats
    if cfg.speculative_config is not None:
        summary["speculation_quiet_phase"] = quiet_spec
        if not quiet_spec.get("spec_decode_num_accepted_tokens"):
            summary["ok"] = False  # nothing was speculated: the run checked nothing of it
    if formats != reference_formats:
        summary["ok"] = False
    return summary


def _phases(url: str, grpc_target: str, cfg: SoakConfig, vocab: int, rng: random.Random,
            killer: Killer, after_quiet: Any = None) -> list[Outcome]:
    async def both() -> list[Outcome]:
        log(f"quiet phase {cfg.quiet_phase_s:g} s")
        quiet = await drive(url, grpc_target, cfg, vocab, time.monotonic() + cfg.quiet_phase_s,
                            "quiet", rng, 0)
        if after_quiet is not None:  # before any kill: the workers that served it are alive
            await asyncio.to_thread(after_quiet)
        log(f"faulty phase {cfg.duration_s:g} s, a SIGKILL every {cfg.kill_every_s:g} s")
        chaos = asyncio.create_task(killer.run())
        try:
            faulty = await drive(url, grpc_target, cfg, vocab,
                                 time.monotonic() + cfg.duration_s, "faulty", rng, len(quiet))
        finally:
            killer.stop()
            await chaos
        return quiet + faulty

    return asyncio.run(both())


def summarize(cfg: SoakConfig, outcomes: Sequence[Outcome], killer: Killer, replacements: int,
              restored: bool, checks: dict[str, Any],
              mismatches: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [o for o in outcomes if o.spec.kind == "ok"]
    completed = [o for o in ok if o.status == 200 and not o.error]
    lost = [o for o in ok if not (o.status == 200 and not o.error)]
    malformed = [o for o in outcomes if o.spec.kind == "malformed"]
    bad_malformed = [o for o in malformed if o.status not in MALFORMED_STATUSES]
    aborted = [o for o in outcomes if o.spec.kind == "abort"]
    unexpected = [o for o in aborted if o.status not in (200, 499) or o.status >= 500]
    server_errors = [o for o in outcomes if o.status >= 500 and o.status != 503]
    summary: dict[str, Any] = {
        "requests": len(outcomes),
        "completed": len(completed),
        "aborted": len(aborted),
        "malformed": len(malformed),
        "kills": len(killer.kills),
        "replacements": replacements,
        "mismatches": len(mismatches),
        "leaked_blocks": checks["leaked_blocks"],
        "stranded_leases": checks["stranded_leases"],
        "p99_latency_s_faulty": _p99([o.latency_s for o in completed if o.phase == "faulty"]),
        "p99_latency_s_quiet": _p99([o.latency_s for o in completed if o.phase == "quiet"]),
        "lost": len(lost),
        "server_errors": len(server_errors),
        "malformed_not_4xx": len(bad_malformed),
        "aborts_unexpected_status": len(unexpected),
        "retried_503": sum(o.retries_503 for o in outcomes),
        "with_prompt_logprobs": sum("prompt_lp" in o.choices.get(0, {}) for o in completed),
        "responses_api": sum(o.spec.path == "/v1/responses" for o in completed),
        "embeddings": sum(o.spec.path == "/v1/embeddings" for o in completed),
        "grpc": sum(o.spec.path == GRPC for o in completed),
        "integrity_problems": checks["problems"][:20],
        "checked_workers": checks.get("checked_workers", []),
        "workers_restored": restored,
        "killed_roles": _count(k["role"] for k in killer.kills),
        "duration_s": cfg.duration_s,
        "kill_every_s": cfg.kill_every_s,
        "examples": {
            "mismatch": mismatches[:3],
            "lost": [_brief(o) for o in lost[:5]],
            "server_error": [_brief(o) for o in server_errors[:5]],
            "malformed_not_4xx": [_brief(o) for o in bad_malformed[:5]],
            "abort_unexpected_status": [_brief(o) for o in unexpected[:5]],
        },
    }
    summary["ok"] = not (mismatches or lost or server_errors or bad_malformed or unexpected
                         or checks["leaked_blocks"] or checks["stranded_leases"]
                         or checks["problems"] or not restored)
    return summary


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _ends(error: str) -> str:
    """An error's head and tail (a worker's error names its exception at the end)."""
    return error if len(error) <= 900 else f"{error[:300]} ... {error[-600:]}"


def _brief(o: Outcome) -> dict[str, Any]:
    body = o.spec.body if not isinstance(o.spec.body, bytes) else o.spec.body.decode()
    return {"index": o.spec.index, "status": o.status, "error": _ends(o.error),
            "path": o.spec.path, "body": str(body)[:300], "retries_503": o.retries_503}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="faulty phase, seconds")
    parser.add_argument("--kill-every", type=float, default=6.0, help="SIGKILL period, seconds")
    parser.add_argument("--quiet", type=float, default=None, help="fault-free phase, seconds")
    parser.add_argument("--prefill", type=int, default=1,
                        help="prefill workers (0: colocated, as serve's default on one machine)")
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--runtime", choices=["ray", "processes"], default="ray",
                        help="workers as Ray actors or as child processes (no Ray)")
    parser.add_argument("--multimodal", action="store_true",
                        help="1 encode worker, a tiny LLaVA model, some requests with images")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--reference-concurrency", type=int, default=64,
                        help="requests in flight in the fault-free reference run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model folder (default: tiny random)")
    parser.add_argument("--dtype", default="float32",
                        help="activations of every worker and the reference (auto: bf16 where native)")
    parser.add_argument("--quantization", default="auto",
                        help="weights: auto (serve's default), none, int4, int8, w4a8")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8, fp8_e4m3, fp8_e5m2")
    parser.add_argument("--speculative-config", type=json.loads, default=None,
                        help='the decode workers\' speculative_config (JSON, e.g. '
                             '\'{"method": "ngram", "num_speculative_tokens": 4}\'); the '
                             'reference engine does not speculate')
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: every thread's stack on stderr
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("UCX_TLS", "tcp,self")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    cfg = SoakConfig(duration_s=args.duration, kill_every_s=args.kill_every, quiet_s=args.quiet,
                     prefill=args.prefill, decode=args.decode, multimodal=args.multimodal,
                     runtime=args.runtime,
                     concurrency=args.concurrency, seed=args.seed, model=args.model,
                     reference_concurrency=args.reference_concurrency, dtype=args.dtype,
                     quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                     speculative_config=args.speculative_config)
    summary = run_soak(cfg)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
