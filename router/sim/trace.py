"""Mooncake-format request traces: loading, validation, and synthetic prompts.

Owns: parsing JSONL traces (``timestamp`` ms, ``input_length``, ``output_length``,
``hash_ids`` over 512-token blocks) with errors that name the file, the line and
the problem; synthesizing token ids so that equal hash ids give equal tokens;
and the chained block hashes of those tokens (``splitserve.hashing``), memoized.
Must not: simulate anything or know about instances.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitserve.hashing import NONE_HASH, hash_block
from splitserve.router.errors import TraceFormatError

TRACE_BLOCK_SIZE = 512
"""Tokens per hash id in Mooncake traces."""

SYNTH_VOCAB_SIZE = 32_000
"""Synthetic token ids are drawn from [0, SYNTH_VOCAB_SIZE)."""

_REQUIRED = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One request of a trace."""

    arrival_s: float
    """Arrival time in seconds from the trace's start."""
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    """Ids of the prompt's 512-token blocks; equal ids at equal positions: equal prefix."""


def parse_trace_line(line: str, path: str = "<trace>", line_number: int = 1) -> TraceRecord:
    """One JSONL line -> ``TraceRecord``; ``TraceFormatError`` names what is wrong."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(path, line_number, f"not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise TraceFormatError(path, line_number, "expected a JSON object")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise TraceFormatError(path, line_number, f"missing field(s) {', '.join(missing)}")
    timestamp = data["timestamp"]
    if not _is_number(timestamp) or timestamp < 0:
        raise TraceFormatError(
            path, line_number, f"'timestamp' must be a number >= 0, got {timestamp!r}"
        )
    input_length = _count(data, "input_length", path, line_number)
    output_length = _count(data, "output_length", path, line_number)
    hash_ids = data["hash_ids"]
    if not isinstance(hash_ids, list) or not all(_is_int(h) and h >= 0 for h in hash_ids):
        raise TraceFormatError(path, line_number, "'hash_ids' must be a list of integers >= 0")
    max_blocks = math.ceil(input_length / TRACE_BLOCK_SIZE)
    if len(hash_ids) > max_blocks:
        raise TraceFormatError(
            path,
            line_number,
            f"{len(hash_ids)} hash_ids for input_length {input_length}: at most {max_blocks}"
            f" blocks of {TRACE_BLOCK_SIZE} tokens",
        )
    return TraceRecord(timestamp / 1000.0, input_length, output_length, tuple(hash_ids))


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRecord]:
    """All records of a JSONL trace, sorted by arrival (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    records = list(_iter_records(path, limit))
    if not records:
        raise TraceFormatError(str(path), 0, "the trace holds no requests")
    records.sort(key=lambda r: r.arrival_s)
    return records


def _iter_records(path: Path, limit: int | None) -> Iterator[TraceRecord]:
    with path.open() as f:
        count = 0
        for line_number, line in enumerate(f, start=1):
            if limit is not None and count >= limit:
                return
            if line.strip():
                yield parse_trace_line(line, str(path), line_number)
                count += 1


class PromptSynthesizer:
    """Token ids and chained block hashes for trace records, memoized per block.

    Block ``hash_id`` always expands to the same ``TRACE_BLOCK_SIZE`` pseudo-random tokens
    (seeded by the id), so records sharing leading hash ids share leading tokens and hence
    block hashes. A trailing partial block uses the first tokens of its id's expansion.
    """

    def __init__(self, block_size: int = TRACE_BLOCK_SIZE) -> None:
        if block_size != TRACE_BLOCK_SIZE:
            raise ValueError(
                f"Mooncake traces use {TRACE_BLOCK_SIZE}-token blocks, got {block_size}"
            )
        self.block_size = block_size
        self._tokens: dict[int, list[int]] = {}
        self._chain: dict[tuple[int, int], int] = {}

    def block_tokens(self, hash_id: int) -> list[int]:
        tokens = self._tokens.get(hash_id)
        if tokens is None:
            rng = np.random.default_rng(hash_id)
            tokens = rng.integers(0, SYNTH_VOCAB_SIZE, self.block_size).tolist()
            self._tokens[hash_id] = tokens
        return tokens

    def token_ids(self, record: TraceRecord) -> list[int]:
        """The record's synthetic prompt: ``input_length`` token ids."""
        tokens: list[int] = []
        for hash_id in record.hash_ids:
            tokens.extend(self.block_tokens(hash_id))
        if len(tokens) < record.input_length:  # ids missing for a tail: fill deterministically
            tokens.extend(_filler(record, record.input_length - len(tokens)))
        return tokens[: record.input_length]

    def block_hashes(self, record: TraceRecord) -> list[int]:
        """``hash_block_tokens(token_ids(record), 512)``, computed once per distinct prefix."""
        num_full = min(record.input_length // self.block_size, len(record.hash_ids))
        hashes: list[int] = []
        parent = NONE_HASH
        for hash_id in record.hash_ids[:num_full]:
            key = (parent, hash_id)
            chained = self._chain.get(key)
            if chained is None:
                chained = hash_block(parent, self.block_tokens(hash_id))
                self._chain[key] = chained
            hashes.append(chained)
            parent = chained
        return hashes


def _filler(record: TraceRecord, n: int) -> list[int]:
    seed = (record.hash_ids[-1] + 1 if record.hash_ids else 0) * 1_000_003 + record.input_length
    return np.random.default_rng(seed).integers(0, SYNTH_VOCAB_SIZE, n).tolist()


def _count(data: dict[str, object], key: str, path: str, line_number: int) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TraceFormatError(path, line_number, f"{key!r} must be an integer >= 0, got {value!r}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
