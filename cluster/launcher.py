"""Launcher: Ray start/connect and the role workers' life (start, wait ready, stop).

Owns the runtime side of the cluster: with ``runtime: ray``, whether this process started
Ray (and so stops it), placement groups per worker, actor options (resources, restarts, no
task retries); with ``runtime: processes``, the workers' child processes
(``cluster/process_workers.py``, no Ray started); and turning a failed start into a
ConfigError that names the setting. It does not route or
track requests (request_path.py does) nor decide membership (membership.py does).
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from splitserve import env
from splitserve.cluster import process_workers
from splitserve.cluster.config import ClusterConfig
from splitserve.errors import ConfigError
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.workers import WORKER_CLASSES

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0


@dataclass
class WorkerHandle:
    """A started worker: its actor, its placement group and what it reported at start."""

    worker_id: str
    role: str
    actor: Any
    """Its Ray actor handle, or a ``ProcessActor`` (``runtime: processes``)."""
    placement_group: PlacementGroup | None
    info: dict[str, Any] = field(default_factory=dict)
    healthy: bool = True
    draining: bool = False
    suspect_since: float | None = None
    """When the worker first missed a heartbeat (None: answering)."""


class Launcher:
    """Starts and stops role workers (Ray actors, or child processes with ``runtime:
    processes``) as a ClusterConfig describes them."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.started_ray = False
        self.processes = config.runtime == "processes"
        """Workers are child processes of this one; no Ray is started or joined."""
        self._ids = itertools.count()
        if not self.processes:
            self._start_ray()

    # ------------------------------------------------------------------ Ray

    def _start_ray(self) -> None:
        ray_cfg = self.config.ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if ray.is_initialized():
            return
        job_env = _job_env_vars()  # a `ray job submit` driver: its actors get these already
        # UCX_/TRITON_ settings and our declared, non-secret SPLITSERVE_* variables travel to
        # the actors; a secret (the API key) never does (env.py marks it).
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(("UCX_", "TRITON_"))}
        forwarded.update(env.forwardable())
        env_vars = {k: v for k, v in forwarded.items() if k not in job_env}
        runtime_env = {"env_vars": env_vars}
        if not ray_cfg.address:
            env.scrub_secrets()  # the raylet we start (and so every actor) inherits os.environ
        if ray_cfg.address:
            ray.init(address=ray_cfg.address, namespace=ray_cfg.namespace, runtime_env=runtime_env,
                     log_to_driver=False)
        else:
            # "local": a new Ray of our own, never whichever `ray start` cluster this machine
            # ran last (Ray's default for no address; RAY_ADDRESS still wins)
            ray.init(address="local", num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus,
                     resources=dict(ray_cfg.resources), namespace=ray_cfg.namespace,
                     include_dashboard=ray_cfg.include_dashboard, runtime_env=runtime_env,
                     log_to_driver=False, _system_config=_local_system_config())
            self.started_ray = True

    def check_resources(self, counts: dict[str, int]) -> None:
        """Fail early, naming the setting, when the Ray cluster cannot hold the workers."""
        if self.processes:
            return  # child processes ask no scheduler for room
        available = ray.cluster_resources()
        needed: dict[str, float] = {}
        for role, n in counts.items():
            for key, amount in self._bundle(role).items():
                needed[key] = needed.get(key, 0.0) + amount * n
        for key, amount in needed.items():
            if available.get(key, 0.0) + 1e-9 < amount:
                raise ConfigError(
                    f"roles: the workers need {amount:g} of Ray resource {key!r} but the Ray "
                    f"cluster has {available.get(key, 0.0):g} (check roles.*.num_cpus / "
                    "num_gpus / resources and ray.resources)"
                )

    def _bundle(self, role: str) -> dict[str, float]:
        rc = self.config.role(role)
        bundle = {k: v for k, v in rc.resources.items() if v > 0}
        if rc.num_cpus > 0:
            bundle["CPU"] = rc.num_cpus
        if rc.num_gpus > 0:
            bundle["GPU"] = rc.num_gpus
        return bundle

    # ------------------------------------------------------------------ workers

    def engine_config(self, role: str) -> EngineConfig:
        cfg, rc = self.config, self.config.role(role)
        return EngineConfig(
            model=cfg.model, tokenizer=cfg.tokenizer, dtype=cfg.dtype, device="cuda" if rc.num_gpus > 0 else "cpu",
            quantization=cfg.quantization, int4_group_size=cfg.int4_group_size,
            kv_cache_dtype=cfg.kv_cache_dtype, block_size=cfg.block_size, kv_cache_memory_bytes=int(cfg.kv_cache_memory_bytes),
            max_model_len=cfg.max_model_len, enable_prefix_caching=cfg.enable_prefix_caching,
            max_num_seqs=rc.max_num_seqs, max_num_batched_tokens=rc.max_num_batched_tokens,
            seed=cfg.seed, num_threads=rc.num_threads, speculative_config=rc.speculative_config,
            max_n=cfg.max_n, pooler_config=cfg.pooler_config,
            scheduling_policy=cfg.scheduling_policy,
        )

    def start(self, role: str) -> WorkerHandle:
        """Create one worker actor (not yet waited for: see ``wait_ready``)."""
        if role not in WORKER_CLASSES:
            raise ConfigError(f"roles.{role}: this role has no worker implementation yet")
        worker_id = f"{role}-{next(self._ids)}-{os.urandom(2).hex()}"
        if self.processes:
            args, kwargs = self.worker_args(role, worker_id)
            return WorkerHandle(worker_id, role, process_workers.spawn(
                role, worker_id, args, kwargs, env=_child_env()), None)
        rc = self.config.role(role)
        bundle = self._bundle(role)
        pg = placement_group([bundle], strategy="PACK") if bundle else None
        options: dict[str, Any] = {
            "name": f"splitserve-{worker_id}",
            "num_cpus": rc.num_cpus,
            "num_gpus": rc.num_gpus,
            "resources": dict(rc.resources),
            "max_restarts": rc.max_restarts,
            "max_task_retries": 0,  # a request is replayed by the cluster, never re-run blindly
            "max_concurrency": 1000,
        }
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, 0)
        actor_cls = ray.remote(WORKER_CLASSES[role]).options(**options)
        args, kwargs = self.worker_args(role, worker_id)
        actor = actor_cls.remote(*args, **kwargs)
        return WorkerHandle(worker_id, role, actor, pg)

    def worker_args(self, role: str, worker_id: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The worker class's constructor arguments for one ``role`` worker."""
        kv = self.config.kv_transfer
        args = (worker_id, self.engine_config(role), kv.transport, kv.lease_s)
        # every worker has a process of its own (a Ray actor, or a child): it freezes its heap
        # once its model is built (SPLITSERVE_GC_FREEZE)
        return args, {"host": kv.host, "transfer_timeout_s": kv.timeout_s, "freeze_heap": True}

    def wait_ready(self, handles: list[WorkerHandle], timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait for every worker's engine to load; on failure stop them and raise ConfigError."""
        refs = [h.actor.info.remote() for h in handles]
        try:
            if self.processes:  # a child that cannot build its worker says why here
                for h in handles:
                    h.actor.wait_started(timeout_s)
            infos = self.get(refs, timeout_s)
        except Exception as e:
            for h in handles:
                self.stop(h)
            raise ConfigError(f"model: workers failed to start: {_root_cause(e)}") from e
        for h, info in zip(handles, infos, strict=True):
            h.info = info

    def stop(self, handle: WorkerHandle) -> None:
        try:
            self.get(handle.actor.shutdown.remote(), 10)
        except Exception:  # noqa: BLE001 - it may be dead already
            pass
        self.release(handle)

    def get(self, call: Any, timeout: float) -> Any:
        """Wait (blocking, off the event loop) for a call to a worker of this runtime, or a
        list of them."""
        if self.processes:
            return process_workers.get(call, timeout=timeout)
        return ray.get(call, timeout=timeout)

    def release(self, handle: WorkerHandle) -> None:
        """Kill a (dead or dying) worker's actor for good and give its placement group's
        resources back, without waiting on it. A dead worker whose group stayed would hold its
        bundle forever, and after a few replacements no new worker could be placed. A child
        process is killed and reaped."""
        if isinstance(handle.actor, process_workers.ProcessActor):
            handle.actor.kill()
            return
        if not ray.is_initialized():  # (ray.kill would start a Ray of its own otherwise)
            return
        try:
            ray.kill(handle.actor, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        if handle.placement_group is not None:
            try:
                remove_placement_group(handle.placement_group)
            except Exception:  # noqa: BLE001 - already removed
                pass
            handle.placement_group = None

    def shutdown(self) -> None:
        if self.started_ray and ray.is_initialized():
            ray.shutdown()


def _local_system_config() -> dict[str, Any]:
    """Ray settings of a Ray this process starts (``RAY_<name>`` in the environment still
    wins for each):

    * ``worker_niceness`` 0: its workers are this server's engines, so they run at the
      driver's priority (Ray's default niceness 15 lets any other process on the machine
      take their CPU first, which a single-engine server is never made to suffer);
    * ``prestart_worker_first_driver`` off: Ray would start an idle worker process for the
      driver's tasks, and we run none (every worker is an actor with a process of its
      own); idle, it took ~1% of a core on a 2-core machine.
    """
    wanted: dict[str, Any] = {"worker_niceness": 0, "prestart_worker_first_driver": False}
    return {k: v for k, v in wanted.items() if f"RAY_{k}" not in os.environ}


def _child_env() -> dict[str, str]:
    """A process worker's environment: this process's, less every ``secret`` variable (the
    API key stays with the server, as it stays out of Ray's workers)."""
    secrets = env.secret_names()
    return {k: v for k, v in os.environ.items() if k not in secrets}


def _job_env_vars() -> dict[str, str]:
    """Env vars of the runtime env of the Ray job this driver runs in (``ray job submit
    --runtime-env-json``); Ray refuses a driver runtime env that sets any of them again."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "") or "{}")
        return dict((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, TypeError, AttributeError):
        return {}


def _root_cause(error: BaseException) -> str:
    """The innermost error message of a Ray actor failure."""
    cause = getattr(error, "cause", None) or error.__cause__
    seen = 0
    while cause is not None and seen < 5:
        error, cause, seen = cause, getattr(cause, "cause", None) or cause.__cause__, seen + 1
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
