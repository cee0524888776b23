"""The one registry of ``SPLITSERVE_*`` environment variables.

Each variable is declared once here with its type, default and meaning; code reads it through
``env.NAME.get()`` and never through ``os.environ`` directly, so ``python -m splitserve.env``
lists every knob. Imports nothing of ours and nothing heavy (no torch, no Ray).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

_REGISTRY: dict[str, EnvVar] = {}


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One environment variable: read on every ``get()`` (tests change them at run time)."""

    name: str
    """Full variable name, ``SPLITSERVE_*``."""
    kind: type
    """``str``, ``int``, ``float`` or ``bool`` (``1/true/yes/on`` are true)."""
    default: T
    """Value when the variable is unset or empty."""
    doc: str
    """What it changes."""
    secret: bool = False
    """Holds a credential: never forwarded to Ray actors, never printed (``main`` masks it)."""

    def __post_init__(self) -> None:
        if self.name in _REGISTRY:
            raise ValueError(f"environment variable {self.name} declared twice")
        _REGISTRY[self.name] = self

    def raw(self) -> str:
        """The variable's text, stripped ('' when unset)."""
        return os.environ.get(self.name, "").strip()

    def take(self) -> str:
        """The variable's text, removed from this process's environment, so that no process
        started later (Ray's raylet, its workers) inherits it ('' when unset)."""
        text = self.raw()
        os.environ.pop(self.name, None)
        return text

    def get(self) -> T:
        """The typed value; a malformed value raises ValueError naming the variable."""
        text = self.raw()
        if not text:
            return self.default
        try:
            if self.kind is bool:
                return text.lower() in ("1", "true", "yes", "on")  # type: ignore[return-value]
            return self.kind(text)  # type: ignore[no-any-return]
        except ValueError as exc:
            raise ValueError(f"{self.name}={text!r} is not a valid {self.kind.__name__}") from exc


def registry() -> dict[str, EnvVar]:
    """Every declared variable by name."""
    return dict(_REGISTRY)


SPLITSERVE_KERNELS = EnvVar(
    "SPLITSERVE_KERNELS", str, "",
    "force the kernel backend: 'triton', 'native' (the references with the C kernels of "
    "kernels/native.py: the CPU default) or 'torch' (the pure references); default: by device",
)
SPLITSERVE_KERNEL_CHECKS = EnvVar(
    "SPLITSERVE_KERNEL_CHECKS", bool, True,
    "kernel launchers read index tensors back to validate them (0 turns the checks off)",
)
SPLITSERVE_KV_ZERO_COPY = EnvVar(
    "SPLITSERVE_KV_ZERO_COPY", bool, True,
    "KV pulls between block-major caches go straight into the destination blocks (0 stages "
    "them through a gather and a scatter, the path before zero-copy: for A/B benchmarks)",
)
SPLITSERVE_KV_LAYERWISE = EnvVar(
    "SPLITSERVE_KV_LAYERWISE", int, 0,
    "layer-wise KV streaming (prefill workers): > 0 offers a request's KV when its last prompt "
    "chunk is scheduled and serves it in groups of this many layers as the forward computes "
    "them, so the pull overlaps the prefill; 0 (default) offers after the first token",
)
SPLITSERVE_CPU_LINEAR = EnvVar(
    "SPLITSERVE_CPU_LINEAR", str, "",
    "float32 projections on CPU: 'dense' keeps F.linear for every weight, 'onednn' oneDNN-packed weights for every weight (default: the native kernel for weights of at "
    "most 2^24 values in an AVX-512 build, 2^18 in an AVX2 one, oneDNN above)"
)
SPLITSERVE_PRUNE_LAST_LAYER = EnvVar(
    "SPLITSERVE_PRUNE_LAST_LAYER", bool, True,
    "in a step with prompt rows, the last layer computes attention, MLP and final norm only "
    "for the rows whose logits are sampled (every row still stores its K/V); 0 computes "
    "every row, as before (for A/B benchmarks)",
)
SPLITSERVE_CPU_INT4 = EnvVar(
    "SPLITSERVE_CPU_INT4", str, "",
    "int4 weights on CPU: 'native' (default where the native kernels build: integer dot "
    "products against int8-quantized activations, every row count) or 'torch' (torch's "
    "packed int4 kernel with bf16 activations, expanded for many rows)",
)
SPLITSERVE_CPU_QUANT_EXPAND = EnvVar(
    "SPLITSERVE_CPU_QUANT_EXPAND", str, "",
    "calls of many rows through int4/int8 weights on CPU: 'dequant' (the weight expanded for "
    "the call, bf16 GEMM), 'packed' (torch's packed kernels, as for few rows); default: "
    "dequant where the processor has native bf16",
)
SPLITSERVE_CPU_QUANT_EXPAND_MIN_ROWS = EnvVar(
    "SPLITSERVE_CPU_QUANT_EXPAND_MIN_ROWS", int, 128,
    "rows from which a quantized CPU matmul expands its weight (Q8_0 in groups: 4x this)",
)
SPLITSERVE_MALLOC_TUNING = EnvVar(
    "SPLITSERVE_MALLOC_TUNING", bool, True,
    "a CPU engine keeps freed memory in glibc's heap (mallopt, kernels/allocator.py); 0 keeps "
    "glibc's defaults",
)
SPLITSERVE_KV_HUGE_PAGES = EnvVar(
    "SPLITSERVE_KV_HUGE_PAGES", bool, True,
    "the host KV pool is a mapping advised for transparent huge pages (kernels/kv_cache.py: "
    "faster same-host UCX reads, fewer TLB misses; slower to commit at start); 0 keeps "
    "ordinary pages",
)
SPLITSERVE_NATIVE_KERNELS = EnvVar(
    "SPLITSERVE_NATIVE_KERNELS", bool, True,
    "CPU kernels built at first use with the host C compiler (kernels/native.py; paged decode "
    "attention read in place); 0 keeps the pure-torch references",
)
SPLITSERVE_NATIVE_CFLAGS = EnvVar(
    "SPLITSERVE_NATIVE_CFLAGS", str, "",
    "extra flags for building the native CPU kernels, after '-O3 -march=native' (e.g. "
    "'-march=haswell' builds the AVX2 code on an AVX-512 machine)",
)
SPLITSERVE_CACHE_DIR = EnvVar(
    "SPLITSERVE_CACHE_DIR", str, "",
    "folder of splitserve's on-disk caches (GGUF tokenizers, built CPU kernels); default "
    "$XDG_CACHE_HOME/splitserve, else ~/.cache/splitserve",
)
SPLITSERVE_TOKENIZER_CACHE = EnvVar(
    "SPLITSERVE_TOKENIZER_CACHE", bool, True,
    "keep the tokenizers transformers builds from GGUF files, and the tokenizer class it "
    "chooses for a model folder, in SPLITSERVE_CACHE_DIR (0: build each in every process)",
)
SPLITSERVE_TEST_KV_SEND_DELAY_S = EnvVar(
    "SPLITSERVE_TEST_KV_SEND_DELAY_S", float, 0.0,
    "tests only: delay each KV send by this many seconds so a peer can die mid-transfer",
)
SPLITSERVE_TEST_KV_STREAM_HOLD_S = EnvVar(
    "SPLITSERVE_TEST_KV_STREAM_HOLD_S", float, 0.0,
    "tests only: a streamed prefill forward pauses after its first layer group until a read "
    "of it was sent (at most this many seconds), so overlap is observable on any machine",
)
SPLITSERVE_TEST_ALLOW_NO_REDIS = EnvVar(
    "SPLITSERVE_TEST_ALLOW_NO_REDIS", bool, False,
    "tests only: skip the Redis tests when redis-server is missing (by default they fail: "
    "`make setup` installs it)",
)
SPLITSERVE_KV_EVENT_LOG_SIZE = EnvVar(
    "SPLITSERVE_KV_EVENT_LOG_SIZE", int, 100_000,
    "KV events each worker keeps for the routers; a router that falls further behind resyncs "
    "from a snapshot of the worker's cached block hashes",
)

SPLITSERVE_CHECK_INTEGRITY = EnvVar(
    "SPLITSERVE_CHECK_INTEGRITY", bool, False,
    "engines run check_integrity() (block pool, KV manager, leases) each time they fall idle "
    "and log and count a failure",
)
SPLITSERVE_GC_FREEZE = EnvVar(
    "SPLITSERVE_GC_FREEZE", bool, True,
    "serving processes (cluster workers, `serve --single-engine`) collect "
    "and freeze their heap once the engine is built (gc.freeze), so the garbage collector's "
    "full passes no longer walk the model's objects: one took 73-104 ms over a loaded engine, "
    "a stall of every running request's next token; the offline LLM freezes the heap while "
    "it steps its engine and unfreezes it after (~1% of a 64-request run); 0 leaves the "
    "collector as it is",
)
SPLITSERVE_GRAMMAR_COMPILE_TIMEOUT_S = EnvVar(
    "SPLITSERVE_GRAMMAR_COMPILE_TIMEOUT_S", float, 10.0,
    "structured outputs: a grammar that takes longer to compile is refused (400)",
)
SPLITSERVE_GRAMMAR_COMPILE_MAX_MEMORY_MB = EnvVar(
    "SPLITSERVE_GRAMMAR_COMPILE_MAX_MEMORY_MB", int, 1024,
    "structured outputs: a grammar whose compile needs more memory (MiB) is refused (400)",
)


SPLITSERVE_API_KEY = EnvVar(
    "SPLITSERVE_API_KEY", str, "",
    "API key `splitserve serve` requires (Bearer / gRPC metadata); read once and removed from "
    "the environment before Ray starts. Prefer it (or --api-key-file) to --api-key, which shows "
    "in process lists",
    secret=True,
)
SPLITSERVE_API_KEY_FILE = EnvVar(
    "SPLITSERVE_API_KEY_FILE", str, "",
    "file holding the API key (first line), same as `serve --api-key-file` (container secrets)",
)


def cache_dir() -> Path | None:
    """The folder of splitserve's on-disk caches (``SPLITSERVE_CACHE_DIR``), or None when no
    home directory can be found."""
    base = SPLITSERVE_CACHE_DIR.get()
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    try:
        return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "splitserve"
    except (RuntimeError, KeyError):
        return None


def forwardable() -> dict[str, str]:
    """The ``SPLITSERVE_*`` variables set here that may travel to other processes (Ray actors'
    runtime env): the declared ones that are set, except those declared ``secret``."""
    return {var.name: var.raw() for var in _REGISTRY.values() if not var.secret and var.raw()}


def secret_names() -> frozenset[str]:
    """The names of the variables declared ``secret`` (never passed to another process)."""
    return frozenset(var.name for var in _REGISTRY.values() if var.secret)


def scrub_secrets() -> None:
    """Remove every ``secret`` variable from this process's environment (before starting
    processes that must not inherit it: a local Ray)."""
    for var in _REGISTRY.values():
        if var.secret:
            var.take()


def main() -> None:
    """Print every variable, its default and meaning."""
    for var in _REGISTRY.values():
        state = "(set)" if var.secret and var.raw() else ""
        print(f"{var.name} ({var.kind.__name__}, default {var.default!r}){state}: {var.doc}")


if __name__ == "__main__":
    main()
