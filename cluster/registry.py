"""Worker registry: who is serving, where, in which state, and how loaded.

Owns: ``WorkerRecord`` (one worker's address book entry and its latest load, plain
data that serializes to msgpack or JSON), the ``Registry`` interface, and its two
stores: ``InMemoryRegistry`` (one process; the launcher wraps it in a Ray actor) and
``RedisRegistry`` (shared by several frontends and routers through ``redis-server``).

Liveness: a worker registers, then calls ``heartbeat`` every ``heartbeat_interval_s``
with its load. A worker whose last heartbeat is older than ``heartbeat_timeout_s`` is
dead: ``list`` and ``get`` leave it out (``include_expired=True`` still shows it for a
while, so a health check can re-place its requests), and its next ``heartbeat`` raises
``UnknownWorkerError`` so that it registers again. On Redis, liveness is judged by the
server's clock (``TIME`` inside Lua scripts), so frontends with skewed clocks agree.

Must not: import Ray or torch, pickle anything onto the wire, or decide placement
(the router does); it stores what workers report and nothing else.

Usage::

    registry = create_registry("redis://localhost:6379/0", heartbeat_timeout_s=5.0)
    registry.register(WorkerRecord("d0", "decode", "decode-0", "splitserve", node, addr, eid))
    registry.heartbeat("d0", num_running=3, kv_usage=0.25)   # every heartbeat_interval_s
    for record in registry.list(role="decode"): ...
    registry.deregister("d0"); registry.close()
"""

from __future__ import annotations

import abc
import builtins
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

import msgpack

from splitserve.errors import ConfigError, SplitserveError

if TYPE_CHECKING:  # redis-py is imported only by RedisRegistry (the cluster extra ships it)
    import redis

ROLES: tuple[str, ...] = ("encode", "prefill", "decode")
"""Roles a worker may register under."""

STATUSES: tuple[str, ...] = ("starting", "ready", "draining")
"""Worker states: loading its model, taking requests, finishing its requests before removal."""

LOAD_FIELDS: tuple[str, ...] = (
    "num_waiting",
    "num_running",
    "kv_usage",
    "num_free_blocks",
    "queued_prefill_tokens",
)
"""Record fields a heartbeat may refresh."""

RECORD_VERSION = 1
"""Version of the serialized ``WorkerRecord`` (bumped when fields change meaning)."""


class UnknownWorkerError(SplitserveError, LookupError):
    """The registry holds no live record of the worker: it must register again.

    ``expired`` is True when the record existed but missed the heartbeat timeout.
    """

    def __init__(self, message: str, worker_id: str = "", expired: bool = False) -> None:
        # Only ``message`` goes to args, so the error survives pickling through Ray.
        super().__init__(message)
        self.worker_id = worker_id
        self.expired = expired


class RegistryError(SplitserveError):
    """The registry's store failed (Redis went away, timed out or answered an error)."""


# --------------------------------------------------------------------------- the record


@dataclass(slots=True)
class WorkerRecord:
    """One worker as the registry knows it; times are wall-clock seconds (Unix epoch)."""

    worker_id: str
    """Unique id of the worker (stable across heartbeats, new after a restart)."""
    role: str
    """``encode``, ``prefill`` or ``decode``."""
    actor_name: str
    """Ray actor name, to get a handle with ``ray.get_actor(actor_name, namespace)``."""
    namespace: str
    """Ray namespace of the actor."""
    node_id: str
    """Ray node id the worker runs on."""
    kv_address: str
    """Address of the worker's KV transport endpoint (e.g. ``ucx://10.0.0.5:13337``)."""
    engine_id: str
    """Id of the worker's engine in KV transfer metadata."""
    status: str = "starting"
    """``starting``, ``ready`` or ``draining``."""
    started_at: float = field(default_factory=time.time)
    """When the worker started."""
    last_heartbeat: float = 0.0
    """When the registry last heard from the worker (set by the registry)."""
    num_waiting: int = 0
    """Requests queued in the worker's scheduler."""
    num_running: int = 0
    """Requests running in the worker's engine."""
    kv_usage: float = 0.0
    """Fraction of the worker's KV blocks in use, 0..1."""
    num_free_blocks: int = 0
    """KV blocks free for new requests."""
    queued_prefill_tokens: int = 0
    """Prompt tokens waiting to be prefilled."""

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerRecord:
        """Inverse of ``to_dict``; unknown keys (from a newer writer) are ignored."""
        return cls(**{name: data[name] for name in _FIELD_TYPES if name in data})

    def to_msgpack(self) -> bytes:
        """Versioned msgpack bytes: ``[RECORD_VERSION, to_dict()]``."""
        return msgpack.packb([RECORD_VERSION, self.to_dict()], use_bin_type=True)

    @classmethod
    def from_msgpack(cls, payload: bytes) -> WorkerRecord:
        """Inverse of ``to_msgpack``; refuses other record versions."""
        version, data = msgpack.unpackb(payload, raw=False)
        if version != RECORD_VERSION:
            raise ValueError(f"WorkerRecord version {version} is not {RECORD_VERSION}")
        return cls.from_dict(data)

    def is_expired(self, now: float, heartbeat_timeout_s: float) -> bool:
        """Whether the last heartbeat is older than the timeout at ``now``."""
        return now - self.last_heartbeat > heartbeat_timeout_s


_CASTS: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float}
_FIELD_TYPES: dict[str, Callable[[str], Any]] = {
    f.name: _CASTS[str(f.type)] for f in dataclasses.fields(WorkerRecord)
}


def _check_load(load: dict[str, Any]) -> dict[str, int | float]:
    for name, value in load.items():
        if name not in LOAD_FIELDS:
            raise ValueError(f"heartbeat: unknown load field {name!r}; known: {LOAD_FIELDS}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"heartbeat: {name} must be a number, got {value!r}")
    return {name: _FIELD_TYPES[name](value) for name, value in load.items()}


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")


# --------------------------------------------------------------------------- the interface


class Registry(abc.ABC):
    """Worker records with heartbeats and expiry. All methods are safe from any thread.

    Mutators: ``register`` (insert or replace the record, heartbeat now), ``heartbeat``
    (refresh time and load), ``set_status``, ``deregister``. Readers never mutate except
    to forget records long dead (``retain_expired_s`` after their timeout). A store that
    fails (Redis gone) raises ``RegistryError``; bad arguments raise ``ValueError``.
    """

    def __init__(self, heartbeat_timeout_s: float, retain_expired_s: float | None = None) -> None:
        if not heartbeat_timeout_s > 0:
            raise ConfigError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        if retain_expired_s is not None and retain_expired_s < 0:
            raise ConfigError(f"retain_expired_s must be >= 0, got {retain_expired_s}")
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self.retain_expired_s = (
            max(30.0, 6 * self.heartbeat_timeout_s)
            if retain_expired_s is None
            else retain_expired_s
        )
        """How long an expired record stays visible to ``list(include_expired=True)``."""

    @abc.abstractmethod
    def register(self, record: WorkerRecord) -> WorkerRecord:
        """Insert or replace ``record`` (heartbeat = now); returns the stored record."""

    @abc.abstractmethod
    def heartbeat(self, worker_id: str, **load: int | float) -> None:
        """Refresh the worker's heartbeat and load fields (``LOAD_FIELDS``).

        Raises ``UnknownWorkerError`` when the worker is unknown or expired.
        """

    @abc.abstractmethod
    def set_status(self, worker_id: str, status: str) -> None:
        """Set a live worker's status; ``UnknownWorkerError`` when unknown or expired."""

    @abc.abstractmethod
    def deregister(self, worker_id: str) -> bool:
        """Forget the worker; returns whether a record (live or expired) existed."""

    @abc.abstractmethod
    def get(self, worker_id: str, include_expired: bool = False) -> WorkerRecord | None:
        """The worker's record, or None when unknown (or expired, unless asked for)."""

    @abc.abstractmethod
    def list(
        self, role: str | None = None, include_expired: bool = False
    ) -> builtins.list[WorkerRecord]:
        """Live records (of one role, if given), sorted by worker_id; with
        ``include_expired`` also the recently expired ones (check ``is_expired``)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the registry is unusable afterwards."""

    def is_expired(self, record: WorkerRecord, now: float | None = None) -> bool:
        """Whether ``record`` missed this registry's heartbeat timeout at ``now`` (default:
        this host's clock; Redis records carry the Redis server's clock)."""
        return record.is_expired(time.time() if now is None else now, self.heartbeat_timeout_s)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_role(role: str | None) -> None:
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def _unknown(worker_id: str, expired: bool) -> UnknownWorkerError:
    why = "missed its heartbeat timeout" if expired else "is not registered"
    return UnknownWorkerError(
        f"worker {worker_id!r} {why}; register it again", worker_id, expired=expired
    )


# --------------------------------------------------------------------------- in memory


class InMemoryRegistry(Registry):
    """Records in a dict behind a lock; ``clock`` (wall-clock seconds) is injectable."""

    def __init__(
        self,
        heartbeat_timeout_s: float,
        retain_expired_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(heartbeat_timeout_s, retain_expired_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, WorkerRecord] = {}

    def register(self, record: WorkerRecord) -> WorkerRecord:
        stored = dataclasses.replace(record, last_heartbeat=self._clock())
        with self._lock:
            self._records[record.worker_id] = stored
        return dataclasses.replace(stored)

    def heartbeat(self, worker_id: str, **load: int | float) -> None:
        values = _check_load(load)
        with self._lock:
            record = self._live(worker_id)
            for name, value in values.items():
                setattr(record, name, value)
            record.last_heartbeat = self._clock()

    def set_status(self, worker_id: str, status: str) -> None:
        _check_status(status)
        with self._lock:
            self._live(worker_id).status = status

    def deregister(self, worker_id: str) -> bool:
        with self._lock:
            return self._records.pop(worker_id, None) is not None

    def get(self, worker_id: str, include_expired: bool = False) -> WorkerRecord | None:
        with self._lock:
            self._forget_dead()
            record = self._records.get(worker_id)
            if record is None or (not include_expired and self._expired(record)):
                return None
            return dataclasses.replace(record)

    def list(
        self, role: str | None = None, include_expired: bool = False
    ) -> builtins.list[WorkerRecord]:
        _check_role(role)
        with self._lock:
            self._forget_dead()
            records = [
                dataclasses.replace(r)
                for r in self._records.values()
                if (role is None or r.role == role) and (include_expired or not self._expired(r))
            ]
        return sorted(records, key=lambda r: r.worker_id)

    def _expired(self, record: WorkerRecord) -> bool:
        return record.is_expired(self._clock(), self.heartbeat_timeout_s)

    def _live(self, worker_id: str) -> WorkerRecord:
        """The live record (caller holds the lock); raises ``UnknownWorkerError``."""
        record = self._records.get(worker_id)
        if record is None or self._expired(record):
            raise _unknown(worker_id, expired=record is not None)
        return record

    def _forget_dead(self) -> None:
        horizon = self._clock() - self.heartbeat_timeout_s - self.retain_expired_s
        for worker_id in [w for w, r in self._records.items() if r.last_heartbeat < horizon]:
            del self._records[worker_id]


# --------------------------------------------------------------------------- Redis

_NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: record hash, role index of encode, prefill, decode; ARGV: ttl ms, role, worker id,
# field/value pairs. Replaces the hash, moves the id to its role's index, returns now.
_REGISTER_LUA = (
    _NOW_LUA
    + """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('HSET', KEYS[1], 'last_heartbeat', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
for i = 2, 4 do redis.call('SREM', KEYS[i], ARGV[3]) end
local index = {encode = KEYS[2], prefill = KEYS[3], decode = KEYS[4]}
redis.call('SADD', index[ARGV[2]], ARGV[3])
return string.format('%.6f', now)
"""
)

# KEYS: record hash; ARGV: ttl ms, heartbeat timeout s, 1 to refresh the heartbeat, pairs.
# Returns -1 when unknown, -2 when expired, 1 when updated.
_UPDATE_LUA = (
    _NOW_LUA
    + """
local last = redis.call('HGET', KEYS[1], 'last_heartbeat')
if not last then return -1 end
if now - tonumber(last) > tonumber(ARGV[2]) then return -2 end
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'last_heartbeat', string.format('%.6f', now))
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 1
"""
)


def check_registry_url(url: str) -> str:
    """``url`` if it is ``memory`` or ``redis[s]://[user:password@]host[:port][/db]``.

    Raises ``ValueError`` saying what is wrong with the shape (nothing is contacted).
    """
    if url == "memory":
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"must be 'memory' or redis://host:port[/db]; got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"port must be a number in 1..65535; got {url!r}") from None
    if not parts.hostname or port == 0:
        raise ValueError(f"needs a host (and port), as in redis://host:6379/0; got {url!r}")
    db = parts.path.lstrip("/")
    if db and not db.isdigit() or parts.query or parts.fragment:
        raise ValueError(f"database must be a number, as in redis://host:6379/0; got {url!r}")
    return url


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _store_errors(
    method: Callable[Concatenate[RedisRegistry, _P], _T],
) -> Callable[Concatenate[RedisRegistry, _P], _T]:
    """Turn redis-py's errors into ``RegistryError`` naming the (password-free) URL."""

    @functools.wraps(method)
    def wrapper(self: RedisRegistry, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        from redis.exceptions import RedisError

        try:
            return method(self, *args, **kwargs)
        except RedisError as err:
            raise RegistryError(
                f"registry: Redis at {_redact(self.url)} failed in {method.__name__}: {err}"
            ) from err

    return wrapper


class RedisRegistry(Registry):
    """Records in ``redis-server``: a hash per worker whose key expires with the worker.

    Keys (``prefix`` defaults to ``splitserve``, use the Ray namespace to share a server):
    ``{prefix}:worker:{worker_id}`` (hash of the record's fields; TTL = heartbeat timeout
    + ``retain_expired_s``, renewed by each heartbeat) and ``{prefix}:role:{role}`` (set
    of worker ids; entries whose hash has expired are removed when listed).
    """

    def __init__(
        self,
        url: str,
        heartbeat_timeout_s: float,
        retain_expired_s: float | None = None,
        prefix: str = "splitserve",
        connect_timeout_s: float = 2.0,
    ) -> None:
        super().__init__(heartbeat_timeout_s, retain_expired_s)
        self.url = url
        self.prefix = prefix
        self._client = _connect(url, connect_timeout_s)
        self._register = self._client.register_script(_REGISTER_LUA)
        self._update = self._client.register_script(_UPDATE_LUA)

    # ---- mutators

    @_store_errors
    def register(self, record: WorkerRecord) -> WorkerRecord:
        fields = record.to_dict()
        del fields["last_heartbeat"]
        pairs = [str(item) for pair in fields.items() for item in _flat(pair)]
        keys = [self._worker_key(record.worker_id), *(self._role_key(r) for r in ROLES)]
        now = self._register(keys=keys, args=[self._ttl_ms, record.role, record.worker_id, *pairs])
        return dataclasses.replace(record, last_heartbeat=float(now))

    @_store_errors
    def heartbeat(self, worker_id: str, **load: int | float) -> None:
        self._apply(worker_id, _check_load(load), refresh=True)

    @_store_errors
    def set_status(self, worker_id: str, status: str) -> None:
        _check_status(status)
        self._apply(worker_id, {"status": status}, refresh=False)

    @_store_errors
    def deregister(self, worker_id: str) -> bool:
        pipe = self._client.pipeline()
        pipe.delete(self._worker_key(worker_id))
        for role in ROLES:
            pipe.srem(self._role_key(role), worker_id)
        return bool(pipe.execute()[0])

    # ---- readers

    @_store_errors
    def get(self, worker_id: str, include_expired: bool = False) -> WorkerRecord | None:
        pipe = self._client.pipeline()
        pipe.time()
        pipe.hgetall(self._worker_key(worker_id))
        (seconds, micros), raw = pipe.execute()
        if not raw:
            return None
        record = _decode(raw)
        expired = record.is_expired(seconds + micros / 1e6, self.heartbeat_timeout_s)
        return record if include_expired or not expired else None

    @_store_errors
    def list(
        self, role: str | None = None, include_expired: bool = False
    ) -> builtins.list[WorkerRecord]:
        _check_role(role)
        ids = self._indexed_ids([role] if role else list(ROLES))
        pipe = self._client.pipeline()
        pipe.time()
        for _, worker_id in ids:
            pipe.hgetall(self._worker_key(worker_id))
        (seconds, micros), *raws = pipe.execute()
        now = seconds + micros / 1e6
        self._drop_stale([key for key, raw in zip(ids, raws, strict=True) if not raw])
        records = [_decode(raw) for raw in raws if raw]
        if not include_expired:
            records = [r for r in records if not r.is_expired(now, self.heartbeat_timeout_s)]
        return sorted(records, key=lambda r: r.worker_id)

    def close(self) -> None:
        self._client.close()

    # ---- helpers

    @property
    def _ttl_ms(self) -> int:
        return max(1, int((self.heartbeat_timeout_s + self.retain_expired_s) * 1000))

    def _worker_key(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def _role_key(self, role: str) -> str:
        return f"{self.prefix}:role:{role}"

    def _apply(self, worker_id: str, values: dict[str, Any], refresh: bool) -> None:
        pairs = [str(item) for pair in values.items() for item in pair]
        args = [self._ttl_ms, repr(self.heartbeat_timeout_s), "1" if refresh else "0", *pairs]
        result = self._update(keys=[self._worker_key(worker_id)], args=args)
        if result < 0:
            raise _unknown(worker_id, expired=result == -2)

    def _indexed_ids(self, roles: builtins.list[str]) -> builtins.list[tuple[str, str]]:
        pipe = self._client.pipeline()
        for role in roles:
            pipe.smembers(self._role_key(role))
        return [
            (role, worker_id)
            for role, members in zip(roles, pipe.execute(), strict=True)
            for worker_id in sorted(members)
        ]

    def _drop_stale(self, stale: builtins.list[tuple[str, str]]) -> None:
        """Remove index entries whose record key has expired."""
        if not stale:
            return
        pipe = self._client.pipeline()
        for role, worker_id in stale:
            pipe.srem(self._role_key(role), worker_id)
        pipe.execute()


def _flat(pair: tuple[str, Any]) -> Iterator[Any]:
    name, value = pair
    yield name
    yield repr(value) if isinstance(value, float) else value


def _decode(raw: dict[str, str]) -> WorkerRecord:
    return WorkerRecord.from_dict(
        {name: _FIELD_TYPES[name](value) for name, value in raw.items() if name in _FIELD_TYPES}
    )


def _connect(url: str, connect_timeout_s: float) -> redis.Redis:
    """A client for a server that has answered PING within ``connect_timeout_s``.

    An unreachable, silent or non-Redis server is a ``ConfigError`` naming the setting.
    """
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    _probe(url, connect_timeout_s)
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=max(connect_timeout_s, 5.0),
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
    )


def _probe(url: str, timeout_s: float) -> None:
    """PING once, no retries, every socket operation bounded by ``timeout_s``."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    probe = redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries=0),
    )
    try:
        probe.ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as err:
        raise ConfigError(
            f"registry: cannot reach Redis at {_redact(url)} ({err}); start redis-server "
            "there or set registry: memory"
        ) from None
    except redis.exceptions.RedisError as err:
        raise ConfigError(
            f"registry: the server at {_redact(url)} did not answer PING as Redis does "
            f"({type(err).__name__}: {err})"
        ) from None
    finally:
        probe.close()


def create_registry(
    url: str,
    heartbeat_timeout_s: float,
    retain_expired_s: float | None = None,
    prefix: str = "splitserve",
) -> Registry:
    """``memory`` -> ``InMemoryRegistry``; ``redis://...`` -> ``RedisRegistry`` (connects now).

    A malformed URL or an unreachable server is a ``ConfigError`` naming the ``registry``
    setting and the URL.
    """
    try:
        check_registry_url(url)
    except ValueError as err:
        raise ConfigError(f"registry: {err}") from None
    if url == "memory":
        return InMemoryRegistry(heartbeat_timeout_s, retain_expired_s)
    return RedisRegistry(url, heartbeat_timeout_s, retain_expired_s, prefix=prefix)
