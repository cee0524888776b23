"""Batch runs: OpenAI batch JSONL in, OpenAI batch output JSONL out, resumable, with progress.

``python -m splitserve.batch --input in.jsonl --output out.jsonl`` (also under
``ray job submit``) reads one request per line (``custom_id``, ``method`` ``POST``, ``url``
``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses`` or ``/v1/embeddings``, ``body``) and appends one result line per
request, in completion order::

    {"id": "batch_req_...", "custom_id": "...", "error": null,
     "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...}}}

Owns: parsing and identifying input lines, per-line errors, the output file (append, flush
and fsync per line; ``--resume`` skips what it holds and cuts a torn last line), progress on
stderr, and choosing the backend (a cluster on the Ray cluster the job was submitted to, a
locally started one, or one in-process engine).

Must not: build response bodies or validate request bodies itself. Every request goes through
the HTTP frontend's own app, in process (``httpx.ASGITransport``, no socket), so a line's
``body`` and ``status_code`` are exactly what ``POST url`` on ``splitserve serve`` returns,
400 validation errors included. Lines that cannot be identified or routed (invalid JSON, no
``custom_id``, a duplicate ``custom_id``, another URL or method, no body) get
``"response": null`` and ``"error": {"code", "message"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from splitserve.cluster.frontends.backend import Backend
from splitserve.cluster.frontends.http_server import (
    APIError,
    build_app,
    lone_surrogate_field,
    lone_surrogate_message,
)
from splitserve.cluster.tools.cli import CHAT_TEMPLATE_HELP, TOKENIZER_HELP
from splitserve.errors import SplitserveError

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
"""Endpoints a batch line may name (OpenAI's batch API also has embeddings: not served)."""
DUPLICATE = "duplicate_custom_id"
"""Error code of a line whose ``custom_id`` an earlier line already used."""
DEFAULT_MAX_CONCURRENCY = 64


class BatchFileError(SplitserveError):
    """The input or output file cannot be used (exists without --resume, unreadable, corrupt)."""


# ---------------------------------------------------------------------- input lines


@dataclass(frozen=True)
class BatchLine:
    """One input line: a request to run, or the error it gets instead."""

    line_no: int
    """1-based line number in the input (error messages name it)."""
    custom_id: str | None
    """The caller's id (None when the line has none we can read)."""
    url: str = ""
    """Endpoint to post ``body`` to."""
    body: Any = None
    """The OpenAI request body, passed to the endpoint as is."""
    error: tuple[str, str] | None = None
    """(code, message) when the line is not run."""


def parse_line(line_no: int, text: str) -> BatchLine:
    """Identify one input line; anything that keeps it from being run becomes its ``error``."""
    try:
        data = json.loads(text)
    except ValueError as e:
        return BatchLine(line_no, None, error=("invalid_json", f"line {line_no}: not JSON: {e}"))
    if not isinstance(data, dict):
        return BatchLine(line_no, None,
                         error=("invalid_request", f"line {line_no}: not a JSON object"))
    custom_id = data.get("custom_id")
    if (field := lone_surrogate_field(text.encode("utf-8"))) is not None:
        # not text (the server answers such a body with a 400): it cannot be posted, nor an
        # id holding one written back
        named = custom_id if isinstance(custom_id, str) and field != "custom_id" else None
        return BatchLine(line_no, named or None, error=(
            "invalid_request", f"line {line_no}: {lone_surrogate_message(field)}"))
    if not isinstance(custom_id, str) or not custom_id:
        return BatchLine(line_no, None, error=(
            "missing_custom_id", f"line {line_no}: custom_id must be a non-empty string"))
    url, body = data.get("url"), data.get("body")
    return BatchLine(line_no, custom_id, str(url), body,
                     _routing_error(line_no, data.get("method"), url, body))


def _routing_error(line_no: int, method: Any, url: Any, body: Any) -> tuple[str, str] | None:
    if method != "POST":
        return "invalid_method", f"line {line_no}: method must be \"POST\", got {method!r}"
    if url not in BATCH_URLS:
        return "invalid_url", f"line {line_no}: url must be one of {list(BATCH_URLS)}, got {url!r}"
    if body is None:
        return "missing_body", f"line {line_no}: no body (the OpenAI request body)"
    return None


def read_input(path: Path) -> list[BatchLine]:
    """Every non-blank line of the input, parsed; later uses of a ``custom_id`` are errors
    (OpenAI requires them unique: a result must map back to one request)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BatchFileError(f"--input {path}: cannot read: {e}") from None
    lines, seen = [], set()
    for i, text in enumerate(raw.splitlines(), start=1):
        if not text.strip():
            continue
        line = parse_line(i, text)
        if line.custom_id is not None and line.custom_id in seen:
            line = BatchLine(i, line.custom_id, error=(
                DUPLICATE, f"line {i}: custom_id {line.custom_id!r} is used by an earlier line"))
        elif line.custom_id is not None:
            seen.add(line.custom_id)
        lines.append(line)
    return lines


# ---------------------------------------------------------------------- output file


@dataclass
class Finished:
    """What an existing output file already holds (what ``--resume`` must not write again)."""

    ids: set[str] = field(default_factory=set)
    """custom_ids with their result line (response or error)."""
    duplicates: Counter[str] = field(default_factory=Counter)
    """custom_id -> duplicate-id error lines written for it."""
    unidentified: int = 0
    """Error lines without a custom_id (written first, in input order)."""

    def add(self, record: dict[str, Any]) -> None:
        custom_id = record.get("custom_id")
        if custom_id is None:
            self.unidentified += 1
        elif (record.get("error") or {}).get("code") == DUPLICATE:
            self.duplicates[custom_id] += 1
        else:
            self.ids.add(custom_id)


def read_finished(path: Path) -> Finished:
    """Lines already written to ``path``; a torn last line (a crash mid-write) is cut away.

    A corrupt line before the last one means someone else wrote the file: refused, because
    resuming could then write a custom_id twice.
    """
    done = Finished()
    if not path.exists():
        return done
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # what follows the last newline is an unfinished write
    lines = data[:end].split(b"\n")[:-1]
    for i, raw in enumerate(lines):
        record = _record(raw) if raw.strip() else {}
        if record is None and i < len(lines) - 1:
            raise BatchFileError(f"--output {path}: line {i + 1} is not a batch output line; "
                                 "refusing to resume into it")
        if record is None:
            end -= len(raw) + 1
        elif record:
            done.add(record)
    if end < len(data):
        _truncate(path, end)
    return done


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "custom_id" in record else None


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def pending(lines: Sequence[BatchLine], done: Finished) -> list[BatchLine]:
    """The lines ``done`` does not account for yet, in input order."""
    unidentified, duplicates = done.unidentified, Counter(done.duplicates)
    todo = []
    for line in lines:
        if line.custom_id is None:
            if unidentified > 0:
                unidentified -= 1
                continue
        elif line.error is not None and line.error[0] == DUPLICATE:
            if duplicates[line.custom_id] > 0:
                duplicates[line.custom_id] -= 1
                continue
        elif line.custom_id in done.ids:
            continue
        todo.append(line)
    return todo


class OutputWriter:
    """Appends result lines; each is flushed and fsynced before the next request counts as
    done, so a crash loses at most the line being written (and ``--resume`` cuts it)."""

    def __init__(self, path: Path) -> None:
        self.file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def error_record(line: BatchLine) -> dict[str, Any]:
    """The output line of a line that was not run."""
    assert line.error is not None
    code, message = line.error
    return {"id": _batch_req_id(), "custom_id": line.custom_id, "response": None,
            "error": {"code": code, "message": message}}


def response_record(custom_id: str, status: int, request_id: str, body: Any) -> dict[str, Any]:
    """The output line of a request that ran (whatever its status code)."""
    return {"id": _batch_req_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None}


def _batch_req_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


# ---------------------------------------------------------------------- progress


class Progress:
    """``done/total``, failures, req/s and tok/s on stderr: redrawn in place on a terminal,
    one line every ``interval_s`` otherwise (Ray job logs)."""

    def __init__(self, total: int, skipped: int, stream: IO[str], interval_s: float = 2.0) -> None:
        self.total, self.skipped, self.stream = total, skipped, stream
        self.tty = stream.isatty()
        self.interval_s = 0.2 if self.tty else interval_s
        self.done = self.failed = self.tokens = 0
        self.start = self.last = time.monotonic()

    def add(self, ok: bool, tokens: int) -> None:
        self.done += 1
        self.failed += not ok
        self.tokens += tokens
        if time.monotonic() - self.last >= self.interval_s:
            self.show()

    def show(self, final: bool = False) -> None:
        self.last = time.monotonic()
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + self.line(), end=end, file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = f", eta {(self.total - self.done) / rate:.0f}s" if self.done else ""
        skipped = f", {self.skipped} skipped (done before)" if self.skipped else ""
        return (f"batch: {self.done}/{self.total} done, {self.failed} failed{skipped}, "
                f"{rate:.2f} req/s, {self.tokens / elapsed:.1f} tok/s, "
                f"{elapsed:.0f}s{eta}")


# ---------------------------------------------------------------------- the run


@dataclass(frozen=True)
class BatchSummary:
    """What one run did (``main`` prints it; tests check it)."""

    total: int
    """Input lines (requests and errors)."""
    skipped: int
    """Lines an earlier run had finished (``--resume``)."""
    written: int
    """Lines this run wrote."""
    failed: int
    """Of those, lines with an error or a non-200 response."""
    completion_tokens: int
    """Tokens generated by this run."""
    elapsed_s: float
    """Seconds from reading the files to the last line (the backend's start not included)."""


def check_args(input_path: Path, output_path: Path, resume: bool, max_concurrency: int) -> None:
    """Refuse what cannot work before anything starts; an existing output needs ``--resume``
    (results are never overwritten)."""
    if output_path.exists() and not resume:
        raise BatchFileError(f"--output {output_path} exists; pass --resume to continue it, or "
                             "choose another path (results are never overwritten)")
    if output_path.is_dir() or not output_path.parent.is_dir():
        raise BatchFileError(f"--output {output_path}: not a file in an existing directory")
    if not input_path.is_file():
        raise BatchFileError(f"--input {input_path}: no such file")
    if max_concurrency < 1:
        raise BatchFileError(f"--max-concurrency must be >= 1, got {max_concurrency}")


async def run_batch(
    backend: Backend, input_path: Path, output_path: Path, *, resume: bool = False,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY, served_model_name: str | None = None,
    progress_stream: IO[str] | None = None,
) -> BatchSummary:
    """Run every line of ``input_path`` not yet in ``output_path`` through ``backend``."""
    check_args(input_path, output_path, resume, max_concurrency)
    lines = read_input(input_path)
    todo = pending(lines, read_finished(output_path))
    progress = Progress(len(todo), len(lines) - len(todo), progress_stream or sys.stderr)
    writer = OutputWriter(output_path)
    try:
        runner = _Runner(backend, writer, progress, served_model_name)
        await runner.run(todo, max_concurrency)
    finally:
        writer.close()
        progress.show(final=True)
    return BatchSummary(len(lines), progress.skipped, progress.done, progress.failed,
                        progress.tokens, time.monotonic() - progress.start)


class _Runner:
    """Posts lines to the in-process HTTP app and writes what comes back."""

    def __init__(self, backend: Backend, writer: OutputWriter, progress: Progress,
                 served_model_name: str | None) -> None:
        self.writer, self.progress = writer, progress
        app = build_app(backend, served_model_name=served_model_name)
        # raise_app_exceptions=False: a bug in one request is that line's 500, not the job's end
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://batch",
                                        timeout=None)

    async def run(self, lines: Sequence[BatchLine], max_concurrency: int) -> None:
        # Unrunnable lines first, in input order: that order is what lets --resume count them.
        for line in lines:
            if line.error is not None:
                self._write(error_record(line), ok=False, tokens=0)
        runnable = iter([line for line in lines if line.error is None])
        try:
            await asyncio.gather(*(self._worker(runnable) for _ in range(max_concurrency)))
        finally:
            await self.client.aclose()

    async def _worker(self, lines: Iterable[BatchLine]) -> None:
        for line in lines:  # the iterator is shared: each line goes to one worker
            await self._run_line(line)

    async def _run_line(self, line: BatchLine) -> None:
        assert line.custom_id is not None
        if isinstance(line.body, dict) and line.body.get("stream"):
            err = APIError(400, "stream is not supported in batch requests", param="stream")
            self._write(response_record(line.custom_id, 400, _batch_req_id(), err.body()),
                        ok=False, tokens=0)
            return
        resp = await self.client.post(line.url, json=line.body)
        body = _json_body(resp)
        request_id = resp.headers.get("x-request-id") or _batch_req_id()
        tokens = _completion_tokens(body) if resp.status_code == 200 else 0
        self._write(response_record(line.custom_id, resp.status_code, request_id, body),
                    ok=resp.status_code == 200, tokens=tokens)

    def _write(self, record: dict[str, Any], ok: bool, tokens: int) -> None:
        self.writer.write(record)
        self.progress.add(ok, tokens)


def _json_body(resp: httpx.Response) -> Any:
    """The response's JSON; the app answers JSON on every path, but a line must never end
    the run, so anything else becomes an OpenAI error body."""
    try:
        return resp.json()
    except ValueError:
        return APIError(resp.status_code, f"non-JSON response: {resp.text[:200]!r}",
                        "internal_error").body()


def _completion_tokens(body: Any) -> int:
    usage = body.get("usage") if isinstance(body, dict) else None
    return int(usage.get("completion_tokens", 0)) if isinstance(usage, dict) else 0


# ---------------------------------------------------------------------- backend and CLI


def cluster_config(args: argparse.Namespace) -> Any:
    """The cluster to run on: ``--config``; else, joining the Ray cluster at ``--address`` or
    ``RAY_ADDRESS`` (set by ``ray job submit``) so a job starts its workers as actors on the
    cluster it was submitted to, 1 prefill + 1 decode worker; else, on this machine alone,
    the layout ``splitserve serve`` picks (``cluster/layout.py``: 1 decode worker that
    prefills every prompt unless every role has a device of its own)."""
    from splitserve.cluster.config import ClusterConfig
    from splitserve.cluster.layout import choose_layout, detect_devices

    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.config is not None:
        data = ClusterConfig.from_yaml(args.config).model_dump(mode="json")
    elif address:
        data = ClusterConfig.local(prefill=1, decode=1).model_dump(mode="json")
    else:
        layout = choose_layout(detect_devices("cpu"))
        data = ClusterConfig.local(prefill=layout.prefill, decode=layout.decode
                                   ).model_dump(mode="json")
    if args.model is not None:
        data["model"] = args.model
    if args.tokenizer is not None:
        data["tokenizer"] = args.tokenizer
    if args.kv_cache_memory_bytes is not None:
        data["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if address and data["ray"]["address"] is None:
        # An existing Ray's resources were set where it started; local-start settings go.
        data["ray"].update(address=address, num_cpus=None, num_gpus=None, resources={})
    if data["ray"]["address"] is not None:
        # Inside a job, the launcher's ray.init(runtime_env=UCX_*...) would clash with the same
        # variables in the job's --runtime-env-json; both come from this process's environment,
        # so letting ray.init's win changes no value.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    return ClusterConfig.from_dict(data, source=args.config or "splitserve.batch")


def build_backend(args: argparse.Namespace) -> Backend:
    """One in-process engine (``--single-engine``) or the cluster (blocks until it is up)."""
    from splitserve.cluster.frontends.backend import ClusterBackend, EngineBackend

    if args.single_engine:
        kwargs: dict[str, Any] = {"model": args.model, "tokenizer": args.tokenizer}
        if args.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
        return EngineBackend.from_config(**kwargs)
    return ClusterBackend.from_config(cluster_config(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch options (shared by ``python -m splitserve.batch`` and ``splitserve batch``)."""
    parser.add_argument("--input", required=True, type=Path, help="OpenAI batch input JSONL")
    parser.add_argument("--output", required=True, type=Path,
                        help="output JSONL (refused if it exists, unless --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: skip the custom_ids in --output")
    parser.add_argument("--model", default=None,
                        help="HF folder or .gguf (default: embedded SmolLM2; absolute under Ray)")
    parser.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    parser.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                        help=CHAT_TEMPLATE_HELP)
    parser.add_argument("--config", default=None,
                        help="cluster YAML (default: the layout `splitserve serve` picks on "
                             "this machine; 1P + 1D when joining a Ray cluster)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else start one)")
    parser.add_argument("--single-engine", action="store_true",
                        help="run on one in-process engine instead of a cluster")
    parser.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                        help="requests in flight at once")
    parser.add_argument("--served-model-name", default=None,
                        help="model name bodies may use (default: the model id)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="KV cache per worker (default: the config's)")


def run(args: argparse.Namespace) -> int:
    """Check the files, start the backend, run; 0 when every line was written."""
    check_args(args.input, args.output, args.resume, args.max_concurrency)
    template = None
    if args.chat_template is not None:  # a missing file: before any worker starts
        from splitserve.roles.models.tokenizer import load_chat_template

        template = load_chat_template(args.chat_template)
    backend = build_backend(args)
    try:
        if template is not None:
            backend.tokenizer.set_chat_template(template, name="--chat-template")
        summary = asyncio.run(_run_until_signal(backend, args))
    finally:
        asyncio.run(backend.close())
    print(f"batch: wrote {summary.written} lines ({summary.failed} failed) to {args.output} "
          f"in {summary.elapsed_s:.2f}s", file=sys.stderr)
    return 0


async def _run_until_signal(backend: Backend, args: argparse.Namespace) -> BatchSummary:
    """The run, cancelled on SIGTERM (``ray job stop``) so the workers are stopped cleanly."""
    task = asyncio.ensure_future(run_batch(
        backend, args.input, args.output, resume=args.resume,
        max_concurrency=args.max_concurrency, served_model_name=args.served_model_name))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


def main(argv: Sequence[str] | None = None, prog: str = "python -m splitserve.batch") -> int:
    """Exit code: 0 done, 2 unusable files or config, 130 interrupted (rerun with --resume)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run an OpenAI batch file (JSONL) through splitserve; resumable.")
    add_arguments(parser)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("batch: interrupted; rerun with --resume to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
