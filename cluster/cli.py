"""The ``splitserve`` command line: generate (single engine); serve and bench come later."""

from __future__ import annotations

import argparse
import json
import sys

from splitserve.errors import SplitserveError


def _generate(args: argparse.Namespace) -> int:
    from splitserve import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed,
    )
    llm = LLM(args.model, dtype=args.dtype)
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
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=_generate)
    _add_serve_parser(sub)
    _add_bench_parser(sub)
    # `batch` is parsed by the batch runner's own parser (main() hands argv over)
    sub.add_parser("batch", help="run an OpenAI batch file (same as python -m splitserve.batch)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from splitserve.cluster.backend import Backend, ClusterBackend, EngineBackend
    from splitserve.cluster.serve import ServeOptions, run_forever

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    backend: Backend
    if args.single_engine:
        backend = EngineBackend.from_config(
            model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes, num_threads=args.num_threads,
            device=args.device,
        )
    else:
        backend = ClusterBackend.from_config(_cluster_config(args))
        print(f"cluster: {backend.cluster.status()['roles']} workers on Ray", flush=True)
    opts = ServeOptions(
        host=args.host, port=args.port, grpc_port=None if args.grpc_port < 0 else args.grpc_port,
        api_key=args.api_key, served_model_name=args.served_model_name, grace_s=args.grace,
        log_level=args.log_level, max_in_flight=args.max_in_flight or None,
    )
    asyncio.run(run_forever(backend, opts, announce=lambda line: print(line, flush=True)))
    return 0


def _cluster_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """``--config`` YAML (or the local default: 1 prefill + 1 decode, plus 1 encode worker
    for a multimodal model), with CLI overrides."""
    from splitserve.cluster.config import ClusterConfig, is_multimodal_model

    overrides = {"dtype": args.dtype, "kv_cache_memory_bytes": args.kv_cache_memory_bytes}
    if args.max_model_len is not None:
        overrides["max_model_len"] = args.max_model_len
    if args.config is None:
        encode = 1 if is_multimodal_model(args.model) else 0  # a vision tower: 1E + 1P + 1D
        return ClusterConfig.local(prefill=1, decode=1, encode=encode, model=args.model,
                                   **overrides)
    config = ClusterConfig.from_yaml(args.config)
    if args.model is not None:
        config = config.model_copy(update={"model": args.model})
    return config


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve the OpenAI HTTP and gRPC APIs (one engine for now)")
    srv.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded SmolLM2)")
    srv.add_argument("--config", default=None,
                     help="cluster YAML (default: 1 prefill + 1 decode worker on this machine)")
    srv.add_argument("--single-engine", action="store_true",
                     help="serve from one in-process engine instead of the cluster")
    srv.add_argument("--served-model-name", default=None, help="name clients use (default: id)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free one)")
    srv.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (-1: no gRPC)")
    srv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    srv.add_argument("--grace", type=float, default=10.0, help="drain seconds on Ctrl-C/SIGTERM")
    srv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    srv.add_argument("--device", default="cpu", help="torch device of the engine (cpu, cuda)")
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    srv.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    srv.add_argument("--max-in-flight", type=int, default=512,
                     help="requests admitted at once, beyond: 429 / RESOURCE_EXHAUSTED (0: no limit)")
    srv.add_argument("--log-level", default="warning", help="uvicorn log level")
    srv.set_defaults(func=_serve)


def _bench_serve(args: argparse.Namespace) -> int:
    from splitserve.cluster.bench import main as bench_main

    return bench_main(args)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from splitserve.cluster.bench import add_arguments

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    serve = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server (loopback)")
    add_arguments(serve)
    serve.set_defaults(func=_bench_serve)
    # `bench router` is parsed by the simulator's own parser (main() hands argv over)
    bench_sub.add_parser("router", help="router policies in the cluster simulator")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:
        from splitserve.cluster.batch import main as batch_main

        return batch_main(argv[1:], prog="splitserve batch")
    if argv[:2] == ["bench", "router"]:
        from splitserve.router.sim.bench import main as router_main

        return int(router_main(argv[2:]))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
