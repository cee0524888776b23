"""ClusterConfig: valid configs load and round-trip; each invalid one names its setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.cluster.config import (
    LOCAL_CPU_WORKER_RESOURCE,
    ClusterConfig,
    ClusterConfigError,
    parse_byte_size,
)
from splitserve.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def load_error(text: str) -> ClusterConfigError:
    with pytest.raises(ClusterConfigError) as info:
        ClusterConfig.from_yaml_text(text, source="cluster.yaml")
    return info.value


def test_defaults_are_one_prefill_one_decode_on_memory_registry() -> None:
    config = ClusterConfig()
    assert [(name, role.replicas) for name, role in config.roles.items()] == [
        ("encode", 0),
        ("prefill", 1),
        ("decode", 1),
    ]
    assert config.model is None
    assert config.dtype == "float32"
    assert config.block_size == 16
    assert config.kv_cache_memory_bytes == 1 << 30
    assert config.router.policy == "dualmap"
    assert config.registry.url == "memory"
    assert config.kv_transfer.transport == "ucx"
    assert config.ray.address is None


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = ClusterConfig.local(
        prefill=2,
        decode=3,
        registry="redis://localhost:6390/2",
        slo={"ttft_ms": 750, "tpot_ms": 40},
        router={"policy": "kv_overlap_cost", "local_prefill_max_tokens": 0},
        kv_cache_memory_bytes="256MiB",
    )
    path = tmp_path / "cluster.yaml"
    text = config.to_yaml(path)
    assert path.read_text() == text
    loaded = ClusterConfig.from_yaml(path)
    assert loaded == config
    assert loaded.kv_cache_memory_bytes == 256 << 20
    assert loaded.registry.url == "redis://localhost:6390/2"


def test_minimal_yaml_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    assert ClusterConfig.from_yaml(tmp_path / "empty.yaml") == ClusterConfig()
    config = ClusterConfig.from_yaml_text("roles:\n  decode:\n    replicas: 2\n")
    assert config.roles.decode.replicas == 2
    assert config.roles.prefill.replicas == 1  # unnamed roles keep their defaults


@pytest.mark.parametrize("name", ["cluster-laptop-cpu", "cluster-gpu-1node", "cluster-xpyd"])
def test_deploy_examples_load(name: str) -> None:
    config = ClusterConfig.from_yaml(DEPLOY / f"{name}.yaml")
    assert ClusterConfig.from_yaml_text(config.to_yaml()) == config


def test_deploy_examples_shapes() -> None:
    laptop = ClusterConfig.from_yaml(DEPLOY / "cluster-laptop-cpu.yaml")
    assert (laptop.roles.prefill.replicas, laptop.roles.decode.replicas) == (1, 1)
    assert laptop.roles.decode.num_gpus == 0 and laptop.roles.decode.resources
    gpu = ClusterConfig.from_yaml(DEPLOY / "cluster-gpu-1node.yaml")
    assert [r.replicas for _, r in gpu.roles.items()] == [1, 1, 1]
    assert sum(r.num_gpus for _, r in gpu.roles.items()) <= 1
    xpyd = ClusterConfig.from_yaml(DEPLOY / "cluster-xpyd.yaml")
    assert (xpyd.roles.prefill.replicas, xpyd.roles.decode.replicas) == (2, 4)
    assert xpyd.registry.url.startswith("redis://") and xpyd.ray.address == "auto"


def test_local_is_cpu_mode_for_two_cores() -> None:
    config = ClusterConfig.local(prefill=1, decode=1, encode=1)
    assert config.ray.num_cpus == 2 and config.ray.num_gpus == 0
    for _, role in config.roles.items():
        assert role.num_cpus == 0 and role.num_gpus == 0
        assert role.resources == {LOCAL_CPU_WORKER_RESOURCE: 1}
    assert config.ray.resources[LOCAL_CPU_WORKER_RESOURCE] >= 6  # room to scale up


def test_local_overrides_merge_sections_and_replace_resources() -> None:
    config = ClusterConfig.local(roles={"decode": {"max_num_seqs": 8, "resources": {}}})
    assert config.roles.decode.max_num_seqs == 8 and config.roles.decode.replicas == 1
    assert config.roles.decode.resources == {}
    assert config.roles.prefill.resources == {LOCAL_CPU_WORKER_RESOURCE: 1}
    plain = {"resources": {}}
    config = ClusterConfig.local(roles={"prefill": plain, "decode": plain}, ray=plain)
    assert config.ray.resources == {}  # for a Ray that was started without the custom resource
    with pytest.raises(ClusterConfigError, match=r"roles\.prefill\.resources\.splitserve_cpu"):
        ClusterConfig.local(ray={"resources": {}})  # prefill still asks for the slot


def test_local_overrides_are_validated() -> None:
    with pytest.raises(ClusterConfigError, match=r"slo\.ttft_ms: must be > 0"):
        ClusterConfig.local(slo={"ttft_ms": 0})
    with pytest.raises(ClusterConfigError, match=r"roles\.decode\.replicas: must be >= 1"):
        ClusterConfig.local(decode=0)
    with pytest.raises(ClusterConfigError, match=r"\bmodle: unknown setting"):
        ClusterConfig.local(modle="x")


# --------------------------------------------------------------------------- bad configs


def test_unknown_role_is_named() -> None:
    err = load_error("roles:\n  verify:\n    replicas: 1\n")
    assert str(err).startswith("cluster.yaml: roles.verify: unknown role")
    assert "encode, prefill, decode" in str(err)
    assert err.settings == ("roles.verify",)
    assert isinstance(err, ConfigError)


def test_zero_decode_replicas() -> None:
    err = load_error("roles: {decode: {replicas: 0}}")
    assert str(err).startswith("cluster.yaml: roles.decode.replicas: must be >= 1")


def test_zero_prefill_needs_local_prefill_of_every_prompt() -> None:
    err = load_error("roles: {prefill: {replicas: 0}}")
    assert "roles.prefill.replicas: must be >= 1" in str(err)
    assert "router.local_prefill_max_tokens" in str(err)
    err = load_error(
        "max_model_len: 512\nrouter: {local_prefill_max_tokens: 510}\nroles: {prefill: {replicas: 0}}"
    )
    assert "roles.prefill.replicas: must be >= 1" in str(err)
    config = ClusterConfig.from_yaml_text(
        "max_model_len: 512\nrouter: {local_prefill_max_tokens: 511}\nroles: {prefill: {replicas: 0}}"
    )
    assert config.roles.prefill.replicas == 0
    assert not config.colocated  # a bound, not "all": a prefill worker added later is used


def test_local_prefill_all_is_colocated_and_needs_no_prefill_worker() -> None:
    config = ClusterConfig.from_yaml_text(
        "router: {local_prefill_max_tokens: all}\nroles: {prefill: {replicas: 0}}"
    )
    assert config.colocated and config.roles.prefill.replicas == 0
    assert ClusterConfig.from_yaml_text(config.to_yaml()) == config
    err = load_error("router: {local_prefill_max_tokens: most}")
    assert err.settings and err.settings[0].startswith("router.local_prefill_max_tokens")
    err = load_error("router: {local_prefill_max_tokens: -1}")
    assert err.settings[0].startswith("router.local_prefill_max_tokens")
    err = load_error("router: {local_prefill_max_tokens: all}\nplanner: {enabled: true}")
    assert "planner.enabled: the planner moves workers between prefill and decode" in str(err)


def test_local_without_prefill_workers_prefills_every_prompt_on_decode() -> None:
    config = ClusterConfig.local(prefill=0, decode=1)
    assert config.colocated and config.router.local_prefill_max_tokens == "all"
    assert config.roles.decode.num_threads == max(1, (os.cpu_count() or 1))  # all the cores
    assert not ClusterConfig.local(prefill=1, decode=1).colocated
    with pytest.raises(ClusterConfigError, match=r"roles\.prefill\.replicas: must be >= 1"):
        ClusterConfig.local(prefill=0, router={"local_prefill_max_tokens": 63})


def test_encode_needed_for_multimodal_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava", "vision_config": {"hidden_size": 32}})
    )
    err = load_error(f"model: {tmp_path}\nroles: {{encode: {{replicas: 0}}}}")
    assert "roles.encode.replicas: must be >= 1 for the multimodal model" in str(err)
    config = ClusterConfig.from_yaml_text(f"model: {tmp_path}\nroles: {{encode: {{replicas: 1}}}}")
    assert config.is_multimodal


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://localhost:6379", "must be 'memory' or redis://host:port"),
        ("redis://:6379", "needs a host"),
        ("redis://localhost:99999", "port must be a number"),
        ("redis://localhost:port", "port must be a number"),
        ("redis://localhost:6379/zero", "database must be a number"),
        ("localhost:6379", "must be 'memory' or redis://host:port"),
    ],
)
def test_bad_registry_url_shape(url: str, reason: str) -> None:
    err = load_error(f"registry: '{url}'")
    assert str(err).startswith(f"cluster.yaml: registry.url: {reason}")
    assert url in str(err)


@pytest.mark.parametrize(
    "url", ["memory", "redis://localhost", "redis://10.0.0.5:6380/3", "rediss://:pw@h:6379/0"]
)
def test_good_registry_urls(url: str) -> None:
    assert ClusterConfig.from_yaml_text(f"registry: '{url}'").registry.url == url


def test_heartbeat_timeout_must_exceed_interval() -> None:
    err = load_error("registry: {heartbeat_interval_s: 2, heartbeat_timeout_s: 2}")
    assert "registry.heartbeat_timeout_s: must exceed heartbeat_interval_s" in str(err)


@pytest.mark.parametrize("value", ["0", "-5", ".nan", ".inf"])
@pytest.mark.parametrize("name", ["ttft_ms", "tpot_ms"])
def test_non_positive_slos(name: str, value: str) -> None:
    err = load_error(f"slo: {{{name}: {value}}}")
    assert str(err).startswith(f"cluster.yaml: slo.{name}: ")
    assert err.settings == (f"slo.{name}",)


@pytest.mark.parametrize(
    "text, setting",
    [
        ("modle: x", "modle"),
        ("slo: {ttft: 5}", "slo.ttft"),
        ("roles: {decode: {replica: 2}}", "roles.decode.replica"),
        ("registry: {url: memory, ttl: 3}", "registry.ttl"),
    ],
)
def test_unknown_key_is_named(text: str, setting: str) -> None:
    err = load_error(text)
    assert str(err).startswith(f"cluster.yaml: {setting}: unknown setting")
    assert err.settings == (setting,)


def test_unknown_key_lists_the_known_ones() -> None:
    assert "known settings here: ttft_ms, tpot_ms" in str(load_error("slo: {ttft: 5}"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("router: {policy: random}", "router.policy: input should be 'round_robin'"),
        ("kv_transfer: {transport: tcp}", "kv_transfer.transport: input should be 'ucx'"),
        ("dtype: float8", "dtype: input should be 'auto', 'float32'"),
        ("block_size: 12", "block_size: must be a power of two"),
        ("kv_cache_memory_bytes: 2XB", "kv_cache_memory_bytes: not a byte size"),
        ("kv_cache_memory_bytes: 0", "kv_cache_memory_bytes: must be >= 1"),
        ("roles: {decode: 2}", "roles.decode: must be a mapping of settings"),
        ("roles: {prefill: {num_gpus: -1}}", "roles.prefill.num_gpus: must be >= 0"),
        ("roles: {decode: {replicas: 3, max_replicas: 2}}", "roles.decode.replicas: must be <="),
        ("roles: {decode: {min_replicas: 0}}", "roles.decode.min_replicas: must be >= 1"),
        ("roles: {prefill: {resources: {GPU: 1}}}", "roles.prefill.resources.GPU: a built-in"),
        ("roles: {prefill: {resources: {x: 1}}}", "roles.prefill.resources.x: a local Ray"),
        ("ray: {address: auto, num_cpus: 4}", "ray.num_cpus: only for a local start"),
        (
            "ray: {num_gpus: 1}\nroles: {decode: {num_gpus: 1, replicas: 2}}",
            "ray.num_gpus: 1 is less than the roles' initial replicas need (2)",
        ),
        ("max_model_len: 1", "max_model_len: must be >= 2"),
    ],
)
def test_bad_values_name_the_setting(text: str, message: str) -> None:
    assert str(load_error(text)).startswith(f"cluster.yaml: {message}")


def test_several_errors_are_all_listed() -> None:
    err = load_error("slo: {ttft_ms: 0, tpot_ms: 0}\nrouter: {policy: x}")
    assert "3 invalid settings" in str(err)
    assert set(err.settings) == {"slo.ttft_ms", "slo.tpot_ms", "router.policy"}


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match="missing.yaml: cannot read"):
        ClusterConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("roles:\n  decode: [\n")
    with pytest.raises(ClusterConfigError, match=r"bad\.yaml: invalid YAML: line \d+"):
        ClusterConfig.from_yaml(bad)
    bad.write_text("- prefill\n- decode\n")
    with pytest.raises(ClusterConfigError, match=r"bad\.yaml: expected a mapping"):
        ClusterConfig.from_yaml(bad)
    bad.write_text("roles: {decode: {replicas: 0}}\n")
    with pytest.raises(ClusterConfigError, match=r"bad\.yaml: roles\.decode\.replicas"):
        ClusterConfig.from_yaml(bad)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GiB", 2 << 30),
        ("512 MiB", 512 << 20),
        ("1.5GB", 1_500_000_000),
        ("64Ki", 64 << 10),
        ("1000", 1000),
    ],
)
def test_byte_sizes(text: str, expected: int) -> None:
    assert parse_byte_size(text) == expected


def test_replica_bounds_and_role_lookup() -> None:
    config = ClusterConfig.from_yaml_text("roles: {prefill: {replicas: 2, max_replicas: 4}}")
    assert config.replica_bounds("prefill") == (0, 4)
    assert config.replica_bounds("decode") == (1, None)
    with pytest.raises(ClusterConfigError, match="unknown role 'verify'"):
        config.role("verify")


def test_local_prefill_bound_is_inclusive_and_the_old_name_says_so() -> None:
    assert ClusterConfig().router.local_prefill_max_tokens == 63
    config = ClusterConfig.from_yaml_text("router: {local_prefill_max_tokens: 0}")
    assert config.router.local_prefill_max_tokens == 0
    err = load_error("router: {local_prefill_threshold: 64}")
    assert "router.local_prefill_threshold: renamed to local_prefill_max_tokens" in str(err)


def test_public_export_and_light_imports() -> None:
    """``from splitserve import ClusterConfig`` works and loads neither torch, Ray nor redis."""
    code = (
        "import sys\n"
        "from splitserve import ClusterConfig\n"
        "import splitserve.cluster.registry\n"
        "ClusterConfig.local()\n"
        "print(sorted(m for m in ('torch', 'ray', 'redis') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
