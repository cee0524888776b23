"""Request placement: prefix index, load tracker, policies (DualMap), simulator.

Imports only ``splitserve`` vocabulary: never ``roles``, ``kernels`` or torch.

Module map (one box, one file):

- ``schema``: ``RouterConfig``, ``RouteRequest``, ``Placement``, ``Migration``, ``InstanceRole``
- ``errors``: ``NoInstanceAvailable``, ``UnknownPolicyError``, ``UnknownInstanceError``,
  ``TraceFormatError``
- ``prefix_index``: ``PrefixIndex`` (block hash -> instances, from KV events)
- ``load_tracker``: ``LoadTracker`` / ``InstanceLoad`` (queued tokens, rates, KV use)
- ``hash_ring``: ``HashRing``, ``DualHashRing`` (consistent hashing, virtual nodes)
- ``least_pressure``: lazy heap picking the decode instance with least KV pressure
- ``view``: ``ClusterView``, the read-only state a policy decides on
- ``policies``: ``Policy`` ABC, the five policies, ``create_policy``
- ``router``: ``Router``, the facade the cluster calls
- ``cost_model``, ``trace``, ``simulator``, ``bench``: the simulator and its benchmark
  (numpy; imported on demand, not by this package)
"""

from splitserve.router.errors import (
    NoInstanceAvailable,
    TraceFormatError,
    UnknownInstanceError,
    UnknownPolicyError,
)
from splitserve.router.policies import Policy, available_policies, create_policy, register_policy
from splitserve.router.router import Router
from splitserve.router.schema import InstanceRole, Migration, Placement, RouterConfig, RouteRequest

__all__ = [
    "InstanceRole",
    "Migration",
    "NoInstanceAvailable",
    "Placement",
    "Policy",
    "RouteRequest",
    "Router",
    "RouterConfig",
    "TraceFormatError",
    "UnknownInstanceError",
    "UnknownPolicyError",
    "available_policies",
    "create_policy",
    "register_policy",
]
