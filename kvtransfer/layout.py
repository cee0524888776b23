"""KV cache layout as the transfer layer sees it: shapes, bytes, compatibility, checksums.

Owns ``KvLayout`` (where each (layer, block) lives in the per-layer KV tensors of
DESIGN.md), its ``compatibility_hash``, the field-by-field handshake check, and the
per-(layer, block) checksum that the sender computes and the receiver verifies.

It must not move bytes between processes, hold leases, or import ``splitserve.roles``.

KV cache (one view per layer): ``[2, num_blocks, block_size, num_kv_heads, head_dim]``,
0 = K, 1 = V, of one of the kinds in kernels/kv_cache.py: ``block_major`` (the engine's: all
layers are views of ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``, so a
run of consecutive blocks is one contiguous region) or ``layer_major`` (a contiguous tensor
per layer). A staging buffer of ``n`` blocks over ``L`` layers is
``[L, 2, n, block_size, num_kv_heads, head_dim]`` (see ``kernels.reference.gather_blocks``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from splitserve.errors import IncompatibleKVLayoutError
from splitserve.hashing import HASH_SEED, hash_bytes
from splitserve.kernels.kv_cache import BLOCK_MAJOR, LAYOUT_KINDS, layout_kind

LAYOUT_VERSION = 2
"""Bumped whenever the byte order of a block in the KV tensors or in staging changes."""

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}

# Fields compared at handshake, in the order a mismatch is reported.
_COMPAT_FIELDS = (
    "layout_version",
    "layout_kind",
    "model_id",
    "dtype",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "block_size",
    "layer_windows",
    "model_signature",
)


@dataclasses.dataclass(frozen=True)
class KvLayout:
    """Shape and dtype of one engine's paged KV cache, as agreed between peers."""

    model_id: str
    """Model identity (name or content hash): KV of different weights must never mix."""
    dtype: str
    """Element type of the KV tensors, a torch dtype name such as ``"float32"``."""
    num_layers: int
    """Attention layers, one KV tensor each."""
    num_kv_heads: int
    """KV heads per layer (after any tensor-parallel split)."""
    head_dim: int
    """Elements per head."""
    block_size: int
    """Tokens per block."""
    num_blocks: int = 0
    """Blocks in this engine's cache; local only, not part of compatibility."""
    layout_version: int = LAYOUT_VERSION
    """Version of the byte layout described in this module's docstring."""
    layer_windows: str = ""
    """Each layer's sliding window, comma-separated (0 = global): a windowed layer's cache
    holds different useful tokens than a global one's."""
    model_signature: str = ""
    """What else makes KV of equal shapes differ (architecture, attention scale, soft-cap,
    rotary tables: ``ModelConfig.kv_signature``); empty for bare caches in tests."""
    layout_kind: str = BLOCK_MAJOR
    """How blocks lie in memory (kernels/kv_cache.py): ``block_major`` sends and receives runs
    of blocks in place; peers of different kinds refuse each other at handshake."""

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("KvLayout.model_id must be a non-empty string")
        if self.dtype not in _DTYPES:
            raise ValueError(f"KvLayout.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KvLayout.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks < 0:
            raise ValueError(f"KvLayout.num_blocks must be >= 0, got {self.num_blocks}")
        if self.layout_kind not in LAYOUT_KINDS:
            raise ValueError(
                f"KvLayout.layout_kind must be one of {LAYOUT_KINDS}, got {self.layout_kind!r}"
            )

    @classmethod
    def from_kv_caches(
        cls, kv_caches: Sequence[torch.Tensor], model_id: str, layer_windows: str = "",
        model_signature: str = "",
    ) -> KvLayout:
        """The layout of existing per-layer KV tensors (all of one shape and dtype)."""
        if not kv_caches:
            raise ValueError("kv_caches is empty: need one tensor per layer")
        first = kv_caches[0]
        if first.dim() != 5 or first.shape[0] != 2:
            raise ValueError(
                "each KV cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                f"got {tuple(first.shape)}"
            )
        for i, cache in enumerate(kv_caches):
            if cache.shape != first.shape or cache.dtype != first.dtype:
                raise ValueError(
                    f"layer {i} KV cache {tuple(cache.shape)} {cache.dtype} differs "
                    f"from layer 0 {tuple(first.shape)} {first.dtype}"
                )
        kind = layout_kind(kv_caches)  # ValueError for any other strides
        _, num_blocks, block_size, num_kv_heads, head_dim = first.shape
        return cls(
            model_id=model_id,
            dtype=dtype_name(first.dtype),
            num_layers=len(kv_caches),
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            block_size=block_size,
            num_blocks=num_blocks,
            layer_windows=layer_windows,
            model_signature=model_signature,
            layout_kind=kind,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def bytes_per_block_half(self) -> int:
        """Bytes of K (or of V) of one block in one layer: one contiguous run in the cache."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def bytes_per_layer_block(self) -> int:
        """Bytes of K and V of one block in one layer."""
        return 2 * self.bytes_per_block_half

    def staging_shape(self, num_layers: int, num_blocks: int) -> tuple[int, ...]:
        """Shape of a staging buffer holding ``num_blocks`` blocks of ``num_layers`` layers."""
        return (num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def staging_nbytes(self, num_layers: int, num_blocks: int) -> int:
        return num_layers * num_blocks * self.bytes_per_layer_block

    def block_offset(self, layer: int, kv: int, block_id: int) -> int:
        """Byte offset of block ``block_id``'s K (kv=0) or V (kv=1) of layer ``layer``: inside
        the block-major pool, or inside layer ``layer``'s own tensor (layer-major)."""
        self._check_index(layer, block_id)
        if kv not in (0, 1):
            raise ValueError(f"kv must be 0 (K) or 1 (V), got {kv}")
        if self.layout_kind == BLOCK_MAJOR:
            return ((block_id * self.num_layers + layer) * 2 + kv) * self.bytes_per_block_half
        return (kv * self.num_blocks + block_id) * self.bytes_per_block_half

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block of every layer, K and V: one region in the block-major pool."""
        return self.num_layers * self.bytes_per_layer_block

    def _check_index(self, layer: int, block_id: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} out of range [0, {self.num_blocks})")

    def check_block_ids(self, block_ids: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the first block id outside this cache."""
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks:
                raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")

    def compat_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _COMPAT_FIELDS}

    def compatibility_hash(self) -> int:
        """64-bit hash of every field two peers must agree on (not ``num_blocks``)."""
        text = "|".join(f"{name}={value}" for name, value in self.compat_fields().items())
        return hash_bytes(text.encode())

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> KvLayout:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check_compatible(self, peer: KvLayout | Mapping[str, Any]) -> None:
        """Raise ``IncompatibleKVLayoutError`` naming the first field that differs from ``peer``."""
        theirs = peer.compat_fields() if isinstance(peer, KvLayout) else dict(peer)
        for name, mine in self.compat_fields().items():
            if theirs.get(name) != mine:
                raise IncompatibleKVLayoutError(
                    f"KV layout mismatch in field {name!r}: local {mine!r}, "
                    f"peer {theirs.get(name)!r}",
                    field=name,
                )


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (``torch.float16`` -> ``"float16"``)."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


def byte_view(tensor: torch.Tensor) -> memoryview:
    """Zero-copy bytes of a contiguous CPU tensor (any dtype, bf16 included)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"byte_view needs a CPU tensor, got {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous tensor")
    return tensor.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def _pair_checksum(k: memoryview, v: memoryview) -> int:
    """Checksum of one block in one layer: xxhash64 of V seeded by xxhash64 of K."""
    return hash_bytes(v, seed=hash_bytes(k, seed=HASH_SEED))


def _rows(tensor: torch.Tensor) -> Any:
    """``tensor`` [..., *block] as a numpy uint8 array [..., bytes per block] (no copy on CPU;
    each block's trailing three dims must be packed, the outer ones may be strided)."""
    cpu = tensor if tensor.device.type == "cpu" else tensor.cpu()
    rows = cpu.view(*cpu.shape[:-3], -1)  # merges the packed block dims without a copy
    return rows.view(torch.uint8).numpy()


def staging_checksums(staging: torch.Tensor) -> list[list[int]]:
    """Checksums ``[layer][block]`` of a staging buffer ``[L, 2, n, bs, heads, head_dim]``."""
    if staging.dim() != 6 or staging.shape[1] != 2:
        raise ValueError(
            f"staging must be [L, 2, n, bs, heads, head_dim], got {tuple(staging.shape)}"
        )
    rows = _rows(staging)  # [L, 2, n, block bytes]
    return [
        [_pair_checksum(layer[0, i].data, layer[1, i].data) for i in range(layer.shape[1])]
        for layer in rows
    ]


def cache_checksums(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int]) -> list[list[int]]:
    """Checksums ``[layer][i]`` of ``block_ids`` read in place from the KV tensors.

    Equal to ``staging_checksums(gather_blocks(kv_caches, block_ids))``; on CPU without
    the copy (each block's K and V are contiguous runs of the cache).
    """
    result: list[list[int]] = []
    for cache in kv_caches:
        ids: Sequence[int] = block_ids
        if cache.device.type != "cpu":
            cache, ids = cache[:, list(block_ids)], range(len(block_ids))
        rows = _rows(cache)  # [2, num_blocks, block bytes]
        result.append([_pair_checksum(rows[0, b].data, rows[1, b].data) for b in ids])
    return result


# ---------------------------------------------------------------------- zero-copy regions


def merge_runs(*id_lists: Sequence[int]) -> list[int]:
    """Lengths of the runs where every list's ids go up by one together.

    ``merge_runs(remote_ids, local_ids)`` splits a transfer into the fewest messages that
    are each one contiguous region of both peers' block-major pools.
    """
    if not id_lists or not id_lists[0]:
        return []
    count = len(id_lists[0])
    if any(len(ids) != count for ids in id_lists):
        raise ValueError(f"block id lists differ in length: {[len(ids) for ids in id_lists]}")
    runs = [1]
    for i in range(1, count):
        if all(ids[i] == ids[i - 1] + 1 for ids in id_lists):
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def block_regions(
    pool: torch.Tensor,
    block_ids: Sequence[int],
    runs: Sequence[int],
    layers: range | None = None,
) -> list[torch.Tensor]:
    """One contiguous view of ``pool`` [num_blocks, num_layers, ...] per run of consecutive
    ``block_ids``; with ``layers`` (a group of a layer-wise streamed read) each region is
    ``pool[b, layers]``, contiguous inside one block only, so every run must be one block.

    ``ValueError`` naming the problem for a run that is not consecutive, an id outside the
    pool, or run lengths that do not cover ``block_ids``; never a copy.
    """
    if sum(runs) != len(block_ids) or any(n < 1 for n in runs):
        raise ValueError(f"runs {list(runs)[:8]} do not split {len(block_ids)} block ids")
    if layers is not None and layers != range(pool.shape[1]):
        if any(n != 1 for n in runs):
            raise ValueError("a read of some layers goes one block per run")
        if not (0 <= layers.start < layers.stop <= pool.shape[1]) or layers.step != 1:
            raise ValueError(f"layers {layers} outside [0, {pool.shape[1]})")
        regions = block_regions(pool, block_ids, runs)
        return [r[:, layers.start : layers.stop] for r in regions]
    num_blocks = pool.shape[0]
    regions, at = [], 0
    for n in runs:
        first = block_ids[at]
        if list(block_ids[at : at + n]) != list(range(first, first + n)):
            raise ValueError(
                f"run {list(block_ids[at : at + n])[:8]} of block ids is not consecutive"
            )
        if not (0 <= first and first + n <= num_blocks):
            raise ValueError(f"run of blocks [{first}, {first + n}) is outside [0, {num_blocks})")
        regions.append(pool[first : first + n])
        at += n
    return regions


def regions_nbytes(regions: Sequence[torch.Tensor]) -> int:
    return sum(region.numel() * region.element_size() for region in regions)
