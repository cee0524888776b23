"""Launcher checks: value checks are remembered per tensor version, never past a change."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.checks import KernelInputError, check_block_tables, memoized
from splitserve.kernels.decode_attention import paged_decode_attention
from tests.kernels.cases import DEVICE, int_tensor, randn


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.calls


def test_memo_skips_unchanged_tensors_only() -> None:
    count = Counter()
    table = int_tensor([1, 2, 3])
    assert memoized("t1", [table], (), count) == 1
    assert memoized("t1", [table], (), count) == 1, "same tensor, same version: remembered"
    assert memoized("t1", [table[:3]], (), count) == 1, "a view of it at the same place too"
    assert memoized("t1", [table], ("other",), count) == 2, "other extra key"
    table[0] = 7
    assert memoized("t1", [table], ("other",), count) == 3, "written in place: checked again"
    assert memoized("t1", [table.clone()], ("other",), count) == 4, "another tensor"


def test_memo_never_remembers_a_failure_or_inference_tensors() -> None:
    table = int_tensor([1, 2])

    def failing() -> None:
        raise KernelInputError("bad")

    for _ in range(2):
        with pytest.raises(KernelInputError):
            memoized("t2", [table], (), failing)
    count = Counter()
    with torch.inference_mode():
        frozen = int_tensor([1, 2])
    memoized("t3", [frozen], (), count)
    memoized("t3", [frozen], (), count)
    assert count.calls == 2


def test_block_table_changed_in_place_after_a_good_call_is_caught() -> None:
    cache = randn((2, 6, 16, 1, 64), torch.float32, seed=0)
    query = randn((2, 2, 64), torch.float32, seed=1)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    lens = int_tensor([20, 5])
    paged_decode_attention(query, cache, tables, lens, 1.0)
    paged_decode_attention(query, cache, tables, lens, 1.0)  # remembered: no read-back
    tables[0, 1] = 6
    with pytest.raises(KernelInputError, match=r"block_tables\[0, 1\] = 6"):
        paged_decode_attention(query, cache, tables, lens, 1.0)


def test_checks_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    tables = torch.tensor([[9]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(KernelInputError):
        check_block_tables(tables, int_tensor([3]), num_blocks=4, block_size=16)
    monkeypatch.setenv("SPLITSERVE_KERNEL_CHECKS", "0")
    check_block_tables(tables, int_tensor([3]), num_blocks=4, block_size=16)
