"""Cluster configuration: ``ClusterConfig``, the pydantic model of ``cluster.yaml``.

Owns: the schema of a cluster's YAML file (model, roles with replica counts and Ray
resources per worker, SLOs, router, registry, Ray connection, KV transfer), its
validation, and YAML load and dump. Every invalid value becomes one
``ClusterConfigError`` (a ``splitserve.errors.ConfigError``) whose message names the
file and the dotted setting, e.g. ``cluster.yaml: roles.decode.replicas: must be >= 1``.

Must not: start or connect to anything (Ray, Redis, workers) or import torch or Ray.
The launcher turns a ``ClusterConfig`` into actors; this module only says what is asked.

Usage::

    config = ClusterConfig.from_yaml("deploy/cluster-laptop-cpu.yaml")
    config = ClusterConfig.local(prefill=1, decode=2, registry="redis://localhost:6379")
    config.roles.decode.replicas, config.router.policy, config.registry.url
    print(config.to_yaml())
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from splitserve.cluster.registry import check_registry_url
from splitserve.errors import ConfigError

ROLE_NAMES: tuple[str, ...] = ("encode", "prefill", "decode")
"""The worker roles a cluster may run, in request order."""

RoleName = Literal["encode", "prefill", "decode"]
PolicyName = Literal["round_robin", "least_loaded", "prefix_affinity", "kv_overlap_cost", "dualmap"]

LOCAL_CPU_WORKER_RESOURCE = "splitserve_cpu_worker"
"""Custom Ray resource that ``ClusterConfig.local`` gives the local node and asks per worker."""


class ClusterConfigError(ConfigError):
    """A cluster configuration is invalid; ``settings`` lists the dotted paths at fault."""

    def __init__(self, message: str, settings: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.settings = settings


class _SettingError(ValueError):
    """Raised inside validators: ``setting`` is the dotted path relative to the model."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


# --------------------------------------------------------------------------- byte sizes

_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "ki": 1 << 10, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mi": 1 << 20, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gi": 1 << 30, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "ti": 1 << 40, "tib": 1 << 40,
}  # fmt: skip
_BYTE_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_byte_size(value: Any) -> Any:
    """``"2GiB"``, ``"512 MiB"``, ``"1.5GB"`` or an int -> bytes (int); other input passes through.

    Binary units (KiB, MiB, GiB, TiB, or Ki/Mi/Gi/Ti) are powers of 1024; KB, MB, GB, TB
    powers of 1000, as in Kubernetes quantities.
    """
    if not isinstance(value, str):
        return value
    match = _BYTE_SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"not a byte size: {value!r} (use an integer or e.g. '2GiB', '512MiB')")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


ByteSize = Annotated[int, BeforeValidator(parse_byte_size), Field(ge=1)]


# --------------------------------------------------------------------------- sections


class _Section(BaseModel):
    """A YAML section: unknown keys are errors, NaN and infinity are not numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RoleConfig(_Section):
    """How many workers of one role to run and what each asks of Ray."""

    replicas: int = Field(default=1, ge=0)
    """Workers started with the cluster (and the target of ``cluster.scale``)."""
    min_replicas: int | None = Field(default=None, ge=0)
    """Floor for scaling down (None: the role's own floor, 1 for decode and 0 otherwise)."""
    max_replicas: int | None = Field(default=None, ge=0)
    """Ceiling for scaling up (None: no ceiling but the Ray cluster's resources)."""
    num_cpus: float = Field(default=0.0, ge=0)
    """Ray CPUs reserved per worker; 0 lets several workers share a 2-core machine."""
    num_gpus: float = Field(default=0.0, ge=0)
    """Ray GPUs per worker (fractions share a GPU); 0 runs the worker on the CPU."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per worker, e.g. ``{splitserve_cpu_worker: 1}`` in CPU mode."""
    max_restarts: int = Field(default=3, ge=-1)
    """Times Ray restarts a crashed worker actor (-1: forever, 0: never)."""
    replace_failed: bool = True
    """Start a new worker when one is declared dead, so the role keeps ``replicas`` live."""
    max_num_seqs: int = Field(default=128, ge=1)
    """Most requests running at once in one worker's engine."""
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    """Token budget of one engine step (prefill chunks + decodes)."""
    num_threads: int | None = Field(default=None, ge=1)
    """Torch intra-op threads per worker on CPU (None: torch's default)."""
    speculative_config: dict[str, Any] | None = None
    """Draft-free speculative decoding on this role's workers (decode only), vLLM's keys:
    ``{method: ngram | suffix, num_speculative_tokens: k, ...}``; None: off."""

    @field_validator("speculative_config")
    @classmethod
    def _check_speculative(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from splitserve.roles.engine.speculative import SpeculativeConfig, SpeculativeConfigError

        try:
            spec = SpeculativeConfig.from_any(value)
        except SpeculativeConfigError as e:
            raise _SettingError(e.setting, e.reason) from e
        return None if spec is None else spec.to_dict()

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return _check_custom_resources(resources)

    @model_validator(mode="after")
    def _check_bounds(self) -> RoleConfig:
        if self.min_replicas is not None and self.replicas < self.min_replicas:
            raise _SettingError(
                "replicas", f"must be >= min_replicas ({self.min_replicas}); got {self.replicas}"
            )
        if self.max_replicas is not None and self.replicas > self.max_replicas:
            raise _SettingError(
                "replicas", f"must be <= max_replicas ({self.max_replicas}); got {self.replicas}"
            )
        return self


def _check_custom_resources(resources: dict[str, float]) -> dict[str, float]:
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise _SettingError(name, "a built-in Ray resource; use num_cpus / num_gpus instead")
        if amount < 0 or not math.isfinite(amount):
            raise _SettingError(name, f"must be a finite amount >= 0; got {amount}")
    return resources


class RolesConfig(_Section):
    """One ``RoleConfig`` per known role; any other key is an unknown role."""

    encode: RoleConfig = Field(default_factory=lambda: RoleConfig(replicas=0))
    """Vision-tower workers (multimodal models only); 0 for text-only models."""
    prefill: RoleConfig = Field(default_factory=lambda: RoleConfig())
    """Workers that compute prompts' KV and first tokens."""
    decode: RoleConfig = Field(default_factory=lambda: RoleConfig())
    """Workers that pull KV from prefill and generate the remaining tokens."""

    def items(self) -> Iterator[tuple[str, RoleConfig]]:
        """(role name, its config) in request order."""
        for name in ROLE_NAMES:
            yield name, getattr(self, name)


class SloConfig(_Section):
    """Latency targets the router places against and the benchmark counts goodput by."""

    ttft_ms: float = Field(default=5000.0, gt=0)
    """Time to first token target, in milliseconds."""
    tpot_ms: float = Field(default=200.0, gt=0)
    """Time per output token target (after the first), in milliseconds."""


class RoutingConfig(_Section):
    """Placement policy and its knobs (maps onto ``splitserve.router``'s ``RouterConfig``)."""

    policy: PolicyName = "dualmap"
    """Prefill placement: round_robin, least_loaded, prefix_affinity, kv_overlap_cost, dualmap."""
    local_prefill_max_tokens: Annotated[int, Field(ge=0)] | Literal["all"] = 63
    """Prompts whose uncached part has at most this many tokens prefill on the decode worker
    (conditional disaggregation); 0: only a fully cached prompt skips the prefill role;
    ``all``: every prompt prefills on its decode worker (colocated: no prefill role needed)."""
    prefix_key_blocks: int = Field(default=2, ge=1)
    """DualMap's routing key: the chained hash of a request's first this-many blocks."""
    virtual_nodes: int = Field(default=160, ge=1)
    """Points per worker on each consistent-hash ring."""
    rebalance_interval_s: float = Field(default=0.1, gt=0)
    """How often queued (not started) requests are moved off hotspots."""
    max_migrations_per_rebalance: int = Field(default=64, ge=0)
    """Most queued requests one rebalance moves."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "local_prefill_threshold" in data:
            raise _SettingError(
                "local_prefill_threshold",
                "renamed to local_prefill_max_tokens, an inclusive bound: set "
                "local_prefill_max_tokens = local_prefill_threshold - 1",
            )
        return data


class RegistryConfig(_Section):
    """Where workers register and heartbeat; a bare string is shorthand for ``url``."""

    url: str = "memory"
    """``memory`` (in the driver, default) or ``redis://host:port[/db]`` (shared by frontends)."""
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    """How often each worker refreshes its record and load."""
    heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    """A worker silent this long is dead: dropped from the registry, its requests re-placed."""

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, data: Any) -> Any:
        return {"url": data} if isinstance(data, str) else data

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return check_registry_url(url)

    @model_validator(mode="after")
    def _check_timeout(self) -> RegistryConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise _SettingError(
                "heartbeat_timeout_s",
                f"must exceed heartbeat_interval_s ({self.heartbeat_interval_s}); "
                f"got {self.heartbeat_timeout_s}",
            )
        return self


class RayConfig(_Section):
    """Which Ray cluster runs the workers."""

    address: str | None = None
    """Existing cluster (``auto``, ``host:6379`` or ``ray://host:10001``); None starts one."""
    namespace: str = "splitserve"
    """Ray namespace of the cluster's named actors (and the Redis registry's key prefix)."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of a locally started Ray (None: Ray detects them)."""
    num_gpus: int | None = Field(default=None, ge=0)
    """GPUs of a locally started Ray (None: Ray detects them)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom resources of a locally started Ray node, e.g. ``{splitserve_cpu_worker: 4}``."""
    include_dashboard: bool = False
    """Start Ray's dashboard with a local cluster."""

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return _check_custom_resources(resources)

    @model_validator(mode="after")
    def _local_only(self) -> RayConfig:
        if self.address is None:
            return self
        for name in ("num_cpus", "num_gpus", "resources"):
            if getattr(self, name):
                raise _SettingError(
                    name,
                    "only for a local start (ray.address is null); an existing Ray cluster's "
                    f"resources are set where it was started (ray.address is {self.address!r})",
                )
        return self


class KvTransferConfig(_Section):
    """How decode workers pull KV blocks from prefill workers."""

    transport: Literal["ucx", "loopback"] = "ucx"
    """``ucx`` between processes and nodes; ``loopback`` only inside one process (tests)."""
    lease_s: float = Field(default=30.0, gt=0)
    """How long prefill holds a request's blocks for decode without a renewal."""
    timeout_s: float = Field(default=10.0, gt=0)
    """Longest wait for one pull of a request's KV (and for each read of it) on a decode
    worker; past it the pull fails, the lease is aborted and the decode worker computes the
    prompt itself."""
    host: str | None = None
    """Address a worker's KV listener binds and advertises to readers (UCX's data sockets
    stay on its interface); None: the node's Ray IP. ``0.0.0.0`` listens on every interface
    (docs/serving.md, "KV transfer"); each transfer's secret guards the reads."""


# --------------------------------------------------------------------------- the config


class PlannerSettings(_Section):
    """The SLO planner (``splitserve.router.planner``): flips workers between prefill and
    decode as the request mix shifts (``cluster/planning.py`` applies its decisions)."""

    enabled: bool = False
    """Off by default: the cluster keeps the roles it was started with."""
    interval_s: float = Field(default=5.0, gt=0)
    """How often the planner decides."""
    window_s: float = Field(default=30.0, gt=0)
    """Metrics window (arrival rate, prompt and output lengths)."""
    cooldown_s: float = Field(default=20.0, ge=0)
    """No action within this long of the previous one."""
    hysteresis: float = Field(default=0.1, ge=0, lt=1)
    """A flip must lower the bottleneck role's pressure by at least this fraction."""
    min_pressure: float = Field(default=0.3, ge=0)
    """Below this bottleneck pressure the split does not matter: no flips."""
    target_prefill_utilization: float = Field(default=0.7, gt=0, le=1)
    """Prefill busy fraction the planner sizes for."""
    tpot_target_fraction: float = Field(default=0.8, gt=0, le=1)
    """Decode is sized so a step takes at most this fraction of ``slo.tpot_ms``."""
    cost_model: str | None = None
    """A built-in profile name or a cost-model JSON file (``bench/router_calibrate.py``);
    None: the built-in profile for this deployment (``cpu`` without GPUs, else ``a100``)."""
    drain_timeout_s: float = Field(default=60.0, gt=0)
    """Longest wait for a flipped worker's requests before it is stopped anyway."""


class ClusterConfig(_Section):
    """A whole disaggregated cluster: what ``splitserve serve --config`` and ``Cluster`` start."""

    model: str | None = None
    """Hugging Face folder or .gguf file; None serves the embedded SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """A Hugging Face tokenizer folder used instead of the model's own (every worker and the
    frontend; ``EngineConfig.tokenizer``); None: the model's."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Activations, float weights and KV dtype; ``auto``: bfloat16 where the processor has
    it natively (each worker checks), float32 otherwise."""
    quantization: Literal["auto", "none", "int4", "int8", "w4a8"] = "auto"
    """Weight format (``EngineConfig.quantization``): ``auto`` (default) serves a GGUF's own
    codes (Q4 / Q5 / Q6_K / Q3_K / Q2_K / Q8_0 / IQ4) and a folder's floats; ``none``
    dequantizes a GGUF to float (the reference that equals transformers)."""
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    """KV cache elements (``EngineConfig.kv_cache_dtype``): ``auto`` is ``dtype``; fp8
    halves the KV memory. Every worker uses the same, so KV moves between them unchanged."""
    int4_group_size: Literal[32, 64, 128, 256] = 32
    """Columns per scale when quantizing float weights to int4."""
    block_size: int = Field(default=16, ge=1)
    """Tokens per KV block, a power of two; the same on every worker."""
    kv_cache_memory_bytes: ByteSize = 1 << 30
    """KV cache per worker: bytes or a size such as ``2GiB``."""
    max_model_len: int | None = Field(default=None, ge=2)
    """Longest sequence (prompt + output); None: the model's context length."""
    enable_prefix_caching: bool = True
    """Reuse KV of shared prompt prefixes on prefill and decode workers."""
    max_n: int = Field(default=16, ge=1)
    """Most samples (``n``) one request may ask for; more is refused before placement (HTTP
    400 / gRPC INVALID_ARGUMENT naming ``n``): each sample is a sequence a worker must run."""
    seed: int = 0
    """Seed for requests that give none (same meaning as ``EngineConfig.seed``)."""
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    """Every worker's (``EngineConfig.scheduling_policy``): ``priority`` admits requests by
    their ``priority`` (lower first) and preempts the lowest first; under ``fcfs`` a
    request's non-zero priority is refused before placement."""
    pooler_config: dict[str, Any] | None = None
    """Embeddings' pooler on every worker (``EngineConfig.pooler_config``): ``{pooling_type:
    LAST | MEAN | CLS, normalize: bool}``; None: the model's own."""
    roles: RolesConfig = Field(default_factory=lambda: RolesConfig())
    """Workers per role: encode, prefill, decode."""
    slo: SloConfig = Field(default_factory=lambda: SloConfig())
    """Latency targets."""
    router: RoutingConfig = Field(default_factory=lambda: RoutingConfig())
    """Placement policy and conditional disaggregation."""
    registry: RegistryConfig = Field(default_factory=lambda: RegistryConfig())
    """Worker registry (in memory or Redis) and heartbeats."""
    ray: RayConfig = Field(default_factory=lambda: RayConfig())
    """Ray cluster to run on."""
    runtime: Literal["ray", "processes"] = "ray"
    """What runs the workers: ``ray`` actors (a local Ray or ``ray.address``'s cluster, GPUs,
    several nodes), or ``processes``: child processes of the cluster's own process on this
    machine, no Ray started (each worker still has a process of its own, is replaced when it
    dies and has its requests replayed). ``splitserve serve`` picks ``processes`` for its
    one-machine colocated default, where Ray's daemons and threads took 5-7% of a core from
    the engine (docs/serving.md); CPU workers only, no ``ray.address``, no custom resources."""
    kv_transfer: KvTransferConfig = Field(default_factory=lambda: KvTransferConfig())
    """KV transport between prefill and decode."""
    planner: PlannerSettings = Field(default_factory=lambda: PlannerSettings())
    """SLO planner: prefill/decode role flips at runtime (off by default)."""

    @field_validator("pooler_config")
    @classmethod
    def _check_pooler(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from splitserve.roles.engine.config import check_pooler_config

        try:
            return check_pooler_config(value)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("pooler_config").lstrip(": ")) from e

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, block_size: int) -> int:
        if block_size & (block_size - 1):
            raise ValueError(f"must be a power of two; got {block_size}")
        return block_size

    @model_validator(mode="after")
    def _check_roles(self) -> ClusterConfig:
        _check_decode(self.roles.decode)
        _check_speculation(self)
        _check_prefill(self)
        _check_encode(self)
        _check_local_resources(self)
        _check_planner(self)
        _check_runtime(self)
        return self

    # ---- construction

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        """Load and validate a YAML file; errors name the file and the setting."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ClusterConfigError(f"{path}: cannot read the cluster config: {err}") from None
        return cls.from_yaml_text(text, source=str(path))

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "<yaml>") -> ClusterConfig:
        """Validate YAML text; ``source`` names it in errors."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ClusterConfigError(f"{source}: invalid YAML: {_yaml_problem(err)}") from None
        return cls.from_dict({} if data is None else data, source=source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>") -> ClusterConfig:
        """Validate a mapping (parsed YAML or JSON); ``source`` names it in errors."""
        if not isinstance(data, Mapping):
            raise ClusterConfigError(f"{source}: expected a mapping of settings, got {data!r}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise _to_config_error(err, source) from None

    @classmethod
    def local(
        cls,
        prefill: int = 1,
        decode: int = 1,
        encode: int = 0,
        model: str | None = None,
        **overrides: Any,
    ) -> ClusterConfig:
        """A CPU-mode cluster on this machine (2 cores are enough): a local Ray with 2 CPUs,
        workers reserving no CPU but one ``splitserve_cpu_worker`` slot each (the node has
        ``max(8, 2 * workers)``), the machine's cores split between the workers' torch
        threads, float32, UCX over TCP. ``prefill=0`` sets ``router.local_prefill_max_tokens``
        to ``all`` (decode workers prefill every prompt). ``overrides`` are settings merged in,
        nested as in YAML (``slo={"ttft_ms": 500}``, ``registry="redis://..."``); a
        ``resources`` mapping replaces the default one (``{}`` for a Ray started without it).
        """
        total = encode + prefill + decode
        # one machine's cores split between the workers (torch would give each all of them)
        threads = max(1, (os.cpu_count() or 1) // max(total, 1))
        # no prefill worker: each decode worker prefills its own prompts (colocated)
        router: dict[str, Any] = {"local_prefill_max_tokens": "all"} if prefill == 0 else {}
        role = {"num_cpus": 0, "num_gpus": 0, "resources": {LOCAL_CPU_WORKER_RESOURCE: 1},
                "num_threads": threads}
        base: dict[str, Any] = {
            "model": model,
            "dtype": "float32",
            "roles": {
                "encode": {**role, "replicas": encode},
                "prefill": {**role, "replicas": prefill},
                "decode": {**role, "replicas": decode},
            },
            "router": router,
            "ray": {
                "num_cpus": 2,
                "num_gpus": 0,
                # Room to scale up to twice the initial workers (and at least 8) on this node.
                "resources": {LOCAL_CPU_WORKER_RESOURCE: max(8, 2 * total)},
            },
        }
        return cls.from_dict(_deep_merge(base, overrides), source="ClusterConfig.local()")

    # ---- output and views

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text that ``from_yaml`` reads back equal; written to ``path`` when given."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def role(self, name: str) -> RoleConfig:
        """The config of one role; an unknown name is a ``ClusterConfigError``."""
        if name not in ROLE_NAMES:
            raise ClusterConfigError(
                f"unknown role {name!r}; known roles: {', '.join(ROLE_NAMES)}", (f"roles.{name}",)
            )
        return getattr(self.roles, name)

    def replica_bounds(self, name: str) -> tuple[int, int | None]:
        """(floor, ceiling or None) that ``cluster.scale(name, n)`` must respect."""
        role = self.role(name)
        floor = role.min_replicas if role.min_replicas is not None else _role_floor(name)
        return floor, role.max_replicas

    @property
    def colocated(self) -> bool:
        """Whether decode workers prefill every prompt themselves (no prefill role in use)."""
        return self.router.local_prefill_max_tokens == "all"

    @property
    def is_multimodal(self) -> bool:
        """Whether the model is LLaVA-style (its config.json has a vision tower)."""
        return is_multimodal_model(self.model)


# --------------------------------------------------------------------------- cross checks


def _role_floor(name: str) -> int:
    return 1 if name == "decode" else 0


def _check_speculation(config: ClusterConfig) -> None:
    for name in ("encode", "prefill"):
        if getattr(config.roles, name).speculative_config is not None:
            raise _SettingError(
                f"roles.{name}.speculative_config",
                "speculative decoding runs on decode workers (a prefill worker hands the "
                "request off after its first token); set it under roles.decode",
            )


def _check_decode(decode: RoleConfig) -> None:
    if decode.replicas < 1:
        raise _SettingError(
            "roles.decode.replicas",
            f"must be >= 1 (every request decodes on a decode worker); got {decode.replicas}",
        )
    if decode.min_replicas is not None and decode.min_replicas < 1:
        raise _SettingError("roles.decode.min_replicas", f"must be >= 1; got {decode.min_replicas}")


def _check_prefill(config: ClusterConfig) -> None:
    """Zero prefill workers is only valid when decode prefills every prompt locally."""
    if config.roles.prefill.replicas > 0:
        return
    local_max = config.router.local_prefill_max_tokens
    if local_max == "all":
        return
    if config.max_model_len is not None and local_max >= config.max_model_len - 1:
        return  # the longest valid prompt (max_model_len - 1 tokens) prefills on decode
    raise _SettingError(
        "roles.prefill.replicas",
        "must be >= 1 unless every prompt prefills on decode (router.local_prefill_max_tokens: "
        "all, or max_model_len set and "
        f"router.local_prefill_max_tokens >= max_model_len - 1; now {local_max} and "
        f"{config.max_model_len}); got 0",
    )


def _check_planner(config: ClusterConfig) -> None:
    if config.planner.enabled and config.colocated:
        raise _SettingError(
            "planner.enabled",
            "the planner moves workers between prefill and decode, but "
            "router.local_prefill_max_tokens is all (decode workers prefill every prompt); "
            "give it a token count or turn the planner off",
        )


def _check_encode(config: ClusterConfig) -> None:
    if config.roles.encode.replicas == 0 and is_multimodal_model(config.model):
        raise _SettingError(
            "roles.encode.replicas",
            f"must be >= 1 for the multimodal model {config.model!r} (it has a vision tower); "
            "got 0",
        )


def _check_runtime(config: ClusterConfig) -> None:
    """``runtime: processes`` runs CPU workers on this machine: nothing Ray would place."""
    if config.runtime != "processes":
        return
    if config.ray.address is not None:
        raise _SettingError("runtime", "processes runs workers on this machine without Ray; "
                            f"ray.address ({config.ray.address!r}) needs runtime: ray")
    for name, role in config.roles.items():
        if role.num_gpus > 0:
            raise _SettingError(f"roles.{name}.num_gpus", "runtime: processes has no GPU "
                                f"placement (Ray's); got {role.num_gpus:g}, use runtime: ray")


def _check_local_resources(config: ClusterConfig) -> None:
    """A locally started Ray must hold the initial replicas' custom resources and GPUs."""
    ray = config.ray
    if ray.address is not None:
        return
    for resource, amount in _initial_needs(config).items():
        have = ray.num_gpus if resource == "num_gpus" else ray.resources.get(resource)
        if have is not None and amount > have + 1e-9:
            setting = "ray.num_gpus" if resource == "num_gpus" else f"ray.resources.{resource}"
            raise _SettingError(
                setting, f"{have:g} is less than the roles' initial replicas need ({amount:g})"
            )


def _initial_needs(config: ClusterConfig) -> dict[str, float]:
    """Custom resources (and ``num_gpus``) the initial replicas ask of a local Ray."""
    needs: dict[str, float] = {"num_gpus": 0.0}
    for name, role in config.roles.items():
        if role.replicas == 0:
            continue  # scaling it up later is checked against the running Ray by the launcher
        for resource, amount in role.resources.items():
            if resource not in config.ray.resources:
                raise _SettingError(
                    f"roles.{name}.resources.{resource}",
                    f"a local Ray start provides no {resource!r}; add it to ray.resources",
                )
            needs[resource] = needs.get(resource, 0.0) + amount * role.replicas
        needs["num_gpus"] += role.num_gpus * role.replicas
    return needs


def is_multimodal_model(model: str | None) -> bool:
    """True when ``model`` is a local Hugging Face folder whose config.json has a vision tower.

    Unknown or remote models count as text-only (the worker's model loader decides later).
    """
    if model is None:
        return False
    config_file = Path(model) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    model_type = str(config.get("model_type", ""))
    return "vision_config" in config or model_type.startswith("llava")


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Sections merge key by key; a ``resources`` mapping is a value and replaces the base's."""
    merged = dict(base)
    for key, value in overrides.items():
        if key != "resources" and isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------- error messages


def _to_config_error(err: ValidationError, source: str) -> ClusterConfigError:
    problems = [_describe(detail) for detail in err.errors()]
    settings = tuple(setting for setting, _ in problems)
    lines = [f"{setting}: {reason}" if setting else reason for setting, reason in problems]
    if len(lines) == 1:
        return ClusterConfigError(f"{source}: {lines[0]}", settings)
    listing = "\n".join(f"  {line}" for line in lines)
    return ClusterConfigError(f"{source}: {len(lines)} invalid settings:\n{listing}", settings)


def _describe(detail: Mapping[str, Any]) -> tuple[str, str]:
    """(dotted setting, reason) for one pydantic error."""
    loc = [str(part) for part in detail["loc"]]
    ctx = detail.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, _SettingError):
        return ".".join([*loc, cause.setting]), cause.reason
    setting = ".".join(loc)
    kind = detail["type"]
    if kind == "extra_forbidden":
        return setting, _unknown_key(loc)
    if kind == "missing":
        return setting, "required"
    reason = _reason(kind, ctx, detail["msg"])
    value = detail.get("input")
    if kind != "value_error" and (isinstance(value, str | int | float | bool) or value is None):
        reason += f"; got {value!r}"
    return setting, reason


def _reason(kind: str, ctx: Mapping[str, Any], msg: str) -> str:
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx[key]:g}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a mapping of settings"
    if kind == "value_error":
        return str(ctx.get("error", msg))
    return msg[0].lower() + msg[1:] if msg else kind


def _unknown_key(loc: list[str]) -> str:
    known = _known_keys(loc[:-1])
    if loc[:-1] == ["roles"]:
        return f"unknown role; known roles: {', '.join(ROLE_NAMES)}"
    hint = f"; known settings here: {', '.join(known)}" if known else ""
    return f"unknown setting{hint}"


def _known_keys(parent: list[str]) -> list[str]:
    """Field names of the section at ``parent`` (empty when it is not a section)."""
    model: type[BaseModel] = ClusterConfig
    for part in parent:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
