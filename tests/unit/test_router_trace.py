"""Trace loading: malformed lines are named; synthetic prompts share tokens where ids match."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.hashing import hash_block_tokens
from splitserve.router.errors import TraceFormatError
from splitserve.router.sim.trace import PromptSynthesizer, load_trace, parse_trace_line

SLICE = Path(__file__).resolve().parents[1] / "data" / "mooncake_slice.jsonl"


def test_slice_loads_sorted_with_seconds() -> None:
    records = load_trace(SLICE)
    assert len(records) == 300
    assert records[0].input_length == 33822 and records[0].output_length == 9
    assert records[0].hash_ids[:3] == (10854, 10855, 10856) and len(records[0].hash_ids) == 67
    assert records[3].arrival_s == pytest.approx(930.725)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(records, records[1:], strict=False))
    assert len(load_trace(SLICE, limit=10)) == 10


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 1}', "missing field(s) hash_ids"),
        (
            '{"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [1]}',
            "'timestamp'",
        ),
        (
            '{"timestamp": 0, "input_length": "5", "output_length": 1, "hash_ids": [1]}',
            "'input_length' must be an integer",
        ),
        (
            '{"timestamp": 0, "input_length": 5, "output_length": true, "hash_ids": [1]}',
            "'output_length' must be an integer",
        ),
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1.5]}',
            "'hash_ids' must be a list of integers",
        ),
        (
            '{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1, 2, 3]}',
            "3 hash_ids for input_length 600: at most 2 blocks",
        ),
    ],
)
def test_malformed_lines_name_file_line_and_problem(line: str, problem: str) -> None:
    with pytest.raises(TraceFormatError, match="t.jsonl:7: ") as info:
        parse_trace_line(line, "t.jsonl", 7)
    assert problem in str(info.value) and info.value.line_number == 7


def test_malformed_line_in_a_file_reports_its_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}'
    path.write_text(f"{good}\n\n{good}\n{{oops\n")
    with pytest.raises(TraceFormatError, match=r"bad.jsonl:4: not valid JSON"):
        load_trace(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TraceFormatError, match="no requests"):
        load_trace(empty)
    with pytest.raises(FileNotFoundError, match="trace file not found"):
        load_trace(tmp_path / "missing.jsonl")


def test_equal_hash_ids_give_equal_tokens_and_block_hashes() -> None:
    a = parse_trace_line(
        '{"timestamp": 0, "input_length": 1100, "output_length": 1, "hash_ids": [7, 8, 9]}'
    )
    b = parse_trace_line(
        '{"timestamp": 0, "input_length": 1300, "output_length": 1, "hash_ids": [7, 8, 5]}'
    )
    c = parse_trace_line(
        '{"timestamp": 0, "input_length": 1100, "output_length": 1, "hash_ids": [4, 8, 9]}'
    )
    synth = PromptSynthesizer()
    ta, tb, tc = synth.token_ids(a), synth.token_ids(b), synth.token_ids(c)
    assert len(ta) == 1100 and len(tb) == 1300
    assert ta[:1024] == tb[:1024] and ta[1024:] != tb[1024:1100]
    assert ta[:512] != tc[:512] and ta[512:1024] == tc[512:1024]
    assert all(0 <= t < 32_000 for t in ta)
    ha, hb, hc = synth.block_hashes(a), synth.block_hashes(b), synth.block_hashes(c)
    assert ha == hash_block_tokens(ta, 512) and len(ha) == 2
    assert ha == hb
    assert hc[1] != ha[1]  # same block id after a different prefix: a different chained hash
    assert PromptSynthesizer().token_ids(a) == ta  # deterministic across instances
