"""How long simulated instances take to prefill and decode: a small calibrated formula.

Owns: the cost model (coefficients, their JSON file, the default GPU profile).
Must not: simulate queues or caches (``simulator`` does) or import torch; the
calibration script (``bench/router_calibrate.py``) measures and fits, this module
only evaluates and loads.

Prefill of ``n`` new tokens after ``c`` cached ones costs::

    overhead + per_token * n + per_token_pair * n * (c + n / 2)

the linear term being the weight matmuls and the pair term causal attention
(each new token attends to the cached tokens and half the new ones on average).
A decode step of a batch of ``n`` requests costs
``step_overhead + per_seq * n + per_kv_token * tokens in the batch`` (``per_seq``: each
request's share of the weight matmuls, which on a CPU grows with the batch; about 0 on a GPU,
where a step streams the weights whatever the batch).
Moving a prompt's KV from a prefill to a decode instance costs
``kv_transfer_overhead + prompt tokens * kv_bytes_per_token / link_bandwidth``.

Default profile ``a100-80gb/llama-3-8b/bf16`` (documented, not measured here):
8.0e9 parameters -> 16 GFLOP per token; A100 bf16 dense peak 312 TFLOP/s at 55%
prefill efficiency -> 93 us/token (about 10.7k tokens/s on short prompts).
Attention: 4 * 32 layers * 4096 = 524,288 FLOP per (query, key) pair -> 3.06 ns.
A 10k-token prompt then takes about 1.1 s, a 40k-token one 6.2 s. KV per token
is 128 KiB (32 layers, 8 KV heads x 128, K and V, bf16), so 512-token blocks are
64 MiB and the about 58 GB of HBM left beside weights and activations hold 900 of
them. A decode step: 8 ms to stream the weights at about 2 TB/s, plus 64 ns per
token of KV read. KV transfer: 128 KiB per token over a 200 Gb/s RDMA link (25 GB/s),
plus 2 ms to set up the transfer (an 8k-token prompt moves in 45 ms).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from splitserve.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CostModel:
    """Coefficients of the prefill and decode time formulas (seconds)."""

    name: str = "a100-80gb/llama-3-8b/bf16"
    """What hardware and model the coefficients describe."""
    prefill_overhead_s: float = 0.015
    """Fixed cost of one prefill (scheduling, launches, sampling the first token)."""
    prefill_s_per_token: float = 9.3e-5
    """Cost per new prompt token (weight matmuls)."""
    prefill_s_per_token_pair: float = 3.06e-9
    """Cost per (new token, attended token) pair (attention)."""
    decode_step_overhead_s: float = 0.008
    """Cost of one decode step of any batch (streaming the weights)."""
    decode_s_per_kv_token: float = 6.4e-8
    """Cost per KV token read in a decode step."""
    decode_s_per_seq: float = 0.0
    """Cost per request in a decode step's batch (its rows of the matmuls, its sampling)."""
    kv_capacity_blocks: int = 900
    """Prefix-cache capacity of one instance, in 512-token blocks."""
    block_size: int = 512
    """Tokens per block of ``kv_capacity_blocks``."""
    kv_bytes_per_token: float = 131_072.0
    """Bytes of KV cache per prompt token (all layers, K and V)."""
    link_bandwidth_bytes_per_s: float = 25e9
    """Bandwidth of the prefill -> decode KV link."""
    kv_transfer_overhead_s: float = 0.002
    """Fixed cost of one KV transfer (handshake, registration)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "name":
                if not isinstance(value, str) or not value:
                    raise ConfigError("cost model 'name' must be a non-empty string")
                continue
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
            ):
                raise ConfigError(
                    f"cost model field {f.name!r} must be a finite number, got {value!r}"
                )
            if value < 0 or (value == 0 and f.name in _POSITIVE):
                raise ConfigError(f"cost model field {f.name!r} must be positive, got {value!r}")

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """Seconds to prefill ``new_tokens`` after ``cached_tokens`` already in the KV cache.

        A fully cached prompt still computes its last token to sample the first output token.
        """
        n = max(1, new_tokens)
        pairs = n * (cached_tokens + n / 2)
        return (
            self.prefill_overhead_s
            + self.prefill_s_per_token * n
            + self.prefill_s_per_token_pair * pairs
        )

    def decode_step_time(self, batch_kv_tokens: int, batch: float = 1) -> float:
        """Seconds for one decode step of ``batch`` requests holding ``batch_kv_tokens`` KV
        tokens in all."""
        return (
            self.decode_step_overhead_s
            + self.decode_s_per_seq * batch
            + self.decode_s_per_kv_token * batch_kv_tokens
        )

    def kv_transfer_time(self, prompt_tokens: int) -> float:
        """Seconds to move ``prompt_tokens`` tokens of KV from prefill to decode."""
        return (
            self.kv_transfer_overhead_s
            + prompt_tokens * self.kv_bytes_per_token / self.link_bandwidth_bytes_per_s
        )

    @property
    def kv_capacity_tokens(self) -> int:
        """KV tokens one instance holds."""
        return self.kv_capacity_blocks * self.block_size

    def nominal_prefill_rate_tps(self, prompt_len: int = 8192) -> float:
        """Tokens/s on an uncached ``prompt_len``-token prompt (a router's starting estimate)."""
        return prompt_len / self.prefill_time(prompt_len)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """Read a JSON file written by ``save`` (or the calibration script); names bad fields."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read cost model {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"cost model {path} must hold a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"cost model {path}: unknown fields {unknown}; known: {sorted(known)}"
            )
        return cls(**data)


_POSITIVE = {
    "prefill_s_per_token",
    "kv_capacity_blocks",
    "block_size",
    "link_bandwidth_bytes_per_s",
}


def fit_cost_model(
    prefill_samples: list[tuple[int, int, float]],
    decode_samples: list[tuple[int, float]] | list[tuple[int, float, int]],
    name: str,
    kv_capacity_blocks: int,
    block_size: int = 512,
    **extra: float,
) -> CostModel:
    """Least-squares fit of the formulas above to measured timings.

    ``prefill_samples``: (new tokens, cached tokens, seconds); ``decode_samples``:
    (KV tokens in the batch, seconds per step), or (KV tokens, seconds, requests in the batch)
    to fit the per-request term too (it stays 0 otherwise); ``extra``: other fields (KV bytes
    per token, link bandwidth) taken as given. Both fits weigh each sample by 1 / its time
    (relative error: small prefills and batches are common). Coefficients are clipped at zero (a
    negative fit means that term is lost in the noise); the per-token one must stay positive.
    """
    import numpy as np

    if len(prefill_samples) < 3 or len(decode_samples) < 2:
        raise ConfigError("fitting needs at least 3 prefill and 2 decode samples")
    p = np.array(prefill_samples, dtype=float)
    n, c, t = p[:, 0], p[:, 1], p[:, 2]
    design = np.stack([np.ones_like(n), n, n * (c + n / 2)], axis=1)
    # Relative error matters (small prefills are the common case): weight rows by 1/t.
    coef, *_ = np.linalg.lstsq(design / t[:, None], np.ones_like(t), rcond=None)
    d = np.array(decode_samples, dtype=float)
    if d.ndim != 2 or d.shape[1] not in (2, 3):
        raise ConfigError("decode samples are (kv_tokens, seconds) or (kv_tokens, seconds, batch)")
    per_seq = d.shape[1] == 3 and len(d) >= 3

    def fit_decode(with_batch: bool) -> list[float]:
        columns = [np.ones(len(d))] + ([d[:, 2]] if with_batch else []) + [d[:, 0]]
        found, *_ = np.linalg.lstsq(
            np.stack(columns, axis=1) / d[:, 1:2], np.ones(len(d)), rcond=None
        )
        return [float(x) for x in found]

    dcoef = fit_decode(per_seq)
    if per_seq and dcoef[1] < 0:  # no per-request cost to see (a GPU): fit without the term
        per_seq, dcoef = False, fit_decode(False)
    dcoef = [max(0.0, x) for x in dcoef]
    overhead, per_token, per_pair = (max(0.0, float(x)) for x in coef)
    return CostModel(
        name=name,
        prefill_overhead_s=overhead,
        prefill_s_per_token=per_token,
        prefill_s_per_token_pair=per_pair,
        decode_step_overhead_s=dcoef[0],
        decode_s_per_seq=dcoef[1] if per_seq else 0.0,
        decode_s_per_kv_token=dcoef[-1],
        kv_capacity_blocks=kv_capacity_blocks,
        block_size=block_size,
        **extra,
    )


CPU_SMOLLM2_135M = CostModel(
    name="cpu/SmolLM2-135M-Instruct/auto (int4:Q4_1 x210, int8:Q8_0 x1)/float32, float32 KV"
    "/1 thread/splitserve (measured)",
    prefill_overhead_s=7.49e-3,
    prefill_s_per_token=5.58e-4,
    prefill_s_per_token_pair=8.77e-7,
    decode_step_overhead_s=4.93e-3,
    decode_s_per_kv_token=2.59e-6,
    decode_s_per_seq=8.54e-4,
    kv_capacity_blocks=45,
    kv_bytes_per_token=46_080.0,
    link_bandwidth_bytes_per_s=1e9,
)
"""splitserve's own engine (``LLM``, one torch thread: a worker's share of a 2-core machine)
with the embedded SmolLM2-135M in the engine's default formats (the GGUF's Q4_1 / Q8_0 codes,
float32 activations and KV), on a 2-core AMD EPYC (Zen 5, AVX-512 with VNNI and bf16) at load
average 0.2-0.3, fitted by ``bench/router_calibrate.py --measure-splitserve --threads 1`` then
``--fit`` (``bench/router_cost_cpu_smollm2.json``, timings beside it; prefill within 7% of
every sample but the longest, 1,024 tokens after 512 cached, 20% under; decode steps of 1 to
64 requests within 2%). KV: 1 GiB per worker at 46,080 B/token (fp32, 30 layers x 3 KV
heads x 64); the link is UCX over TCP loopback, about 1 GB/s."""

PROFILES: dict[str, CostModel] = {"a100": CostModel(), "cpu": CPU_SMOLLM2_135M}
"""Built-in profiles by short name (``planner.cost_model``, ``--cost-model``)."""

