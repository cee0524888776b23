"""The encode role's work: images -> embeddings, cached by content hash.

Owns ``EmbeddingCache`` (LRU under a byte budget, keyed by image content hash, with
hit / miss counters) and ``ImageEncoder`` (decode -> hash -> cache lookup ->
preprocess + vision tower + projector for the misses, as one batch). The encode
worker runs one built from the vision weights alone (``ImageEncoder.from_folder``);
the monolithic engine builds one from the weights it already loaded. It must not
know about prompts, KV caches or requests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from splitserve.errors import InvalidRequestError
from splitserve.roles.models.config import LlavaConfig
from splitserve.roles.models.image import ImageProcessor, image_hash, load_image
from splitserve.roles.models.llava import LlavaImageEncoder

Tensor = torch.Tensor
DEFAULT_CACHE_BYTES = 256 << 20


class EmbeddingCache:
    """Image embeddings by content hash; least recently used entries leave first once the
    bytes held exceed ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Tensor] = OrderedDict()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, content_hash: int) -> bool:
        return content_hash in self._entries

    def get(self, content_hash: int) -> Tensor | None:
        """The cached embeddings (counted as a hit) or None (counted as a miss)."""
        embeds = self._entries.get(content_hash)
        if embeds is None:
            self.num_misses += 1
            return None
        self._entries.move_to_end(content_hash)
        self.num_hits += 1
        return embeds

    def clear(self) -> None:
        self._entries.clear()
        self.num_bytes = 0

    def put(self, content_hash: int, embeds: Tensor) -> None:
        """Insert (an entry larger than the whole budget is not kept)."""
        size = embeds.numel() * embeds.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(content_hash, None)
        if old is not None:
            self.num_bytes -= old.numel() * old.element_size()
        self._entries[content_hash] = embeds
        self.num_bytes += size
        while self.num_bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.numel() * evicted.element_size()


class ImageEncoder:
    """Images (any form ``load_image`` takes) -> (content hash, embeddings [T, H]) each.

    Thread-safe: the encode worker calls it from a thread pool.
    """

    def __init__(
        self,
        model: LlavaImageEncoder,
        processor: ImageProcessor,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.model = model
        self.processor = processor
        self.cache = EmbeddingCache(cache_bytes)
        self._lock = threading.Lock()

    @classmethod
    def from_weights(
        cls,
        cfg: LlavaConfig,
        weights: dict[str, Tensor],
        folder: str | Path | None,
        device: torch.device,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> ImageEncoder:
        processor = ImageProcessor.for_model(folder, cfg.vision)
        return cls(LlavaImageEncoder(cfg, weights, device), processor, cache_bytes)

    @classmethod
    def from_folder(
        cls,
        model: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> ImageEncoder:
        """Load only the vision tower + projector of a LLaVA folder."""
        from splitserve.roles.models.loader import load_vision_weights

        config, weights = load_vision_weights(model, dtype)
        assert config.llava is not None
        return cls.from_weights(config.llava, weights, model, torch.device(device), cache_bytes)

    @property
    def num_image_tokens(self) -> int:
        return self.model.num_image_tokens

    def encode(
        self, images: list[Any], field: str = "multi_modal_data.image"
    ) -> list[tuple[int, Tensor]]:
        """(content hash, embeddings [num_image_tokens, H]) per image, in order.

        Malformed input raises InvalidRequestError naming ``field`` and the image's index
        before any image is encoded.
        """
        decoded = []
        for i, item in enumerate(images):
            try:
                decoded.append(load_image(item, field))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"image {i}: {e.message}", field=field) from e
        hashes = [image_hash(im) for im in decoded]
        with self._lock:
            found = {h: self.cache.get(h) for h in dict.fromkeys(hashes)}
            missing = [h for h, cached in found.items() if cached is None]
            if missing:
                by_hash = dict(zip(hashes, decoded, strict=True))
                batch = self.model.encode(self.processor([by_hash[h] for h in missing]))
                for h, rows in zip(missing, batch, strict=True):
                    found[h] = rows.clone()  # its own storage: the cache counts its bytes
                    self.cache.put(h, found[h])  # type: ignore[arg-type]
        return [(h, found[h]) for h in hashes]  # type: ignore[misc]

    def stats(self) -> dict[str, int]:
        c = self.cache
        return {
            "encoder_cache_hits": c.num_hits,
            "encoder_cache_misses": c.num_misses,
            "encoder_cache_entries": len(c),
            "encoder_cache_bytes": c.num_bytes,
        }
