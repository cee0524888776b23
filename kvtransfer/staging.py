"""Reusable staging buffers: the contiguous copies KV blocks travel in.

Owns ``StagingPool``. A fresh 256 MB buffer costs more in page faults than the transfer
itself on small hosts, so buffers handed back after a send or a scatter are kept (up to a
byte budget) and reused for the next read of the same size. Thread-safe: the serving side
takes buffers on the transport's thread pool and gives them back on its event loop.

It must not decide when a buffer is free: callers give a buffer back only when no copy
or transfer uses it any more.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch

DEFAULT_MAX_CACHED_BYTES = 1 << 30
"""Bytes of idle buffers kept for reuse; beyond it, given-back buffers are dropped."""


class StagingPool:
    """Idle staging buffers by (nbytes, device), reused whole and viewed as needed."""

    def __init__(self, max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES) -> None:
        if max_cached_bytes < 0:
            raise ValueError(f"max_cached_bytes must be >= 0, got {max_cached_bytes}")
        self.max_cached_bytes = max_cached_bytes
        self._idle: defaultdict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A contiguous tensor of ``shape``; its contents are garbage."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        key = (nbytes, str(device))
        with self._lock:
            idle = self._idle.get(key)
            raw = idle.pop() if idle else None
            if raw is not None:
                self._cached_bytes -= nbytes
        if raw is None:
            raw = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return raw.view(dtype).view(shape)

    def give(self, tensor: torch.Tensor) -> None:
        """Hand back a tensor from ``take``; kept if the budget allows."""
        raw = tensor.reshape(-1).view(torch.uint8)
        key = (raw.numel(), str(raw.device))
        with self._lock:
            if self._cached_bytes + raw.numel() > self.max_cached_bytes:
                return
            self._idle[key].append(raw)
            self._cached_bytes += raw.numel()

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._cached_bytes
