"""Batch runs as real Ray jobs: ``ray start --head`` on loopback, ``ray job submit`` of
``python -m splitserve.batch`` (tiny model, 1 prefill + 1 decode worker started on that Ray).

A 50-line batch completes with every custom_id once and the single engine's greedy outputs;
a job stopped midway (``ray job stop``) and resubmitted with ``--resume`` finishes the rest
without writing any custom_id twice. Token auth (Ray 2.60's default) is on: the head and every
``ray`` CLI call share ``RAY_AUTH_MODE=token`` and a ``RAY_AUTH_TOKEN`` made for this module.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from splitserve import LLM, SamplingParams
from splitserve.cluster.config import LOCAL_CPU_WORKER_RESOURCE

pytestmark = [pytest.mark.ray, pytest.mark.ucx]

BIN = Path(sys.executable).parent
MAX_TOKENS = 8


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RayHead:
    """A ``ray start --head --block`` process (its SIGTERM handler stops the node's processes)."""

    proc: subprocess.Popen
    dashboard: str
    env: dict[str, str]
    temp_dir: str

    def cli(self, *args: str, timeout: float = 180, check: bool = True
            ) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=check)

    def job(self, *args: str, **kw) -> subprocess.CompletedProcess:
        cmd, rest = args[0], args[1:]
        return self.cli("job", cmd, "--address", self.dashboard, *rest, **kw)


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    gcs, dash, agent, client, metrics = _free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="ssb-", dir="/tmp")  # short: Ray's socket paths live here
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
           "--ray-client-server-port", str(client), "--metrics-export-port", str(metrics),
           "--num-cpus", "2", "--resources", json.dumps({LOCAL_CPU_WORKER_RESOURCE: 8}),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    h = RayHead(proc, f"http://127.0.0.1:{dash}", env, temp_dir)
    try:
        _wait_jobs_api(h)
        yield h
    finally:
        _stop_head(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_jobs_api(h: RayHead, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if h.proc.poll() is not None:
            raise RuntimeError((Path(h.temp_dir) / "ray-start.log").read_text()[-3000:])
        if h.job("list", check=False, timeout=60).returncode == 0:
            return
        time.sleep(1)
    raise TimeoutError("the Ray jobs API did not come up")


def _stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM the ``ray start`` we started (it stops its node); then its process group."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the node we started, if any
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=1024)


def _rows(n: int) -> list[dict]:
    """Alternate chat and completions lines, greedy, distinct prompts."""
    rows = []
    for i in range(n):
        common = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        if i % 2:
            body = {"messages": [{"role": "user", "content": f"Question {i}: why is the sky?"}],
                    **common}
            url = "/v1/chat/completions"
        else:
            body, url = {"prompt": f"Story {i}: once upon a time", **common}, "/v1/completions"
        rows.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    return rows


def _expected(llm: LLM, rows: list[dict]) -> dict[str, str]:
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template(r["body"]["messages"], True) if "messages" in r["body"]
               else r["body"]["prompt"] for r in rows]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params)
    return {r["custom_id"]: o.outputs[0].text for r, o in zip(rows, outs, strict=True)}


def _text(record: dict) -> str:
    choice = record["response"]["body"]["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _submit(head: RayHead, job_id: str, inp: Path, out: Path, model: Path, *extra: str,
            wait: bool = True) -> subprocess.CompletedProcess:
    # No --working-dir: the package is installed in the venv, whose python is named absolutely.
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("UCX_TLS", "UCX_WARN_UNUSED_ENV_VARS")
                                if k in os.environ}}
    args = ["--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env)]
    if not wait:
        args.append("--no-wait")
    entry = [str(BIN / "python"), "-m", "splitserve.batch", "--input", str(inp), "--output",
             str(out), "--model", str(model), "--kv-cache-memory-bytes", str(16 << 20), *extra]
    return head.job("submit", *args, "--", *entry, timeout=600, check=False)


def _status(head: RayHead, job_id: str) -> str:
    return head.job("status", job_id).stdout.lower()


@pytest.mark.extended  # ~50 s with its Ray head: CI runs it (make test-extended)
def test_batch_job_completes_with_single_engine_outputs(head: RayHead, tiny_model_dir, llm,
                                                        tmp_path: Path) -> None:
    rows = _rows(50)
    inp = tmp_path / "in.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[10:10] = ["{not json", json.dumps({**rows[0], "custom_id": "u", "url": "/v1/x"})]
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    res = _submit(head, "batch-full", inp, out, tiny_model_dir, "--max-concurrency", "16")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "succeeded" in _status(head, "batch-full")
    records = _records(out)
    counts = Counter(r["custom_id"] for r in records)
    assert counts == Counter({r["custom_id"]: 1 for r in rows} | {"u": 1, None: 1})
    errors = {r["custom_id"]: r["error"]["code"] for r in records if r["error"]}
    assert errors == {None: "invalid_json", "u": "invalid_url"}
    want = _expected(llm, rows)
    got = {r["custom_id"]: _text(r) for r in records if r["response"]}
    assert all(r["response"]["status_code"] == 200 for r in records if r["response"])
    assert got == want
    logs = head.job("logs", "batch-full").stdout
    assert "batch: 52/52 done, 2 failed" in logs and "tok/s" in logs  # the progress line
    # the same file again without --resume: refused with exit code 2, the output untouched
    before = out.read_bytes()
    again = _submit(head, "batch-refused", inp, out, tiny_model_dir)
    assert again.returncode != 0 and "failed" in _status(head, "batch-refused")
    assert "exists; pass --resume" in head.job("logs", "batch-refused").stdout
    assert out.read_bytes() == before


@pytest.mark.slow  # ~50 s: a job stopped mid-run, then resubmitted with --resume
def test_stopped_job_resumes_without_duplicates(head: RayHead, tiny_model_dir, llm,
                                                tmp_path: Path) -> None:
    rows = _rows(400)  # one at a time: long enough to be stopped midway
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    res = _submit(head, "batch-stopped", inp, out, tiny_model_dir, "--max-concurrency", "1",
                  wait=False)
    assert res.returncode == 0, res.stderr[-2000:]
    deadline = time.monotonic() + 300
    while not out.exists() or len(out.read_text().splitlines()) < 5:
        assert time.monotonic() < deadline, head.job("logs", "batch-stopped").stdout[-3000:]
        time.sleep(0.1)
    head.job("stop", "batch-stopped")
    assert "stopped" in _status(head, "batch-stopped")
    first = out.read_text().splitlines()
    assert 5 <= len(first) < len(rows)
    res = _submit(head, "batch-resumed", inp, out, tiny_model_dir, "--resume",
                  "--max-concurrency", "8")
    assert res.returncode == 0, res.stdout[-4000:]
    records = _records(out)
    kept = [json.loads(line) for line in first[:-1]]  # the last may be torn (then cut)
    assert records[: len(kept)] == kept  # what the stopped run wrote stays
    assert Counter(r["custom_id"] for r in records) == Counter(r["custom_id"] for r in rows)
    assert {r["custom_id"]: _text(r) for r in records} == _expected(llm, rows)
    logs = head.job("logs", "batch-resumed").stdout
    assert "skipped (done before)" in logs
    listed = head.cli("list", "actors", "--address", head.dashboard, "--format", "json").stdout
    actors = json.loads(listed[listed.index("["):])
    workers = [a for a in actors if a["class_name"] in ("PrefillWorker", "DecodeWorker")]
    assert len(workers) >= 4  # both jobs started their own prefill and decode actors ...
    assert all(a["state"] == "DEAD" for a in workers)  # ... and none outlived its job
