"""The API key stays out of process lists, Ray actors' environments and logs.

A real ``splitserve serve --prefill-workers 1`` (local Ray cluster: 1 prefill + 1 decode worker
on the tiny model)
gets its key from ``SPLITSERVE_API_KEY``. While it serves: the key works (the scheme in any
case), no process on the machine has it on its command line, and no process the server
started (Ray's GCS, raylet and the worker actors, found as its descendants) has it in its
environment. Its output never shows it. The file form (``--api-key-file``) and the precedence
of the sources are checked on the CLI's own resolver.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from splitserve import env
from splitserve.cluster.tools.cli import _api_key
from splitserve.errors import ConfigError

pytestmark = pytest.mark.ray


def _environ(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return {}


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return ""


def test_serve_key_from_env_reaches_no_cmdline_actor_env_or_log(tiny_model_dir: Path) -> None:
    key = "sk-" + secrets.token_hex(16)
    cmd = [sys.executable, "-m", "splitserve.cluster.tools.cli", "serve", "--model",
           str(tiny_model_dir), "--port", "0", "--grpc-port", "0", "--grace", "5",
           "--max-model-len", "256", "--prefill-workers", "1"]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPLITSERVE_API_KEY": key}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env)
    output: list[str] = []
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            output.append(line)
            if m := re.search(r"HTTP API on (\S+)/v1", line):
                url = m.group(1)
            if "gRPC InferenceService on" in line:
                break
        assert url is not None, "".join(output)
        r = httpx.get(url + "/v1/models", timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = httpx.get(url + "/v1/models", headers={"Authorization": f"bearer {key}"}, timeout=30)
        assert r.status_code == 200
        body = {"prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200, r.text  # the workers served it: they are up

        on_cmdline = [p.pid for p in psutil.process_iter() if key in _cmdline(p)]
        assert on_cmdline == []
        family = psutil.Process(proc.pid).children(recursive=True)
        actors = [p for p in family
                  if _cmdline(p).startswith(("ray::PrefillWorker", "ray::DecodeWorker"))]
        assert len(actors) >= 2, [_cmdline(p) for p in family]
        leaks = [(p.pid, _cmdline(p)[:60]) for p in family
                 if any(key in v for v in _environ(p).values())]
        assert leaks == []
        # We can read the workers' environments (the check is real) and they run our code.
        assert all("RAY_USAGE_STATS_ENABLED" in _environ(p) for p in actors)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        output.append(rest)
    assert proc.returncode == 0
    assert key not in "".join(output)


def _args(**kw: str | None) -> argparse.Namespace:
    return argparse.Namespace(api_key=kw.get("api_key"), api_key_file=kw.get("api_key_file"))


def test_key_sources_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_text("from-file\n")
    monkeypatch.setenv("SPLITSERVE_API_KEY", "from-env")
    assert _api_key(_args(api_key_file=str(keyfile))) == "from-file"
    assert "SPLITSERVE_API_KEY" not in os.environ  # taken even when another source wins
    monkeypatch.setenv("SPLITSERVE_API_KEY", "from-env")
    assert _api_key(_args()) == "from-env" and "SPLITSERVE_API_KEY" not in os.environ
    monkeypatch.setenv("SPLITSERVE_API_KEY_FILE", str(keyfile))
    assert _api_key(_args()) == "from-file"
    monkeypatch.delenv("SPLITSERVE_API_KEY_FILE")
    assert _api_key(_args()) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="no key"):
        _api_key(_args(api_key_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="cannot read"):
        _api_key(_args(api_key_file=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="not both"):
        _api_key(_args(api_key="k", api_key_file=str(keyfile)))


def test_secret_variables_are_not_forwarded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_API_KEY", "sk-secret")
    monkeypatch.setenv("SPLITSERVE_KERNELS", "torch")
    forwarded = env.forwardable()
    assert forwarded["SPLITSERVE_KERNELS"] == "torch" and "SPLITSERVE_API_KEY" not in forwarded
    env.scrub_secrets()
    assert "SPLITSERVE_API_KEY" not in os.environ
