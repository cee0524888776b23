"""The ``splitserve`` command line: ``generate`` (one in-process engine), ``serve`` (the cluster,
or one engine, behind the HTTP and gRPC frontends), ``bench`` and ``batch``.

Owns argument parsing and turning flags into configs; reads the API key from its file or
``SPLITSERVE_API_KEY`` (then removed from the environment, so Ray's processes never see it).
Must not print the key.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from splitserve.errors import ConfigError, SplitserveError

CHAT_TEMPLATE_HELP = ("Jinja chat template used instead of the model's: a file, or the template "
                      "itself (as vLLM's --chat-template)")
TOKENIZER_HELP = ("Hugging Face tokenizer folder to use instead of the model's own (for a GGUF, "
                  "its base model's, as vLLM advises; default: the model's)")


def _generate(args: argparse.Namespace) -> int:
    from splitserve import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed,
    )
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype,
              quantization=args.quantization, int4_group_size=args.int4_group_size,
              kv_cache_dtype=args.kv_cache_dtype)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate([args.prompt], params)[0]
    completion = out.outputs[0]
    if args.json:
        print(json.dumps({
            "text": completion.text,
            "token_ids": completion.token_ids,
            "prompt_token_ids": out.prompt_token_ids,
            "finish_reason": completion.finish_reason,
        }))
    else:
        print(completion.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with one in-process engine")
    gen.add_argument("--prompt", required=True, help="prompt text (a user message with --chat)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded SmolLM2)")
    gen.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    _add_format_arguments(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=_generate)
    _add_serve_parser(sub)
    _add_bench_parser(sub)
    # `batch` is parsed by the batch runner's own parser (main() hands argv over)
    sub.add_parser("batch", help="run an OpenAI batch file (same as python -m splitserve.batch)")
    return parser


class _Given(argparse._StoreAction):
    """Stores the value as ``store`` does and records that the flag was given
    (``args.given``): a ``--config`` file's value is replaced only by a flag actually given,
    not by the flag's default."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


_OVER_CONFIG = ("dtype", "quantization", "int4_group_size", "kv_cache_dtype",
                "kv_cache_memory_bytes", "max_model_len")
"""Flags (``_Given``) that replace a ``--config`` file's settings when given."""


def _add_format_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", action=_Given,
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="activations and KV; auto: bfloat16 where the CPU has it natively")
    parser.add_argument("--quantization", default="auto", action=_Given,
                        choices=["auto", "none", "int4", "int8", "w4a8"],
                        help="weights: auto (default) serves a GGUF's own codes (Q2_K-Q6_K/"
                             "Q8_0/IQ4) and a folder's floats; none dequantizes a GGUF (the "
                             "fp32 reference); int4/int8 quantize at load; w4a8: int4 with "
                             "8-bit activations (faster, less exact)")
    parser.add_argument("--int4-group-size", type=int, default=32, choices=[32, 64, 128, 256],
                        action=_Given)
    parser.add_argument("--kv-cache-dtype", default="auto", action=_Given,
                        choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                        help="KV cache elements: auto (as --dtype) or fp8 (one byte, half the "
                             "memory; fp8 = fp8_e4m3, as vLLM)")


def _byte_size(text: str) -> int:
    from splitserve.cluster.config import parse_byte_size

    try:
        return int(parse_byte_size(text))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from splitserve.cluster.frontends.backend import Backend, ClusterBackend, EngineBackend
    from splitserve.cluster.frontends.serve import ServeOptions, TlsOptions, run_forever

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    api_key = _api_key(args)  # before Ray starts: it must not inherit the key
    if args.generation_config not in ("auto", "vllm"):  # a bad folder: before any worker starts
        from splitserve.roles.models import generation_config

        generation_config.resolve(args.generation_config, None)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:  # as vLLM refuses it
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (which parser "
                          "reads this model's tool calls)")
    chat_template = None
    if args.chat_template is not None:  # a missing file: before any worker starts
        from splitserve.roles.models.tokenizer import load_chat_template

        chat_template = load_chat_template(args.chat_template)
    tls = None
    if args.ssl_certfile or args.ssl_keyfile or args.ssl_client_ca:
        if not (args.ssl_certfile and args.ssl_keyfile):
            raise ConfigError("--ssl-certfile and --ssl-keyfile go together")
        tls = TlsOptions(args.ssl_certfile, args.ssl_keyfile, args.ssl_client_ca)
    backend: Backend
    if args.single_engine:
        backend = EngineBackend.from_config(freeze_heap=True, **_engine_kwargs(args))
    else:
        config, layout = _cluster_config(args)
        logging.getLogger("splitserve.serve").info("cluster layout: %s", layout)
        backend = ClusterBackend.from_config(config)
        where = "child processes" if config.runtime == "processes" else "Ray"
        print(f"cluster: {layout}; {backend.cluster.status()['roles']} workers on {where}",
              flush=True)
    opts = ServeOptions(
        host=args.host, port=args.port, grpc_port=None if args.grpc_port < 0 else args.grpc_port,
        api_key=api_key, tls=tls, served_model_name=args.served_model_name, grace_s=args.grace,
        log_level=args.log_level, max_in_flight=args.max_in_flight or None,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        generation_config=args.generation_config, chat_template=chat_template,
    )
    asyncio.run(run_forever(backend, opts, announce=lambda line: print(line, flush=True)))
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key``, ``--api-key-file``, ``SPLITSERVE_API_KEY_FILE`` or
    ``SPLITSERVE_API_KEY`` (first found); the variable is removed from the environment."""
    from splitserve import env

    from_env = env.SPLITSERVE_API_KEY.take()
    if args.api_key and args.api_key_file:
        raise ConfigError("give --api-key or --api-key-file, not both")
    if args.api_key:
        print("warning: --api-key shows in process lists; prefer SPLITSERVE_API_KEY or "
              "--api-key-file", file=sys.stderr)
        return str(args.api_key)
    path = args.api_key_file or env.SPLITSERVE_API_KEY_FILE.get()
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise ConfigError(f"--api-key-file: cannot read {path!r}: {e.strerror}") from e
        if not key:
            raise ConfigError(f"--api-key-file: {path!r} holds no key")
        return key
    return from_env or None


_ENGINE_FLAGS = ("max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
                 "block_size", "seed", "pooler_config", "scheduling_policy")
"""Scheduler and cache flags that stay unset (None) unless given."""
_ROLE_FLAGS = ("max_num_seqs", "max_num_batched_tokens")
"""Of those, the per-role settings of a cluster (every prefill and decode worker's)."""


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--single-engine``'s ``EngineConfig`` fields from the flags."""
    kwargs: dict[str, Any] = dict(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype,
        quantization=args.quantization, int4_group_size=args.int4_group_size,
        kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, num_threads=args.num_threads,
        device=args.device, speculative_config=args.speculative_config,
    )
    kwargs.update({k: getattr(args, k) for k in _ENGINE_FLAGS if getattr(args, k) is not None})
    return kwargs


def _apply_engine_flags(data: dict[str, Any], args: argparse.Namespace) -> None:
    """The given scheduler / cache flags into cluster settings ``data`` (YAML-shaped)."""
    for key in _ENGINE_FLAGS:
        value = getattr(args, key, None)
        if value is None:
            continue
        if key in _ROLE_FLAGS:
            for role in ("prefill", "decode"):
                data.setdefault("roles", {}).setdefault(role, {})[key] = value
        else:
            data[key] = value


def _cluster_config(args: argparse.Namespace) -> tuple[Any, str]:
    """The cluster to start and its layout in words: ``--config`` YAML, or the local default
    (``cluster/layout.py``: 1 decode worker that prefills every prompt unless this machine
    has a device per role, then 1 prefill + 1 decode; plus 1 encode worker for a multimodal
    model); ``--prefill-workers`` / ``--decode-workers`` set the counts; CLI overrides."""
    from splitserve.cluster.config import ClusterConfig, is_multimodal_model

    overrides: dict[str, Any] = {
        "tokenizer": args.tokenizer, "dtype": args.dtype,
        "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
        "quantization": args.quantization, "int4_group_size": args.int4_group_size,
        "kv_cache_dtype": args.kv_cache_dtype}
    if args.max_model_len is not None:
        overrides["max_model_len"] = args.max_model_len
    if args.config is None and args.speculative_config is not None:
        overrides["roles"] = {"decode": {"speculative_config": args.speculative_config}}
    _apply_engine_flags(overrides, args)
    runtime = getattr(args, "runtime", "auto")
    if args.config is None:
        encode = 1 if is_multimodal_model(args.model) else 0  # a vision tower: + 1 encode
        prefill, decode, layout = _local_layout(args, overrides)
        if runtime == "auto":
            # colocated CPU workers on this machine need nothing of Ray, whose daemons and
            # threads cost the engine 5-7% of a 2-core machine (docs/serving.md)
            local_cpu = prefill == 0 and encode == 0 and "num_gpus" not in overrides.get("ray", {})
            runtime = "processes" if local_cpu else "ray"
        config = ClusterConfig.local(prefill=prefill, decode=decode, encode=encode,
                                     model=args.model, runtime=runtime, **overrides)
        return config, layout
    config = ClusterConfig.from_yaml(args.config)
    data = config.model_dump()
    if args.model is not None:
        data["model"] = args.model
    if args.tokenizer is not None:
        data["tokenizer"] = args.tokenizer
    if args.speculative_config is not None:
        data["roles"]["decode"]["speculative_config"] = args.speculative_config
    _apply_engine_flags(data, args)
    for key in _OVER_CONFIG:  # given flags over the file's values; defaults do not
        if key in getattr(args, "given", ()):
            data[key] = getattr(args, key)
    for role in ("prefill", "decode"):
        count = getattr(args, f"{role}_workers")
        if count is not None:
            data["roles"][role]["replicas"] = count
    if runtime != "auto":
        data["runtime"] = runtime
    config = ClusterConfig.from_dict(data, source=args.config)
    roles = ", ".join(f"{rc.replicas} {name}" for name, rc in config.roles.items() if rc.replicas)
    return config, f"as configured in {args.config} ({roles})"


def _local_layout(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[int, int, str]:
    """(prefill, decode, layout in words) of a cluster on this machine; with ``--device cuda``
    each worker owns a GPU (``overrides`` gains ``num_gpus``)."""
    from splitserve.cluster.layout import choose_layout, detect_devices

    try:
        devices = detect_devices(args.device)
        layout = choose_layout(devices)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    prefill, decode, reason = layout.prefill, layout.decode, layout.reason
    if args.prefill_workers is not None or args.decode_workers is not None:
        prefill = 1 if args.prefill_workers is None else args.prefill_workers
        decode = 1 if args.decode_workers is None else args.decode_workers
        shape = "colocated" if prefill == 0 else "disaggregated"
        reason = (f"{shape}: {prefill} prefill + {decode} decode worker(s), as asked "
                  "(--prefill-workers / --decode-workers)")
    if devices.kind == "cuda":
        roles = overrides.setdefault("roles", {})
        for role in ("prefill", "decode"):
            roles[role] = {**roles.get(role, {}), "num_gpus": 1}
        overrides["ray"] = {"num_gpus": devices.count}
    return prefill, decode, reason


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser(
        "serve",
        help="serve the OpenAI HTTP and gRPC APIs from a local cluster (or --single-engine)",
        description="Serve the OpenAI HTTP API and the gRPC API. By default a local cluster "
        "runs the model: 1 prefill + 1 decode worker on Ray when this machine has a device per "
        "role (GPUs with --device cuda, or NUMA nodes), else 1 decode worker that prefills every "
        "prompt, a child process of the server (plus 1 encode worker for a multimodal model, "
        "on Ray); --prefill-workers / "
        "--decode-workers set the counts, --config describes another cluster, --single-engine "
        "serves from this process. Ctrl-C or SIGTERM drains and stops.",
    )
    srv.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded SmolLM2)")
    srv.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    srv.add_argument("--config", default=None,
                     help="cluster YAML (default: workers on this machine, see --prefill-workers)")
    srv.add_argument("--prefill-workers", type=_count(0), default=None, metavar="N",
                     help="prefill workers (0: decode workers prefill every prompt); default: "
                     "1 when this machine has a device per role (GPUs, NUMA nodes), else 0")
    srv.add_argument("--decode-workers", type=_count(1), default=None, metavar="N",
                     help="decode workers (default 1)")
    srv.add_argument("--single-engine", action="store_true",
                     help="serve from one in-process engine instead of the cluster")
    srv.add_argument("--runtime", choices=["auto", "ray", "processes"], default="auto",
                     help="what runs the workers: Ray actors, or child processes of the server "
                     "(no Ray); auto: processes for the colocated CPU default, else Ray (with "
                     "--config: the file's runtime)")
    srv.add_argument("--served-model-name", default=None, help="name clients use (default: id)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free one)")
    srv.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (-1: no gRPC)")
    srv.add_argument("--api-key", default=None,
                     help="require Authorization: Bearer KEY (visible in process lists: prefer "
                     "SPLITSERVE_API_KEY or --api-key-file)")
    srv.add_argument("--api-key-file", default=None,
                     help="read the API key from this file's first line (or set "
                     "SPLITSERVE_API_KEY_FILE / SPLITSERVE_API_KEY)")
    srv.add_argument("--ssl-certfile", default=None, help="PEM certificate: serve HTTPS and gRPC TLS")
    srv.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile")
    srv.add_argument("--ssl-client-ca", default=None,
                     help="PEM CA: require client certificates it signed (mutual TLS)")
    srv.add_argument("--grace", type=float, default=10.0, help="drain seconds on Ctrl-C/SIGTERM")
    _add_format_arguments(srv)
    srv.add_argument("--device", default="cpu", help="torch device of the engine (cpu, cuda)")
    srv.add_argument("--max-model-len", type=int, default=None, action=_Given)
    srv.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", dest="kv_cache_memory_bytes",
                     action=_Given,
                     type=_byte_size, default=1 << 30,
                     help="KV cache per engine: bytes or a size such as 512MiB (default 1GiB)")
    srv.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    # vLLM's scheduler and cache flags: each worker's (or the single engine's); unset, the
    # defaults (or a --config file's values) stand
    srv.add_argument("--max-num-seqs", type=_count(1), default=None, metavar="N",
                     help="most sequences in one step of each worker (default 128)")
    srv.add_argument("--max-num-batched-tokens", type=_count(1), default=None, metavar="N",
                     help="token budget of one step of each worker (default 2048)")
    srv.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                     default=None, help="reuse KV of shared prompt prefixes (default: on)")
    srv.add_argument("--block-size", type=_count(1), default=None, metavar="N",
                     help="tokens per KV block, a power of two (default 16)")
    srv.add_argument("--seed", type=int, default=None,
                     help="seed of requests that give none (default 0)")
    srv.add_argument(
        "--speculative-config", type=_json_object, default=None, metavar="JSON",
        help='draft-free speculative decoding on the decode workers (or the single engine), '
             'e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' (default: off)',
    )
    srv.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default=None,
                     help="fcfs (default) or priority: requests' priority (lower first) "
                          "orders admission and preemption on every worker")
    srv.add_argument(
        "--pooler-config", type=_json_object, default=None, metavar="JSON",
        help='/v1/embeddings\' pooling on every worker, vLLM\'s keys, e.g. '
             '\'{"pooling_type": "MEAN", "normalize": true}\' (default: the model folder\'s '
             'sentence-transformers config, else LAST, normalized)',
    )
    srv.add_argument("--max-in-flight", type=int, default=512,
                     help="requests admitted at once, beyond: 429 / RESOURCE_EXHAUSTED (0: no limit)")
    srv.add_argument("--log-level", "--uvicorn-log-level", default="warning",
                     help="uvicorn log level")
    from splitserve.cluster.frontends import reasoning_parsers, tool_parsers  # light: no torch

    srv.add_argument("--tool-call-parser", default=None, choices=sorted(tool_parsers.PARSERS),
                     help="parse tool calls out of the model's text (needed for tool_choice auto)")
    srv.add_argument("--enable-auto-tool-choice", action="store_true",
                     help="vLLM's switch for tool_choice auto: taken for compatibility; here "
                          "--tool-call-parser alone enables it, and the switch needs one")
    srv.add_argument("--reasoning-parser", default=None,
                     choices=sorted(reasoning_parsers.PARSERS),
                     help="chat answers' <think> blocks go to reasoning_content, apart from the "
                          "content")
    srv.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                     help="sampling defaults for fields a request leaves unset: the model "
                          "folder's generation_config.json (auto, as vLLM), none (vllm), or "
                          "DIR/generation_config.json")
    srv.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                     help=CHAT_TEMPLATE_HELP)
    srv.set_defaults(func=_serve)


def _count(minimum: int) -> Any:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _json_object(text: str) -> dict:
    """A command-line JSON object (argparse reports the ValueError with the flag's name)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _bench_serve(args: argparse.Namespace) -> int:
    from splitserve.cluster.tools.bench import main as bench_main

    return bench_main(args)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from splitserve.cluster.tools.bench import add_arguments

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    serve = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server (loopback)")
    add_arguments(serve)
    serve.set_defaults(func=_bench_serve)
    # `bench router` is parsed by the simulator's own parser (main() hands argv over)
    bench_sub.add_parser("router", help="router policies in the cluster simulator")
    bench_sub.add_parser("planner", help="prefill:decode splits and the online planner, simulated")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:
        from splitserve.cluster.tools.batch import main as batch_main

        return batch_main(argv[1:], prog="splitserve batch")
    if argv[:2] == ["bench", "router"]:
        from splitserve.router.sim.bench import main as router_main

        return int(router_main(argv[2:]))
    if argv[:2] == ["bench", "planner"]:
        from splitserve.router.sim.planner_bench import main as planner_main

        return int(planner_main(argv[2:]))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
