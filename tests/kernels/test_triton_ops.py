"""``triton_ops`` is a drop-in for ``reference``: same names, same signatures, picked by ops."""

from __future__ import annotations

import inspect

import pytest

from splitserve.kernels import ops, reference, triton_ops

PUBLIC = [
    name
    for name, fn in vars(reference).items()
    if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == reference.__name__
]


def test_every_reference_function_has_a_twin() -> None:
    assert set(PUBLIC) == set(triton_ops.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_signatures_match_the_reference(name: str) -> None:
    ours, theirs = getattr(triton_ops, name), getattr(reference, name)
    assert inspect.signature(ours) == inspect.signature(theirs)


# Host-side helpers with no kernel of their own: the table and the MoE routing (softmax + top-k,
# the grouping of tokens by expert, the weighted combine) are the same torch code on every backend.
SHARED = {"rope_cos_sin_cache", "moe_route", "moe_groups", "moe_combine", "softcap"}
# Steps composed of a backend's own kernels (reference._compose_rotary_store_kv).
COMPOSED = {"rotary_store_kv": {"rms_norm", "rotary_embedding", "store_kv"}}


def test_kernel_files_own_their_launchers() -> None:
    for name in PUBLIC:
        if name in SHARED:
            assert getattr(triton_ops, name) is getattr(reference, name)
        elif name in COMPOSED:
            parts = {c.cell_contents for c in getattr(triton_ops, name).__closure__}
            assert parts == {getattr(triton_ops, p) for p in COMPOSED[name]}
            assert not parts & {getattr(reference, p) for p in COMPOSED[name]}
        else:
            assert getattr(triton_ops, name).__module__ != reference.__name__


def test_ops_selects_triton_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_KERNELS", "triton")
    assert ops.get_ops("cpu") is triton_ops
    monkeypatch.setenv("SPLITSERVE_KERNELS", "torch")
    assert ops.get_ops("cpu") is reference
