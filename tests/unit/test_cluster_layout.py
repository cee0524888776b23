"""The one-machine default of ``splitserve serve``: a prefill/decode split only with a device
per role, else one decode worker that prefills every prompt; what the CLI makes of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.cluster.layout import Devices, LocalLayout, choose_layout, numa_nodes
from splitserve.cluster.tools.cli import _cluster_config, build_parser


def test_fewer_devices_than_roles_colocates() -> None:
    layout = choose_layout(Devices("cpu", count=1, cores=2))
    assert (layout.prefill, layout.decode, layout.num_gpus_per_worker) == (0, 1, 0.0)
    assert layout.colocated
    assert layout.reason.startswith("colocated") and "2 CPU cores in 1 NUMA node" in layout.reason
    one_gpu = choose_layout(Devices("cuda", count=1, cores=8))
    assert (one_gpu.prefill, one_gpu.decode, one_gpu.num_gpus_per_worker) == (0, 1, 1.0)


def test_a_device_per_role_keeps_the_split() -> None:
    for devices in (Devices("cuda", count=2, cores=16), Devices("cpu", count=2, cores=64)):
        layout = choose_layout(devices)
        assert (layout.prefill, layout.decode) == (1, 1) and not layout.colocated
        assert layout.reason.startswith("disaggregated")


def test_bad_devices_and_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        choose_layout(Devices("cuda", count=0, cores=2))
    with pytest.raises(ValueError, match="kind"):
        Devices("tpu", count=1, cores=1)
    with pytest.raises(ValueError, match="decode >= 1"):
        LocalLayout(prefill=1, decode=0, num_gpus_per_worker=0, reason="")


def test_numa_nodes_counts_nodes_with_cpus(tmp_path: Path) -> None:
    for name, cpus in (("node0", "0-15\n"), ("node1", "16-31\n"), ("node2", "\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cpulist").write_text(cpus)
    (tmp_path / "possible").write_text("0-2\n")
    assert numa_nodes(tmp_path) == 2  # node2 has memory only
    assert numa_nodes(tmp_path / "missing") == 1


def _config(*argv: str):  # type: ignore[no-untyped-def]
    return _cluster_config(build_parser().parse_args(["serve", *argv]))


def test_serve_default_follows_the_machine_and_flags_ask_for_pd(monkeypatch) -> None:
    import splitserve.cluster.layout as layout_module

    monkeypatch.setattr(layout_module, "numa_nodes", lambda: 1)
    config, reason = _config()
    assert config.roles.prefill.replicas == 0 and config.roles.decode.replicas == 1
    assert config.colocated and reason.startswith("colocated")
    config, reason = _config("--prefill-workers", "1")
    assert (config.roles.prefill.replicas, config.roles.decode.replicas) == (1, 1)
    assert not config.colocated and config.router.local_prefill_max_tokens == 63
    assert "as asked" in reason
    monkeypatch.setattr(layout_module, "numa_nodes", lambda: 2)
    config, reason = _config()
    assert config.roles.prefill.replicas == 1 and reason.startswith("disaggregated")


def test_serve_config_file_is_kept_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("roles: {prefill: {replicas: 2}, decode: {replicas: 3}}\n")
    config, reason = _config("--config", str(path))
    assert (config.roles.prefill.replicas, config.roles.decode.replicas) == (2, 3)
    assert str(path) in reason
    config, _ = _config("--config", str(path), "--decode-workers", "1")
    assert (config.roles.prefill.replicas, config.roles.decode.replicas) == (2, 1)


def test_worker_count_flags_are_checked() -> None:
    for argv in (["--decode-workers", "0"], ["--prefill-workers", "-1"],
                 ["--prefill-workers", "x"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *argv])


def test_vllms_scheduler_and_cache_flags_reach_every_worker(tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    """``--max-num-seqs``, ``--max-num-batched-tokens``, ``--[no-]enable-prefix-caching``,
    ``--block-size`` and ``--seed`` (vLLM's names) set every prefill and decode worker's
    settings, over a --config file's values too, and the single engine's; unset, the
    defaults and the file stand; bad values are refused naming them."""
    from splitserve.cluster.config import ClusterConfig
    from splitserve.cluster.frontends.backend import EngineBackend
    from splitserve.cluster.tools.cli import _engine_kwargs
    from splitserve.errors import ConfigError

    flags = ["--max-num-seqs", "8", "--max-num-batched-tokens", "512",
             "--no-enable-prefix-caching", "--block-size", "32", "--seed", "7"]
    default, _ = _config("--prefill-workers", "1")
    assert default.roles.decode.max_num_seqs == 128 and default.enable_prefix_caching
    yaml = tmp_path / "c.yaml"
    yaml.write_text("block_size: 64\nroles:\n  decode:\n    max_num_seqs: 3\n"
                    "  prefill:\n    replicas: 1\n")
    assert _config("--config", str(yaml))[0].roles.decode.max_num_seqs == 3  # the file's
    for config in (_config("--prefill-workers", "1", *flags)[0],
                   _config("--config", str(yaml), *flags)[0]):
        assert isinstance(config, ClusterConfig)
        for role in (config.roles.prefill, config.roles.decode):
            assert (role.max_num_seqs, role.max_num_batched_tokens) == (8, 512)
        assert (config.enable_prefix_caching, config.block_size, config.seed) == (False, 32, 7)
    args = build_parser().parse_args(["serve", "--model", str(tiny_model_dir),
                                      "--kv-cache-memory", "16MiB", *flags])
    backend = EngineBackend.from_config(**_engine_kwargs(args))
    try:
        engine = backend.engine.engine
        assert (engine.config.max_num_seqs, engine.config.max_num_batched_tokens) == (8, 512)
        assert (engine.config.enable_prefix_caching, engine.config.block_size,
                engine.config.seed) == (False, 32, 7)
    finally:
        import asyncio

        asyncio.run(backend.close())
    with pytest.raises(ConfigError, match="block_size: must be a power of two"):
        _config("--block-size", "48")
    with pytest.raises(SystemExit):  # argparse: "--max-num-seqs: must be >= 1, got 0"
        build_parser().parse_args(["serve", "--max-num-seqs", "0"])


def test_pooler_config_reaches_every_worker_and_the_single_engine(tiny_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    """``--pooler-config`` (vLLM's) sets the embeddings' pooling of every worker (over a
    --config file's) and of the single engine; a bad one is refused naming the setting."""
    from splitserve.cluster.config import ClusterConfig
    from splitserve.cluster.launcher import Launcher
    from splitserve.cluster.tools.cli import _engine_kwargs
    from splitserve.errors import ConfigError
    from splitserve.roles.engine.config import EngineConfig

    flag = ["--pooler-config", '{"pooling_type": "mean", "normalize": false}']
    want = {"pooling_type": "MEAN", "normalize": False}
    yaml = tmp_path / "c.yaml"
    yaml.write_text("pooler_config: {pooling_type: CLS}\nroles:\n  prefill:\n    replicas: 1\n")
    assert _config("--config", str(yaml))[0].pooler_config == {"pooling_type": "CLS"}
    for config in (_config("--prefill-workers", "1", *flag)[0],
                   _config("--config", str(yaml), *flag)[0]):
        assert isinstance(config, ClusterConfig) and config.pooler_config == want
        launcher = Launcher.__new__(Launcher)  # its engine configs, without starting Ray
        launcher.config = config
        for role in ("prefill", "decode"):
            assert launcher.engine_config(role).pooler_config == want
    args = build_parser().parse_args(["serve", "--model", str(tiny_model_dir), *flag])
    assert EngineConfig(**_engine_kwargs(args)).pooler_config == want
    with pytest.raises(ConfigError, match="pooler_config"):
        _config("--pooler-config", '{"pooling_type": "MAX"}')
    with pytest.raises(ConfigError, match="pooler_config"):
        ClusterConfig.local(pooler_config={"normalise": True})


def test_scheduling_policy_reaches_every_worker_and_the_cluster_frontend(
        tiny_model_dir: Path) -> None:
    """``--scheduling-policy priority`` (vLLM's) sets every worker's policy, the frontend's
    check of a request's priority and the single engine's; a bad value is refused."""
    from splitserve.cluster.launcher import Launcher
    from splitserve.cluster.tools.cli import _engine_kwargs
    from splitserve.errors import ConfigError
    from splitserve.roles.engine.config import EngineConfig

    assert _config("--prefill-workers", "1")[0].scheduling_policy == "fcfs"
    config = _config("--prefill-workers", "1", "--scheduling-policy", "priority")[0]
    assert config.scheduling_policy == "priority"
    launcher = Launcher.__new__(Launcher)  # its engine configs, without starting Ray
    launcher.config = config
    assert {launcher.engine_config(r).scheduling_policy for r in ("prefill", "decode")} == {
        "priority"}
    args = build_parser().parse_args(["serve", "--model", str(tiny_model_dir),
                                      "--scheduling-policy", "priority"])
    assert EngineConfig(**_engine_kwargs(args)).scheduling_policy == "priority"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--scheduling-policy", "lifo"])
    with pytest.raises(ConfigError, match="scheduling_policy"):
        from splitserve.cluster.config import ClusterConfig

        ClusterConfig.local(scheduling_policy="lifo")


def test_vllms_tool_choice_switch_and_log_level_name_are_taken() -> None:
    """``--enable-auto-tool-choice`` (vLLM needs it for tool_choice auto; here the parser is
    enough) is taken with a parser and refused without one, as vLLM refuses it;
    ``--uvicorn-log-level`` is ``--log-level``."""
    from splitserve.cluster.tools.cli import _serve
    from splitserve.errors import ConfigError

    parser = build_parser()
    args = parser.parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser",
                              "hermes", "--uvicorn-log-level", "info"])
    assert args.enable_auto_tool_choice and args.log_level == "info"
    with pytest.raises(ConfigError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        _serve(parser.parse_args(["serve", "--enable-auto-tool-choice"]))


def test_format_flags_given_replace_a_config_files_values(tmp_path: Path) -> None:
    """``serve --config FILE --quantization w4a8 ...``: a flag given replaces the file's value
    (it was silently ignored); a flag left out keeps the file's, not the flag's default."""
    yaml = tmp_path / "c.yaml"
    yaml.write_text("quantization: none\ndtype: bfloat16\nkv_cache_dtype: fp8\n"
                    "kv_cache_memory_bytes: 64MiB\nmax_model_len: 1024\n")
    kept, _ = _config("--config", str(yaml))
    assert (kept.quantization, kept.dtype, kept.kv_cache_dtype) == ("none", "bfloat16", "fp8")
    assert (kept.kv_cache_memory_bytes, kept.max_model_len) == (64 << 20, 1024)
    given, _ = _config("--config", str(yaml), "--quantization", "w4a8", "--dtype", "float32",
                       "--kv-cache-dtype", "auto", "--kv-cache-memory", "256MiB",
                       "--max-model-len", "512", "--int4-group-size", "128")
    assert (given.quantization, given.dtype, given.kv_cache_dtype) == ("w4a8", "float32", "auto")
    assert (given.kv_cache_memory_bytes, given.max_model_len) == (256 << 20, 512)
    assert given.int4_group_size == 128
