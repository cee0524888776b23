"""The workload generator: hot shared system prompts, multi-turn prefix reuse, bursts,
phases, determinism, documented validation, and files the trace loader reads back."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from splitserve.errors import ConfigError
from splitserve.router.sim.trace import TRACE_BLOCK_SIZE, load_trace
from splitserve.router.sim.tracegen import PRESETS, PhaseSpec, WorkloadSpec, generate, main


def test_same_seed_same_trace_and_file_round_trips(tmp_path: Path) -> None:
    spec = replace(PRESETS["chat"], phases=(PhaseSpec(120, 3.0),))
    assert generate(spec) == generate(spec)
    assert generate(spec) != generate(replace(spec, seed=1))
    out = tmp_path / "t.jsonl"
    assert main(["--preset", "chat", "--out", str(out), "--duration", "60"]) == 0
    records = load_trace(out)
    assert records and all(r.input_length <= 32_768 for r in records)


def test_hot_system_prompts_are_shared_block_for_block() -> None:
    spec = WorkloadSpec(
        phases=(PhaseSpec(300, 4.0, 256, 32),),
        num_system_prompts=6,
        system_prompt_tokens=4 * TRACE_BLOCK_SIZE,
        system_prompt_zipf=1.5,
        mean_turns=1,
    )
    heads = Counter(r.hash_ids[:4] for r in generate(spec))
    assert len(heads) <= 6
    counts = sorted(heads.values(), reverse=True)
    assert counts[0] > 3 * counts[-1]  # Zipf: the hottest dominates


def test_later_turns_repeat_the_previous_prompt_blocks() -> None:
    spec = WorkloadSpec(
        phases=(PhaseSpec(200, 2.0, 700, 300),),
        num_system_prompts=0,
        mean_turns=4,
        think_time_s=1.0,
        burst_factor=1.0,
    )
    records = generate(spec)
    by_first: dict[int, list] = {}
    for r in records:
        by_first.setdefault(r.hash_ids[0], []).append(r)
    multi = [s for s in by_first.values() if len(s) > 1]
    assert multi
    for session in multi:
        session.sort(key=lambda r: r.arrival_s)
        for prev, cur in zip(session, session[1:], strict=False):
            full = prev.input_length // TRACE_BLOCK_SIZE
            assert cur.hash_ids[:full] == prev.hash_ids[:full]
            assert cur.input_length > prev.input_length + prev.output_length


def test_bursts_raise_the_peak_rate_and_keep_the_mean() -> None:
    calm = WorkloadSpec(phases=(PhaseSpec(2000, 2.0),), mean_turns=1, burst_factor=1.0)
    bursty = replace(calm, burst_factor=8.0, burst_s=20, calm_s=80)

    def per_10s(spec: WorkloadSpec) -> np.ndarray:
        times = np.array([r.arrival_s for r in generate(spec)])
        return np.bincount((times // 10).astype(int))

    a, b = per_10s(calm), per_10s(bursty)
    assert b.sum() == pytest.approx(a.sum(), rel=0.2)
    assert b.max() > 2 * a.max()


def test_phases_shift_the_mix() -> None:
    records = generate(PRESETS["shifting"])
    first = [r for r in records if r.arrival_s < 600]
    second = [r for r in records if r.arrival_s >= 600]
    assert np.median([r.input_length for r in first]) > 4 * np.median(
        [r.input_length for r in second]
    )
    assert np.median([r.output_length for r in second]) > 10 * np.median(
        [r.output_length for r in first]
    )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mean_turns": 0.5}, "mean_turns must be >= 1"),
        ({"burst_factor": 0.5}, "burst_factor must be >= 1"),
        ({"phases": ()}, "at least one phase"),
        ({"num_system_prompts": -1}, "num_system_prompts"),
    ],
)
def test_bad_specs_name_the_field(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        WorkloadSpec(**kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rate_rps must be a positive number, got -1"):
        PhaseSpec(rate_rps=-1)
