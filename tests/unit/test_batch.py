"""Batch runner without Ray: line parsing, per-line errors, output refusal, resume after a
torn write, and whole runs on one in-process engine (tiny model) checked against ``LLM``."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from splitserve import LLM, SamplingParams
from splitserve.cluster.frontends.backend import EngineBackend
from splitserve.cluster.tools.batch import (
    BatchFileError,
    Finished,
    error_record,
    main,
    parse_line,
    pending,
    read_finished,
    read_input,
    run_batch,
)

MAX_TOKENS = 6


def _chat(cid: str, text: str, **extra: object) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, **extra}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _cmpl(cid: str, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body}


def _write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    b = EngineBackend.from_config(model=str(tiny_model_dir), num_kv_blocks=512,
                                  max_model_len=1024)
    yield b
    asyncio.run(b.close())


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=512, max_model_len=1024)


def _run(backend, inp: Path, out: Path, **kw) -> object:
    return asyncio.run(run_batch(backend, inp, out, progress_stream=io.StringIO(), **kw))


# ---------------------------------------------------------------------- parsing (no engine)


@pytest.mark.parametrize(("text", "code"), [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_request"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), "missing_custom_id"),
    (json.dumps({"custom_id": 7, "method": "POST", "url": "/v1/completions", "body": {}}),
     "missing_custom_id"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}),
     "invalid_method"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/audio/speech", "body": {}}),
     "invalid_url"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions"}), "missing_body"),
    # a lone surrogate escape is valid JSON but no text: posting it raised UnicodeEncodeError
    # in the runner, which ended the whole run
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": '
     '"\\ud800"}}', "invalid_request"),
    ('{"custom_id": "\\udfff", "method": "POST", "url": "/v1/completions", "body": {}}',
     "invalid_request"),
])
def test_unrunnable_lines_get_an_error_code(text: str, code: str) -> None:
    line = parse_line(3, text)
    assert line.error is not None and line.error[0] == code and "line 3" in line.error[1]
    if "surrogate" in line.error[1]:  # its record can be written: any id it keeps is text
        assert line.custom_id in (None, "a") and ("body.prompt" in line.error[1]) == bool(
            line.custom_id)
        json.dumps(error_record(line)).encode("utf-8")


def test_runnable_line_keeps_body_as_is() -> None:
    line = parse_line(1, json.dumps(_cmpl("x", "hi")))
    assert line.error is None and line.custom_id == "x" and line.url == "/v1/completions"
    assert line.body["prompt"] == "hi"


def test_duplicates_after_the_first_are_errors(tmp_path: Path) -> None:
    inp = _write_jsonl(tmp_path / "in.jsonl", [_cmpl("a", "x"), _cmpl("b", "y"), "",
                                              _cmpl("a", "z"), _cmpl("a", "w")])
    lines = read_input(inp)
    assert [(ln.line_no, ln.custom_id, ln.error and ln.error[0]) for ln in lines] == [
        (1, "a", None), (2, "b", None), (4, "a", "duplicate_custom_id"),
        (5, "a", "duplicate_custom_id")]


def test_torn_last_line_is_cut_and_counted_lines_are_skipped(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    done_lines = [
        {"id": "1", "custom_id": "a", "response": {"status_code": 200}, "error": None},
        {"id": "2", "custom_id": None, "response": None, "error": {"code": "invalid_json"}},
        {"id": "3", "custom_id": "a", "response": None,
         "error": {"code": "duplicate_custom_id"}},
    ]
    good = "".join(json.dumps(r) + "\n" for r in done_lines)
    out.write_text(good + '{"id": "4", "custom_id": "b", "respo')
    done = read_finished(out)
    assert out.read_text() == good  # the torn tail is gone, nothing else touched
    assert done.ids == {"a"} and done.unidentified == 1 and done.duplicates == Counter(a=1)
    inp = _write_jsonl(tmp_path / "in.jsonl", [
        "{bad", _cmpl("a", "x"), "{bad again", _cmpl("a", "dup1"), _cmpl("a", "dup2"),
        _cmpl("b", "y")])
    todo = pending(read_input(inp), done)
    assert [(ln.line_no, ln.custom_id) for ln in todo] == [(3, None), (5, "a"), (6, "b")]


def test_torn_line_ending_in_newline_is_cut_too(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    first = json.dumps({"id": "1", "custom_id": "a", "response": None, "error": None}) + "\n"
    out.write_text(first + '{"id": "2", "cust\n')
    assert read_finished(out).ids == {"a"} and out.read_text() == first


def test_corrupt_line_before_the_last_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    ok = json.dumps({"id": "1", "custom_id": "a", "response": None, "error": None})
    out.write_text(f"garbage\n{ok}\n")
    with pytest.raises(BatchFileError, match="line 1"):
        read_finished(out)
    assert out.read_text() == f"garbage\n{ok}\n"


def test_existing_output_without_resume_is_refused(tmp_path: Path, capsys) -> None:
    inp = _write_jsonl(tmp_path / "in.jsonl", [_cmpl("a", "x")])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    rc = main(["--input", str(inp), "--output", str(out), "--single-engine"])
    err = capsys.readouterr().err
    assert rc == 2 and "exists" in err and "--resume" in err
    assert out.read_text() == "precious\n"


def test_cli_subcommand_refuses_too(tmp_path: Path, capsys) -> None:
    from splitserve.cluster.tools.cli import main as cli_main

    inp = _write_jsonl(tmp_path / "in.jsonl", [_cmpl("a", "x")])
    (tmp_path / "out.jsonl").write_text("")
    rc = cli_main(["batch", "--input", str(inp), "--output", str(tmp_path / "out.jsonl")])
    assert rc == 2 and "exists; pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--input", "nope.jsonl"], "no such file"),
    (["--input", "in.jsonl", "--max-concurrency", "0"], "--max-concurrency must be >= 1"),
])
def test_unusable_arguments_are_exit_2(tmp_path: Path, capsys, extra, message) -> None:
    _write_jsonl(tmp_path / "in.jsonl", [_cmpl("a", "x")])
    extra = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in extra]
    rc = main([*extra, "--output", str(tmp_path / "o.jsonl"), "--single-engine"])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_pending_of_an_empty_output_is_everything(tmp_path: Path) -> None:
    inp = _write_jsonl(tmp_path / "in.jsonl", ["{bad", _cmpl("a", "x"), _cmpl("a", "y")])
    assert len(pending(read_input(inp), Finished())) == 3


# ---------------------------------------------------------------------- runs on one engine


def test_mixed_batch_gives_one_line_per_input_line(backend, llm, tmp_path: Path) -> None:
    rows: list[dict | str] = [
        _chat("chat-1", "Hello there"),
        _cmpl("cmpl-1", "Once upon a time"),
        "{this is not json",
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
        {"custom_id": "url", "method": "POST", "url": "/v1/audio/speech", "body": {"input": "x"}},
        {"custom_id": "embd-1", "method": "POST", "url": "/v1/embeddings",
         "body": {"input": ["Hello there", "Once upon a time"], "encoding_format": "float"}},
        _chat("chat-1", "duplicate id"),
        {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions",
         "body": {"max_tokens": 3}},
        {"custom_id": "bad-temp", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "temperature": 9}},
        _chat("stream", "hi", stream=True),
        _chat("wrong-model", "hi", model="gpt-4o"),
        # valid JSON but no text: posting it ended the whole run (UnicodeEncodeError)
        '{"custom_id": "surrogate", "method": "POST", "url": "/v1/completions", '
        '"body": {"prompt": "a\\ud800"}}',
        _chat("chat-2", "What is the capital of France?"),
        {"custom_id": "resp-1", "method": "POST", "url": "/v1/responses",
         "body": {"input": "Hello there", "max_output_tokens": MAX_TOKENS, "temperature": 0,
                  "ignore_eos": True, "store": False}},
    ]
    inp = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = _run(backend, inp, out, max_concurrency=4)
    records = _records(out)
    assert len(records) == len(rows) == summary.written
    assert all(r["id"].startswith("batch_req_") for r in records)
    by_id: dict[str | None, list[dict]] = {}
    for r in records:
        by_id.setdefault(r["custom_id"], []).append(r)
    # unidentifiable lines: error object, no response
    assert sorted(r["error"]["code"] for r in by_id[None]) == ["invalid_json",
                                                               "missing_custom_id"]
    assert by_id["url"][0]["error"]["code"] == "invalid_url"
    assert by_id["surrogate"][0]["error"]["code"] == "invalid_request"
    assert "body.prompt" in by_id["surrogate"][0]["error"]["message"]
    chat1 = sorted(by_id["chat-1"], key=lambda r: r["error"] is not None)
    assert chat1[1]["error"]["code"] == "duplicate_custom_id" and chat1[1]["response"] is None
    # request-level validation: a response with the HTTP server's status and error body
    for cid, status, param in [("no-messages", 400, "messages"), ("bad-temp", 400, "temperature"),
                               ("stream", 400, "stream"), ("wrong-model", 404, "model")]:
        (rec,) = by_id[cid]
        assert rec["error"] is None and rec["response"]["status_code"] == status, rec
        assert rec["response"]["body"]["error"]["param"] == param
    assert summary.failed == len(rows) - 5
    # the successes: OpenAI bodies whose text is the single engine's greedy output
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tok = llm.get_tokenizer()
    for cid, text in [("chat-1", "Hello there"), ("chat-2", "What is the capital of France?")]:
        resp = chat1[0]["response"] if cid == "chat-1" else by_id[cid][0]["response"]
        assert resp["status_code"] == 200 and resp["request_id"].startswith("chatcmpl-")
        body = resp["body"]
        assert body["object"] == "chat.completion" and body["id"] == resp["request_id"]
        ids = tok.apply_chat_template([{"role": "user", "content": text}], True)
        want = llm.generate([ids], params)[0].outputs[0]
        assert body["choices"][0]["message"]["content"] == want.text
        assert body["usage"]["completion_tokens"] == MAX_TOKENS
    (resp,) = by_id["resp-1"]  # the Responses API: the same answer as chat-1's, as items
    assert resp["response"]["status_code"] == 200 and resp["response"]["request_id"].startswith(
        "resp-")
    assert resp["response"]["body"]["output"][0]["content"][0]["text"] == \
        chat1[0]["response"]["body"]["choices"][0]["message"]["content"]
    (embd,) = by_id["embd-1"]  # embeddings: the engine's vectors, in input order
    assert embd["response"]["status_code"] == 200
    assert [d["embedding"] for d in embd["response"]["body"]["data"]] == [
        o.outputs.embedding for o in llm.embed(["Hello there", "Once upon a time"])]
    (cmpl,) = by_id["cmpl-1"]
    assert cmpl["response"]["body"]["object"] == "text_completion"
    want = llm.generate(["Once upon a time"], params)[0].outputs[0].text
    assert cmpl["response"]["body"]["choices"][0]["text"] == want


def test_resume_after_an_interrupted_run_writes_each_id_once(backend, tmp_path: Path) -> None:
    rows: list[dict | str] = [_cmpl(f"r{i}", f"prompt number {i}") for i in range(24)]
    rows[5] = "{broken"
    rows[9] = _cmpl("r3", "duplicate")
    inp = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"

    async def interrupted() -> None:
        task = asyncio.ensure_future(run_batch(backend, inp, out, max_concurrency=2,
                                               progress_stream=io.StringIO()))
        while not out.exists() or len(out.read_text().splitlines()) < 6:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    first = _records(out)
    assert 6 <= len(first) < len(rows)
    with out.open("a") as f:  # a crash in the middle of a write
        f.write('{"id": "batch_req_x", "custom_id": "r2')
    with pytest.raises(BatchFileError, match="--resume"):
        _run(backend, inp, out)
    summary = _run(backend, inp, out, resume=True)
    records = _records(out)
    assert records[: len(first)] == first and summary.skipped == len(first)
    assert len(records) == len(rows)
    ids = Counter(r["custom_id"] for r in records)
    assert ids[None] == 1 and ids["r3"] == 2  # one broken line, one duplicate error
    singles = {k for k, v in ids.items() if v == 1 and k is not None}
    assert singles == {f"r{i}" for i in range(24)} - {"r5", "r9", "r3"}
    assert all(r["response"]["status_code"] == 200 for r in records
               if r["custom_id"] and r["error"] is None)
    again = _run(backend, inp, out, resume=True)  # nothing left: nothing written
    assert again.written == 0 and _records(out) == records


def test_main_single_engine_end_to_end(tiny_model_dir, tmp_path: Path, capsys) -> None:
    inp = _write_jsonl(tmp_path / "in.jsonl", [_cmpl("a", "x"), _chat("b", "y")])
    out = tmp_path / "out.jsonl"
    rc = main(["--input", str(inp), "--output", str(out), "--single-engine",
               "--model", str(tiny_model_dir), "--kv-cache-memory-bytes", str(16 << 20)])
    assert rc == 0
    assert sorted(r["custom_id"] for r in _records(out)) == ["a", "b"]
    err = capsys.readouterr().err
    assert "batch: 2/2 done, 0 failed" in err and "tok/s" in err


def test_entry_shim_is_lazy() -> None:
    """``splitserve/batch.py`` sits in the root layer: importing it loads nothing above it."""
    import subprocess
    import sys

    code = ("import sys, splitserve.batch; "
            "print(sorted(m for m in ('torch', 'ray', 'splitserve.cluster') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip() == "[]"


def test_output_in_a_missing_directory_is_exit_2(tmp_path: Path, capsys) -> None:
    inp = _write_jsonl(tmp_path / "in.jsonl", [_cmpl("a", "x")])
    rc = main(["--input", str(inp), "--output", str(tmp_path / "no" / "o.jsonl"),
               "--single-engine"])
    assert rc == 2 and "existing directory" in capsys.readouterr().err


def test_a_job_joins_the_ray_it_was_submitted_to(tmp_path: Path, monkeypatch) -> None:
    """Under ``ray job submit`` (RAY_ADDRESS set) the cluster joins that Ray: no local start
    settings, workers still asking the default config's resources."""
    import argparse

    from splitserve.cluster.tools.batch import cluster_config

    args = argparse.Namespace(config=None, model="/m", tokenizer=None,
                              kv_cache_memory_bytes=1 << 20, address=None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_OVERRIDE_JOB_RUNTIME_ENV", raising=False)  # restored afterwards
    local = cluster_config(args)
    assert local.ray.address is None and local.ray.num_cpus == 2
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    joined = cluster_config(args)
    assert (joined.roles.prefill.replicas, joined.roles.decode.replicas) == (1, 1)
    assert joined.ray.address == "10.0.0.1:6379" and joined.ray.resources == {}
    assert joined.ray.num_cpus is None and joined.model == "/m"
    assert joined.roles.decode.resources == local.roles.decode.resources
    assert joined.kv_cache_memory_bytes == 1 << 20
    assert os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"  # job env_vars may repeat UCX_*
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("ray:\n  num_cpus: 4\nroles:\n  decode:\n    replicas: 2\n")
    from_yaml = cluster_config(argparse.Namespace(config=str(yaml_file), model=None,
                                                  tokenizer=None, kv_cache_memory_bytes=None,
                                                  address="auto"))
    assert from_yaml.ray.address == "auto" and from_yaml.ray.num_cpus is None
    assert from_yaml.roles.decode.replicas == 2


@pytest.mark.parametrize(("numa", "prefill", "local_prefill"), [(1, 0, "all"), (2, 1, 63)])
def test_a_local_job_takes_the_layout_serve_takes(
    monkeypatch, numa: int, prefill: int, local_prefill: object
) -> None:
    """Alone on a machine with fewer devices than roles, a batch job runs one decode worker
    that prefills every prompt (as ``splitserve serve``); with a NUMA node per role, 1P+1D."""
    import argparse

    from splitserve.cluster import layout
    from splitserve.cluster.tools.batch import cluster_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(layout, "numa_nodes", lambda: numa)
    config = cluster_config(argparse.Namespace(config=None, model=None, tokenizer=None,
                                               kv_cache_memory_bytes=None, address=None))
    assert (config.roles.prefill.replicas, config.roles.decode.replicas) == (prefill, 1)
    assert config.router.local_prefill_max_tokens == local_prefill
