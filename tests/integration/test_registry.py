"""Worker registry: in memory and on a real redis-server (started here on a free port).

The same behaviour is asserted on both stores: register, heartbeat, status, expiry after
the heartbeat timeout (1 s here), re-registration, deregistration. Redis-only: two
registry handles see the same workers, expired index entries are cleaned up, and an
unreachable server fails fast with a ConfigError naming the setting.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from splitserve import env
from splitserve.cluster.registry import (
    InMemoryRegistry,
    RedisRegistry,
    Registry,
    RegistryError,
    UnknownWorkerError,
    WorkerRecord,
    create_registry,
)
from splitserve.errors import ConfigError

TIMEOUT_S = 1.0
"""Heartbeat timeout of the registries under test (short, with room for a loaded machine)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A throwaway ``redis-server`` (no persistence) on a free port, stopped afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (make setup installs it with apt)"
        if env.SPLITSERVE_TEST_ALLOW_NO_REDIS.get():
            pytest.skip(message)
        pytest.fail(f"{message}; set SPLITSERVE_TEST_ALLOW_NO_REDIS=1 to skip instead")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = subprocess.Popen(
        [*command, "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_until_up(url, proc)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with running_redis() as (url, _):
        yield url


def _wait_until_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
            return
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server at {url} did not answer within 10 s")


Factory = Callable[..., Registry]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_registry(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Builds registries of one kind; Redis ones share a fresh key prefix per test."""
    made: list[Registry] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    def make(**kwargs: object) -> Registry:
        kwargs.setdefault("heartbeat_timeout_s", TIMEOUT_S)
        if request.param == "memory":
            registry: Registry = InMemoryRegistry(**kwargs)  # type: ignore[arg-type]
        else:
            url = request.getfixturevalue("redis_url")
            registry = RedisRegistry(url, prefix=prefix, **kwargs)  # type: ignore[arg-type]
        made.append(registry)
        return registry

    yield make
    for registry in made:
        registry.close()


def record(worker_id: str, role: str = "decode", **fields: object) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        role=role,
        actor_name=f"{role}-{worker_id}",
        namespace="splitserve",
        node_id="a" * 56,
        kv_address="ucx://127.0.0.1:13337",
        engine_id=f"engine-{worker_id}",
        started_at=1_764_000_000.123456,
        **fields,  # type: ignore[arg-type]
    )


def ids(records: list[WorkerRecord]) -> list[str]:
    return [r.worker_id for r in records]


# --------------------------------------------------------------------------- both stores


def test_register_get_list(make_registry: Factory) -> None:
    registry = make_registry()
    before = time.time()
    stored = registry.register(record("d0", kv_usage=0.5))
    assert before - 1 <= stored.last_heartbeat <= time.time() + 1
    got = registry.get("d0")
    assert got is not None
    assert got == record("d0", kv_usage=0.5, last_heartbeat=got.last_heartbeat)
    assert got.started_at == 1_764_000_000.123456  # floats survive exactly
    registry.register(record("p0", role="prefill"))
    registry.register(record("e0", role="encode"))
    assert ids(registry.list()) == ["d0", "e0", "p0"]
    assert ids(registry.list(role="prefill")) == ["p0"]
    assert registry.get("nobody") is None


def test_heartbeat_refreshes_load(make_registry: Factory) -> None:
    registry = make_registry()
    first = registry.register(record("d0")).last_heartbeat
    while time.time() <= first:  # the registry's clock (this host's, or Redis' on it) moves on
        time.sleep(0.001)
    registry.heartbeat(
        "d0", num_waiting=2, num_running=5, kv_usage=0.75, num_free_blocks=40,
        queued_prefill_tokens=123,
    )  # fmt: skip
    got = registry.get("d0")
    assert got is not None
    assert (got.num_waiting, got.num_running, got.kv_usage) == (2, 5, 0.75)
    assert (got.num_free_blocks, got.queued_prefill_tokens) == (40, 123)
    assert got.last_heartbeat > first
    registry.heartbeat("d0", num_running=1)  # a partial heartbeat keeps the other fields
    got = registry.get("d0")
    assert got is not None and (got.num_running, got.num_waiting) == (1, 2)


def test_heartbeat_of_unknown_worker_raises(make_registry: Factory) -> None:
    registry = make_registry()
    with pytest.raises(UnknownWorkerError, match="'ghost' is not registered") as info:
        registry.heartbeat("ghost", num_running=1)
    assert info.value.worker_id == "ghost" and not info.value.expired
    with pytest.raises(UnknownWorkerError):
        registry.set_status("ghost", "ready")


def test_bad_heartbeat_and_status_values(make_registry: Factory) -> None:
    registry = make_registry()
    registry.register(record("d0"))
    with pytest.raises(ValueError, match="unknown load field 'temperature'"):
        registry.heartbeat("d0", temperature=3)
    with pytest.raises(ValueError, match="kv_usage must be a number"):
        registry.heartbeat("d0", kv_usage="full")
    with pytest.raises(ValueError, match="status must be one of"):
        registry.set_status("d0", "sleeping")
    with pytest.raises(ValueError, match="role must be one of"):
        registry.list(role="verify")


def test_status_transitions(make_registry: Factory) -> None:
    registry = make_registry()
    registry.register(record("d0"))
    assert registry.get("d0").status == "starting"  # type: ignore[union-attr]
    registry.set_status("d0", "ready")
    registry.heartbeat("d0", num_running=1)  # heartbeats keep the status
    assert registry.get("d0").status == "ready"  # type: ignore[union-attr]
    registry.set_status("d0", "draining")
    assert [r.status for r in registry.list(role="decode")] == ["draining"]


def test_deregister(make_registry: Factory) -> None:
    registry = make_registry()
    registry.register(record("d0"))
    assert registry.deregister("d0") is True
    assert registry.deregister("d0") is False
    assert registry.list() == [] and registry.get("d0") is None
    with pytest.raises(UnknownWorkerError):
        registry.heartbeat("d0")


def test_silent_worker_expires_and_must_reregister(make_registry: Factory) -> None:
    registry = make_registry()
    registry.register(record("alive"))
    registry.register(record("silent"))
    deadline = time.monotonic() + TIMEOUT_S + 30
    while registry.get("silent") is not None:  # one worker heartbeats until the other expired
        assert time.monotonic() < deadline, "the silent worker never expired"
        try:
            registry.heartbeat("alive", num_running=1)
        except UnknownWorkerError:  # this process stalled past the timeout: do as workers do
            registry.register(record("alive"))
        time.sleep(0.1)
    registry.heartbeat("alive", num_running=1)  # fresh, even if this machine is loaded
    assert ids(registry.list()) == ["alive"]
    assert registry.get("silent") is None
    expired = registry.get("silent", include_expired=True)
    assert expired is not None and registry.is_expired(expired)
    assert ids(registry.list(include_expired=True)) == ["alive", "silent"]
    with pytest.raises(UnknownWorkerError, match="missed its heartbeat timeout") as info:
        registry.heartbeat("silent", num_running=0)
    assert info.value.expired
    with pytest.raises(UnknownWorkerError):
        registry.set_status("silent", "ready")
    registry.register(record("silent"))  # what a worker does on UnknownWorkerError
    registry.heartbeat("silent", num_running=2)
    registry.heartbeat("alive", num_running=1)
    assert ids(registry.list()) == ["alive", "silent"]


def test_reregister_under_another_role(make_registry: Factory) -> None:
    registry = make_registry()
    registry.register(record("w0", role="prefill", num_running=3))
    registry.register(record("w0", role="decode"))
    assert ids(registry.list(role="prefill")) == []
    assert ids(registry.list(role="decode")) == ["w0"]
    assert registry.get("w0").num_running == 0  # type: ignore[union-attr]  # replaced


def test_concurrent_heartbeats(make_registry: Factory) -> None:
    registry = make_registry(heartbeat_timeout_s=5.0)
    workers = [f"d{i}" for i in range(4)]
    for worker_id in workers:
        registry.register(record(worker_id))
    errors: list[BaseException] = []

    def beat(worker_id: str) -> None:
        try:
            for n in range(50):
                registry.heartbeat(worker_id, num_running=n)
                registry.list(role="decode")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=beat, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [r.num_running for r in registry.list()] == [49] * 4


# --------------------------------------------------------------------------- in memory only


def test_in_memory_forgets_records_after_retention() -> None:
    now = [1000.0]
    registry = InMemoryRegistry(
        heartbeat_timeout_s=5.0, retain_expired_s=10.0, clock=lambda: now[0]
    )
    registry.register(record("d0"))
    now[0] += 5.0
    assert ids(registry.list()) == ["d0"]  # exactly at the timeout: still alive
    now[0] += 0.01
    assert ids(registry.list()) == [] and ids(registry.list(include_expired=True)) == ["d0"]
    now[0] += 10.0
    assert registry.list(include_expired=True) == []
    with pytest.raises(UnknownWorkerError) as info:
        registry.heartbeat("d0")
    assert not info.value.expired  # forgotten entirely


# --------------------------------------------------------------------------- Redis only


@pytest.mark.redis
def test_two_redis_handles_see_the_same_workers(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    with (
        RedisRegistry(redis_url, heartbeat_timeout_s=5.0, prefix=prefix) as worker_side,
        create_registry(redis_url, heartbeat_timeout_s=5.0, prefix=prefix) as frontend,
    ):
        worker_side.register(record("p0", role="prefill"))
        worker_side.heartbeat("p0", queued_prefill_tokens=512)
        got = frontend.get("p0")
        assert got is not None and got.queued_prefill_tokens == 512
        frontend.set_status("p0", "ready")
        assert worker_side.get("p0").status == "ready"  # type: ignore[union-attr]
        with RedisRegistry(redis_url, heartbeat_timeout_s=5.0, prefix="other") as stranger:
            assert stranger.list() == []  # another prefix is another cluster


@pytest.mark.redis
def test_redis_key_expires_and_index_entry_is_dropped(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    with RedisRegistry(
        redis_url, heartbeat_timeout_s=TIMEOUT_S, retain_expired_s=0.0, prefix=prefix
    ) as registry:
        registry.register(record("d0"))
        raw = redis.Redis.from_url(redis_url, decode_responses=True)
        ttl_ms = raw.pttl(f"{prefix}:worker:d0")
        assert 0 < ttl_ms <= TIMEOUT_S * 1000
        assert raw.smembers(f"{prefix}:role:decode") == {"d0"}
        deadline = time.monotonic() + TIMEOUT_S + 10
        while raw.exists(f"{prefix}:worker:d0") and time.monotonic() < deadline:
            time.sleep(0.05)  # polling Redis for the key's expiry
        assert raw.exists(f"{prefix}:worker:d0") == 0  # Redis dropped the dead worker
        assert registry.list(include_expired=True) == []
        assert raw.smembers(f"{prefix}:role:decode") == set()  # and list() its index entry
        with pytest.raises(UnknownWorkerError):
            registry.heartbeat("d0")  # no partial record is recreated
        assert raw.exists(f"{prefix}:worker:d0") == 0
        raw.close()


@pytest.mark.redis
def test_redis_going_away_is_a_registry_error() -> None:
    with running_redis() as (url, proc), RedisRegistry(url, heartbeat_timeout_s=5.0) as registry:
        registry.register(record("d0"))
        proc.terminate()
        proc.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(RegistryError, match=rf"registry: Redis at {url} failed in heartbeat"):
            registry.heartbeat("d0", num_running=1)
        with pytest.raises(RegistryError, match="failed in list"):
            registry.list()
        assert time.monotonic() - start < 5.0


def test_unreachable_redis_fails_fast_naming_the_setting() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"registry: cannot reach Redis at {url}"):
        create_registry(url, heartbeat_timeout_s=5.0)
    assert time.monotonic() - start < 5.0


def test_silent_server_times_out_instead_of_hanging() -> None:
    with socket.socket() as listener:  # the kernel accepts connections; nobody answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConfigError, match=rf"registry: cannot reach Redis at {url}"):
            RedisRegistry(url, heartbeat_timeout_s=5.0, connect_timeout_s=0.5)
        assert time.monotonic() - start < 3.0


def test_non_redis_server_is_refused() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer_like_a_web_server() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer_like_a_web_server, daemon=True)
        thread.start()
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ConfigError, match="did not answer PING as Redis does"):
            create_registry(url, heartbeat_timeout_s=5.0)
        thread.join(timeout=5)


def test_create_registry_checks_the_url() -> None:
    assert isinstance(create_registry("memory", heartbeat_timeout_s=1.0), InMemoryRegistry)
    with pytest.raises(ConfigError, match=r"registry: must be 'memory' or redis://"):
        create_registry("http://localhost:6379", heartbeat_timeout_s=1.0)
    with pytest.raises(ConfigError, match="heartbeat_timeout_s must be > 0"):
        create_registry("memory", heartbeat_timeout_s=0)


def test_password_is_not_shown_in_errors() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError) as info:
        create_registry(url, heartbeat_timeout_s=5.0)
    assert "s3cret" not in str(info.value) and ":***@" in str(info.value)


# --------------------------------------------------------------------------- the record


def test_record_serializes_without_pickle() -> None:
    original = record("d0", status="ready", kv_usage=0.25, last_heartbeat=12.5)
    assert WorkerRecord.from_msgpack(original.to_msgpack()) == original
    assert WorkerRecord.from_dict(json.loads(json.dumps(original.to_dict()))) == original
    with pytest.raises(ValueError, match="role must be one of"):
        record("d0", role="verify")
    with pytest.raises(ValueError, match="status must be one of"):
        record("d0", status="dead")


def test_unknown_worker_error_survives_pickling() -> None:
    """Ray pickles exceptions raised in actors (the in-memory registry runs in one)."""
    err = pickle.loads(pickle.dumps(UnknownWorkerError("gone", "d0", expired=True)))
    assert (str(err), err.worker_id, err.expired) == ("gone", "d0", True)
