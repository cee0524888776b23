"""Chained block hashes: the one definition shared by workers and the router.

A block's hash covers its parent's hash, its token ids and any extra keys (for
example the content hash of an image whose placeholder tokens fall in the
block), so equal hashes mean equal KV. The hash is a seeded 64-bit xxhash over a
fixed byte encoding: stable across processes, machines and Python versions
(never Python's ``hash()``, which is salted per process).

This module imports nothing of ours and neither torch nor Ray.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import xxhash

HASH_SEED = 0x5EED_5E12
"""Seed of every block hash; changing it invalidates every prefix cache and index."""

NONE_HASH = 0
"""Parent hash of a sequence's first block."""

ExtraKey = int | str | bytes


def _encode_extra(key: ExtraKey) -> bytes:
    if isinstance(key, bool):  # bool is an int; keep it distinct and explicit
        return b"b" + (b"1" if key else b"0")
    if isinstance(key, int):
        return b"i" + key.to_bytes(16, "little", signed=True)
    if isinstance(key, str):
        data = key.encode()
        return b"s" + len(data).to_bytes(4, "little") + data
    if isinstance(key, bytes):
        return b"y" + len(key).to_bytes(4, "little") + key
    raise TypeError(f"extra hash keys must be int, str or bytes, got {type(key).__name__}")


def hash_block(
    parent_hash: int, token_ids: Sequence[int], extra_keys: Iterable[ExtraKey] = ()
) -> int:
    """Hash of one block given its parent's hash (``NONE_HASH`` for the first block)."""
    h = xxhash.xxh64(seed=HASH_SEED)
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for key in extra_keys:
        h.update(_encode_extra(key))
    return h.intdigest()


def root_hash(cache_salt: str | None) -> int:
    """The parent hash of a request's first block: ``NONE_HASH``, or one derived from its
    ``cache_salt`` (vLLM's): every block of a salted request then hashes apart from the same
    tokens under another salt or none, so the prefix cache (and cache-aware routing) shares
    KV only between requests that carry the same salt."""
    if cache_salt is None:
        return NONE_HASH
    return hash_block(NONE_HASH, [], ("cache_salt", cache_salt))


def hash_block_tokens(
    token_ids: Sequence[int],
    block_size: int,
    parent_hash: int = NONE_HASH,
    extra_keys: Sequence[Sequence[ExtraKey]] | None = None,
) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids``.

    ``extra_keys[i]`` (if given) are mixed into block ``i``. A trailing partial
    block gets no hash: its KV can still change, so it is never shared.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[int] = []
    for i in range(len(token_ids) // block_size):
        extra = extra_keys[i] if extra_keys is not None and i < len(extra_keys) else ()
        parent_hash = hash_block(parent_hash, token_ids[i * block_size : (i + 1) * block_size], extra)
        hashes.append(parent_hash)
    return hashes


def prefix_key(block_hashes: Sequence[int], num_blocks: int) -> int:
    """The routing key of a request: the chained hash of its first ``num_blocks`` blocks.

    Chained hashes already cover every earlier block, so the key is the hash of
    the last block in the window. A prompt shorter than one block has no full
    block; it keys on ``NONE_HASH``.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not block_hashes:
        return NONE_HASH
    return block_hashes[min(num_blocks, len(block_hashes)) - 1]


def hash_bytes(data: bytes | memoryview, seed: int = HASH_SEED) -> int:
    """64-bit content hash (image contents, KV checksums)."""
    return xxhash.xxh64_intdigest(data, seed=seed)
