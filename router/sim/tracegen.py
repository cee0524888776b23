"""Synthetic Mooncake-format traces: hot shared system prompts, multi-turn sessions, bursts,
and phases whose request mix shifts.

Owns: ``WorkloadSpec`` / ``PhaseSpec`` (every parameter documented and validated),
``generate(spec) -> list[TraceRecord]``, ``write_trace`` (JSONL the simulator's
``load_trace`` reads) and the CLI ``python -m splitserve.router.sim.tracegen``. Must not:
simulate or route anything.

How a trace is built (all draws from one seeded ``numpy`` generator, so a spec and a seed
give the same file):

- Sessions start by a Poisson process whose rate is ``rate_rps / mean turns`` (so requests
  arrive at ``rate_rps`` on average), modulated on/off for bursts: the process alternates
  between calm spells and bursts (exponential lengths, means ``calm_s`` and ``burst_s``);
  during a burst the rate is ``burst_factor`` times the calm rate, and the calm rate is set
  so the long-run mean stays ``rate_rps``.
- Each session picks a system prompt among ``num_system_prompts`` by a Zipf law of exponent
  ``system_prompt_zipf`` (1.0+: a few hot ones dominate). Its full 512-token blocks are
  shared, block id for block id, by every session that picks it.
- A session has a geometric number of turns (at least 1) with mean ``mean_turns``; turn ``k`` arrives a think
  time (exponential, mean ``think_time_s``) after turn ``k - 1`` would have finished. Its
  prompt is the previous prompt + the previous answer + a new user message, so it repeats
  every full block of the previous prompt (the KV a prefix cache can reuse).
- User messages and outputs are log-normal (medians ``user_tokens`` / ``output_tokens``,
  log-space sigma ``length_sigma``), clipped to ``[1, max_tokens]``.
- ``phases``: consecutive spells with their own rate and lengths (a prefill-heavy phase then
  a decode-heavy one, for the planner); without phases the whole trace is one phase.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from splitserve.errors import ConfigError
from splitserve.router.sim.trace import TRACE_BLOCK_SIZE, TraceRecord


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    """One spell of a workload (seconds and tokens)."""

    duration_s: float = 600.0
    """Length of the phase; sessions start only within it (their later turns may spill over)."""
    rate_rps: float = 4.0
    """Mean request arrival rate (all turns counted)."""
    user_tokens: int = 1024
    """Median tokens of a user message (the first turn's beside the system prompt)."""
    output_tokens: int = 256
    """Median output tokens."""

    def __post_init__(self) -> None:
        _positive("duration_s", self.duration_s)
        _positive("rate_rps", self.rate_rps)
        _positive("user_tokens", self.user_tokens)
        _positive("output_tokens", self.output_tokens)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A whole synthetic workload; see the module docstring for how each field is used."""

    phases: tuple[PhaseSpec, ...] = (PhaseSpec(),)
    num_system_prompts: int = 8
    """Distinct system prompts (0: none)."""
    system_prompt_tokens: int = 2048
    """Tokens of each system prompt."""
    system_prompt_zipf: float = 1.2
    """Zipf exponent of system-prompt popularity (0: uniform; larger: hotter head)."""
    mean_turns: float = 3.0
    """Mean turns per session (1: single-turn requests only)."""
    think_time_s: float = 30.0
    """Mean pause between a turn's answer and the next turn."""
    burst_factor: float = 4.0
    """Arrival rate during a burst over the calm rate (1: no bursts, plain Poisson)."""
    burst_s: float = 20.0
    """Mean burst length."""
    calm_s: float = 120.0
    """Mean calm spell between bursts."""
    length_sigma: float = 0.6
    """Log-space standard deviation of user message and output lengths."""
    max_tokens: int = 32_768
    """Cap on a prompt's and an output's tokens (a session ends when its prompt would pass it)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.phases:
            raise ConfigError("a workload needs at least one phase")
        if self.num_system_prompts < 0:
            raise ConfigError(f"num_system_prompts must be >= 0, got {self.num_system_prompts}")
        if self.num_system_prompts and self.system_prompt_tokens < 1:
            raise ConfigError(f"system_prompt_tokens must be >= 1, got {self.system_prompt_tokens}")
        if not self.system_prompt_zipf >= 0:
            raise ConfigError(f"system_prompt_zipf must be >= 0, got {self.system_prompt_zipf}")
        if not self.mean_turns >= 1:
            raise ConfigError(f"mean_turns must be >= 1, got {self.mean_turns}")
        if not self.burst_factor >= 1:
            raise ConfigError(f"burst_factor must be >= 1, got {self.burst_factor}")
        for name in ("think_time_s", "burst_s", "calm_s"):
            _positive(name, getattr(self, name))
        if not self.length_sigma >= 0:
            raise ConfigError(f"length_sigma must be >= 0, got {self.length_sigma}")
        _positive("max_tokens", self.max_tokens)


PRESETS: dict[str, WorkloadSpec] = {
    "chat": WorkloadSpec(),
    "agents": WorkloadSpec(
        phases=(PhaseSpec(duration_s=600, rate_rps=6, user_tokens=512, output_tokens=128),),
        num_system_prompts=4,
        system_prompt_tokens=6144,
        system_prompt_zipf=1.5,
        mean_turns=6,
        think_time_s=5,
        burst_factor=6,
    ),
    "shifting": WorkloadSpec(
        phases=(
            PhaseSpec(duration_s=600, rate_rps=3.0, user_tokens=8192, output_tokens=32),
            PhaseSpec(duration_s=600, rate_rps=3.0, user_tokens=1024, output_tokens=2048),
        ),
        num_system_prompts=0,
        mean_turns=1,
        burst_factor=1,
        length_sigma=0.3,
    ),
    "stationary": WorkloadSpec(
        phases=(PhaseSpec(duration_s=1200, rate_rps=3.0, user_tokens=2048, output_tokens=256),),
        num_system_prompts=0,
        mean_turns=1,
        burst_factor=1,
        length_sigma=0.3,
    ),
}
"""Named workloads (the planner's shifting and stationary traces, two cache-heavy mixes)."""


@dataclass(slots=True)
class _Ids:
    next_id: int = 0
    system: dict[int, list[int]] = field(default_factory=dict)

    def fresh(self, n: int) -> list[int]:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return ids


def generate(spec: WorkloadSpec) -> list[TraceRecord]:
    """All requests of the workload, sorted by arrival."""
    rng = np.random.default_rng(spec.seed)
    ids = _Ids()
    records: list[TraceRecord] = []
    start = 0.0
    for phase in spec.phases:
        for t in _session_starts(rng, spec, phase, start):
            records.extend(_session(rng, spec, phase, ids, t))
        start += phase.duration_s
    records.sort(key=lambda r: r.arrival_s)
    return records


def _session_starts(
    rng: np.random.Generator, spec: WorkloadSpec, phase: PhaseSpec, start: float
) -> list[float]:
    """Session start times in ``[start, start + duration)``: on/off modulated Poisson."""
    session_rate = phase.rate_rps / spec.mean_turns
    burst_share = spec.burst_s / (spec.burst_s + spec.calm_s) if spec.burst_factor > 1 else 0.0
    calm_rate = session_rate / (1 - burst_share + burst_share * spec.burst_factor)
    times, t, end = [], start, start + phase.duration_s
    bursting = False
    while t < end:
        spell = rng.exponential(spec.burst_s if bursting else spec.calm_s)
        rate = calm_rate * (spec.burst_factor if bursting else 1.0)
        stop = min(end, t + spell)
        while True:
            t += rng.exponential(1 / rate)
            if t >= stop:
                break
            times.append(t)
        t = stop
        bursting = not bursting and spec.burst_factor > 1
    return times


def _lognormal(rng: np.random.Generator, median: int, sigma: float, cap: int) -> int:
    return int(min(cap, max(1, round(median * math.exp(sigma * rng.standard_normal())))))


def _session(
    rng: np.random.Generator, spec: WorkloadSpec, phase: PhaseSpec, ids: _Ids, t: float
) -> list[TraceRecord]:
    prefix_ids, prompt_len = _system_prompt(rng, spec, ids)
    turns = int(rng.geometric(1 / spec.mean_turns)) if spec.mean_turns > 1 else 1
    records = []
    for _ in range(turns):
        user = _lognormal(rng, phase.user_tokens, spec.length_sigma, spec.max_tokens)
        output = _lognormal(rng, phase.output_tokens, spec.length_sigma, spec.max_tokens)
        length = prompt_len + user
        if length > spec.max_tokens:
            break
        full_kept = min(len(prefix_ids), prompt_len // TRACE_BLOCK_SIZE)
        hash_ids = prefix_ids[:full_kept]
        hash_ids += ids.fresh(math.ceil(length / TRACE_BLOCK_SIZE) - full_kept)
        records.append(TraceRecord(t, length, output, tuple(hash_ids)))
        prefix_ids, prompt_len = hash_ids, length + output
        # The next turn comes a think time after this one's answer (rough service time).
        t += output * 0.03 + rng.exponential(spec.think_time_s)
    return records


def _system_prompt(
    rng: np.random.Generator, spec: WorkloadSpec, ids: _Ids
) -> tuple[list[int], int]:
    """The chosen system prompt's block ids and its length (no system prompt: none)."""
    if not spec.num_system_prompts:
        return [], 0
    ranks = np.arange(1, spec.num_system_prompts + 1, dtype=float)
    weights = ranks**-spec.system_prompt_zipf
    choice = int(rng.choice(spec.num_system_prompts, p=weights / weights.sum()))
    if choice not in ids.system:
        ids.system[choice] = ids.fresh(math.ceil(spec.system_prompt_tokens / TRACE_BLOCK_SIZE))
    return list(ids.system[choice]), spec.system_prompt_tokens


def write_trace(records: Sequence[TraceRecord], path: str | Path) -> None:
    """Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``."""
    with Path(path).open("w") as f:
        for r in records:
            row = {
                "timestamp": round(r.arrival_s * 1000),
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": list(r.hash_ids),
            }
            f.write(json.dumps(row) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m splitserve.router.sim.tracegen", description=__doc__.split("\n")[0]
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="chat")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="override every phase's rate_rps")
    p.add_argument("--duration", type=float, default=None, help="override every phase's length")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = PRESETS[args.preset]
    if args.seed is not None:
        spec = replace(spec, seed=args.seed)
    if args.rate is not None or args.duration is not None:
        spec = replace(
            spec,
            phases=tuple(
                replace(
                    ph,
                    rate_rps=args.rate if args.rate is not None else ph.rate_rps,
                    duration_s=args.duration if args.duration is not None else ph.duration_s,
                )
                for ph in spec.phases
            ),
        )
    records = generate(spec)
    write_trace(records, args.out)
    print(f"wrote {len(records)} requests to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
