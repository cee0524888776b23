"""Benchmark: KV blocks between two processes through UCX (shared memory, TCP) and Ray.

Moves 1 MB, 16 MB and 256 MB of paged KV blocks from a serving process to a reading
process, and times an in-process copy of the same bytes (the limit of this machine):

* ``ucx_sm``  - ``UcxTransport(shared_memory=True)`` with ``UCX_TLS=sm,tcp,self``
* ``ucx_tcp`` - ``UcxTransport()`` with ``UCX_TLS=tcp,self``
* ``ray``     - a Ray actor gathers the blocks and returns them through the object store;
                the driver copies them into its own buffer
* ``memcpy``  - ``dst.copy_(src)`` of a contiguous buffer of the same size, in process
* ``ucx_sm_zc``, ``ucx_tcp_zc`` - the same two UCX lanes, zero-copy: both sides hold a
                block-major pool (kernels/kv_cache.py), the read names runs of consecutive
                blocks and each run goes as one message from the serving pool straight into
                the reader's blocks (no gather, no staging, no scatter). The block ids are
                the same scattered ones as the staged paths use, so every block is its own
                run: the worst case for message count.
* ``ucx_sm_zc_run`` - zero-copy shared memory where both sides' blocks are consecutive ids (as
                a fresh pool hands them out): the whole read is one run, one message.
* ``ucx_perftest_sm`` - the ceiling of UCX itself, no Python: ``ucx_perftest -t tag_bw`` (from
                the ``libucx`` wheel) with ``UCX_TLS=sm,self``, one message of each size
                between two processes; absent when the binary is not found.

Every staged path includes the serving side's gather of the blocks into staging
buffers (part of moving paged KV; UCX overlaps it with the sends, 8 MB parts);
``*_pull_gbps`` is a full ``KvConnectorWorker`` pull (read, verify every checksum, scatter).
Each figure is the best of several runs (the machine is shared). Also prints what bounds
a copy-based path here (``gather_gbps``, ``concurrent_copy_gbps``: see ``bench_bounds``).
Not a test: prints GB/s and ratios; ``--json PATH`` writes them.

    .venv/bin/python bench/kv_transfer.py [--json out.json] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

SIZES_MB = (1, 16, 256)
LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 8, 16, 8, 64
DTYPE = torch.float16
BLOCK_BYTES = LAYERS * 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2  # all layers, K and V
NUM_BLOCKS = (256 << 20) // BLOCK_BYTES + 16
MODEL = "bench"
PULL_REPS = 2


def _caches(seed: int, kind: str = "layer_major") -> list[torch.Tensor]:
    from splitserve.kernels.kv_cache import allocate_kv_caches

    g = torch.Generator().manual_seed(seed)
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    caches = allocate_kv_caches(
        LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, DTYPE, "cpu", kind
    )
    for cache in caches:
        cache.copy_(torch.randn(shape, generator=g).to(DTYPE))
    return caches


def _kind(zero_copy: bool) -> str:
    return "block_major" if zero_copy else "layer_major"


def _num_blocks(size_mb: int) -> int:
    return (size_mb << 20) // BLOCK_BYTES


def _block_ids(n: int, contiguous: bool = False) -> list[int]:
    if contiguous:
        return list(range(n))  # as a fresh pool allocates: one run
    return [(7 * i) % NUM_BLOCKS for i in range(n)]  # scattered, as in a pool after churn


# ====================================================================== UCX processes


def _ucx_server(
    conn: Connection, ucx_tls: str, shared_memory: bool, zero_copy: bool, contiguous: bool
) -> None:
    os.environ["UCX_TLS"] = ucx_tls
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    from splitserve.kvtransfer.connector_worker import KvConnectorWorker
    from splitserve.kvtransfer.ucx_transport import UcxTransport

    worker = KvConnectorWorker(
        "bench-prefill",
        _caches(1, _kind(zero_copy)),
        UcxTransport(shared_memory=shared_memory),
        MODEL,
        lease_ttl_s=3600.0,
    )
    offers: dict[Any, Any] = {}
    for size in SIZES_MB:
        n = _num_blocks(size)
        params = worker.offer(f"r{size}", _block_ids(n, contiguous), num_tokens=n * BLOCK_SIZE)
        offers[size] = params.to_dict()
        for k in range(PULL_REPS + 1):  # a pull releases its lease: one offer per pull
            params = worker.offer(f"p{size}-{k}", _block_ids(n, contiguous),
                                  num_tokens=n * BLOCK_SIZE)
            offers[("pull", size, k)] = params.to_dict()
    conn.send(offers)
    while True:
        if not conn.poll(0.005):
            worker.get_finished()  # frees released leases, as an engine step would
            continue
        if conn.recv() == "exit":
            break
    worker.close()


def _ucx_client(
    conn: Connection, ucx_tls: str, shared_memory: bool, offers: dict, reps: int,
    zero_copy: bool, contiguous: bool,
) -> None:
    os.environ["UCX_TLS"] = ucx_tls
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    from splitserve.kernels.kv_cache import kv_pool
    from splitserve.kvtransfer.layout import KvLayout, block_regions, merge_runs
    from splitserve.kvtransfer.params import KvTransferParams, ReadRequest
    from splitserve.kvtransfer.ucx_transport import UcxTransport

    layout = KvLayout(
        model_id=MODEL,
        dtype="float16",
        num_layers=LAYERS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE,
        num_blocks=NUM_BLOCKS,
        layout_kind=_kind(zero_copy),
    )
    pool = kv_pool(_caches(2, "block_major")) if zero_copy else None
    transport = UcxTransport(shared_memory=shared_memory)
    transport.register_memory(layout)
    results = {}
    for size in SIZES_MB:
        params = KvTransferParams.decode_any(offers[size])
        local = _block_ids(len(params.block_ids), contiguous)
        runs = merge_runs(params.block_ids, local) if zero_copy else []
        read = ReadRequest(
            xfer_id=0,
            request_id=params.request_id,
            lease_id=params.lease_id,
            block_ids=params.block_ids,
            layer_start=0,
            layer_end=LAYERS,
            secret=params.secret,
            runs=runs,
        )
        dest: Any
        if pool is not None:  # straight into this process's own pool (pages already touched)
            dest = block_regions(pool, local, runs)
        else:
            dest = torch.empty(layout.staging_shape(LAYERS, len(params.block_ids)), dtype=DTYPE)
            dest.fill_(0)  # fault the pages in before timing
        times = []
        for _ in range(reps + 1):  # the first one also connects: a warm-up
            t0 = time.perf_counter()
            done = transport.wait(transport.read_blocks(params.address, read, dest, 60.0), 60.0)
            times.append(time.perf_counter() - t0)
            if not done.ok:
                raise RuntimeError(f"UCX read failed: {done.error!r}")
        results[size] = times[1:]
    transport.close()
    conn.send(results)
    if conn.recv() == "pull":
        conn.send(_pulls(offers, shared_memory, zero_copy, contiguous))


def _pulls(
    offers: dict, shared_memory: bool, zero_copy: bool, contiguous: bool
) -> dict[int, float]:
    """Best GB/s of full connector pulls: read, verify every checksum, scatter into the cache."""
    from splitserve.kvtransfer.connector_worker import KvConnectorWorker
    from splitserve.kvtransfer.params import KvTransferParams
    from splitserve.kvtransfer.ucx_transport import UcxTransport

    worker = KvConnectorWorker(
        "bench-decode", _caches(2, _kind(zero_copy)), UcxTransport(shared_memory=shared_memory),
        MODEL,
    )
    figures = {}
    for size in SIZES_MB:
        times = []
        for k in range(PULL_REPS + 1):
            params = KvTransferParams.decode_any(offers[("pull", size, k)])
            t0 = time.perf_counter()
            worker.start_load(params.request_id, params,
                              _block_ids(len(params.block_ids), contiguous))
            while True:
                finished = worker.get_finished()
                if finished.failed_recving:
                    raise RuntimeError(f"pull failed: {finished.failed_recving}")
                if finished.finished_recving:
                    break
                time.sleep(0.0002)
            times.append(time.perf_counter() - t0)
        figures[size] = _num_blocks(size) * BLOCK_BYTES / min(times[1:]) / 1e9
    worker.close()
    return figures


def bench_ucx(
    ucx_tls: str, shared_memory: bool, reps: int, zero_copy: bool = False,
    contiguous: bool = False,
) -> dict[int, dict[str, float]]:
    ctx = mp.get_context("spawn")
    server_conn, server_child = ctx.Pipe()
    server = ctx.Process(
        target=_ucx_server, args=(server_child, ucx_tls, shared_memory, zero_copy, contiguous)
    )
    server.start()
    try:
        offers = server_conn.recv()
        client_conn, client_child = ctx.Pipe()
        client = ctx.Process(
            target=_ucx_client,
            args=(client_child, ucx_tls, shared_memory, offers, reps, zero_copy, contiguous),
        )
        client.start()
        times = client_conn.recv()
        client_conn.send("pull")
        pulls = client_conn.recv()
        client.join(30)
        server_conn.send("exit")
    finally:
        server.join(30)
        if server.is_alive():
            server.kill()
    figures = _ucx_figures(times)
    for size, gbps in pulls.items():
        figures[size]["pull_gbps"] = gbps
    return figures


def _ucx_figures(times: dict[int, list[float]]) -> dict[int, dict[str, float]]:
    return {
        size: {"gbps": _num_blocks(size) * BLOCK_BYTES / min(times[size]) / 1e9}
        for size in SIZES_MB
    }


# ====================================================================== Ray and memcpy


def bench_ray(reps: int) -> dict[int, dict[str, float]]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import numpy as np
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        producer = ray.remote(num_cpus=0)(_RayProducer).remote()
        ray.get(producer.ready.remote())
        figures = {}
        for size in SIZES_MB:
            n = _num_blocks(size)
            dest = np.zeros(n * BLOCK_BYTES // 2, dtype=np.float16)
            times = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                staged = ray.get(producer.stage.remote(n))
                np.copyto(dest, staged.reshape(-1))
                times.append(time.perf_counter() - t0)
                del staged
            figures[size] = {"gbps": n * BLOCK_BYTES / min(times[1:]) / 1e9}
        return figures
    finally:
        ray.shutdown()


class _RayProducer:
    """Holds a KV cache; returns gathered blocks (through the object store)."""

    def __init__(self) -> None:
        from splitserve.kernels.reference import gather_blocks

        self._gather = gather_blocks
        self.caches = _caches(1)

    def ready(self) -> bool:
        return True

    def stage(self, n: int) -> Any:
        return self._gather(self.caches, torch.tensor(_block_ids(n))).numpy()


def bench_ucx_perftest(reps: int) -> dict[int, dict[str, float]] | None:
    """UCX's own tag bandwidth over shared memory (``ucx_perftest``, C, no Python): what any
    UCX tag message of each size can reach here. None when the binary is not found."""
    import socket
    import subprocess

    try:
        import libucx
    except ImportError:
        return None
    exe = os.path.join(os.path.dirname(libucx.__file__), "bin", "ucx_perftest")
    if not os.access(exe, os.X_OK):
        return None
    env = {**os.environ, "UCX_TLS": "sm,self", "UCX_WARN_UNUSED_ENV_VARS": "n",
           "LD_LIBRARY_PATH": os.path.join(os.path.dirname(os.path.dirname(exe)), "lib")}
    figures = {}
    for size in SIZES_MB:
        nbytes = _num_blocks(size) * BLOCK_BYTES
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        args = ["-t", "tag_bw", "-s", str(nbytes), "-n", str(max(reps, 2) * 4), "-p", port]
        server = subprocess.Popen([exe, *args], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            out = ""
            for _ in range(50):  # the server listens within a moment; retry the connect
                res = subprocess.run([exe, "127.0.0.1", *args], env=env, capture_output=True,
                                     text=True, timeout=120, check=False)
                out = res.stdout
                if res.returncode == 0 and "Final:" in out:
                    break
                time.sleep(0.1)
        finally:
            server.kill()
            server.wait()
        final = [line.split() for line in out.splitlines() if line.startswith("Final:")]
        if not final:
            return None
        figures[size] = {"gbps": float(final[0][5]) * 2**20 / 1e9}  # overall MB/s column
    return figures


def bench_memcpy(reps: int) -> dict[int, dict[str, float]]:
    figures = {}
    for size in SIZES_MB:
        nbytes = _num_blocks(size) * BLOCK_BYTES
        src = torch.randn(nbytes // 2).to(DTYPE)
        dst = torch.zeros_like(src)
        times = []
        for _ in range(reps + 2):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        figures[size] = {"gbps": nbytes / min(times[1:]) / 1e9}
    return figures


def bench_bounds(reps: int) -> dict[str, float]:
    """What bounds a copy-based transfer here, at the largest size (one torch thread each):

    * ``gather_gbps``: the serving side's gather of the blocks alone (the copy every path
      but memcpy makes before the bytes move);
    * ``concurrent_copy_gbps``: two plain copies at once, one per core, summed: the machine's
      aggregate copy rate. Where it is not much above ``memcpy_gbps``, one core already
      saturates memory, and a path that copies the bytes twice (gather, then UCX's
      cross-process read) cannot pass about half of memcpy however well they overlap.
    """
    import threading

    from splitserve.kernels.reference import gather_blocks

    size = SIZES_MB[-1]
    n = _num_blocks(size)
    caches = _caches(1)
    ids = torch.tensor(_block_ids(n))
    out = gather_blocks(caches, ids)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        gather_blocks(caches, ids, out=out)
        times.append(time.perf_counter() - t0)
    gather = n * BLOCK_BYTES / min(times[1:]) / 1e9
    del caches, out

    nbytes = n * BLOCK_BYTES
    pairs = [(torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8))
             for _ in range(2)]
    best = 0.0
    for _ in range(reps):
        threads = [threading.Thread(target=dst.copy_, args=(src,)) for src, dst in pairs]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, 2 * nbytes / (time.perf_counter() - t0) / 1e9)
    return {"gather_gbps": gather, "concurrent_copy_gbps": best}


# ====================================================================== report


def report(results: dict[str, dict[int, dict[str, float]]]) -> dict[str, Any]:
    header = (
        f"{'size':>7} "
        + " ".join(f"{name:>12}" for name in results)
        + f" {'sm/memcpy':>10} {'ucx/ray':>8} {'zc_sm/memcpy':>12} {'zc/ray':>7}"
    )
    print(
        f"KV blocks: {LAYERS} layers x [2, {BLOCK_SIZE}, {KV_HEADS}, {HEAD_DIM}] fp16 "
        f"= {BLOCK_BYTES // 1024} KiB per block; GB/s, best run"
    )
    print(header)
    by_size: dict[str, Any] = {}
    for size in SIZES_MB:
        row = {name: fig[size]["gbps"] for name, fig in results.items()}
        best_ucx = max(row["ucx_sm"], row["ucx_tcp"])
        best_zc = max(row["ucx_sm_zc"], row["ucx_tcp_zc"])
        for lane in ("ucx_sm", "ucx_tcp", "ucx_sm_zc", "ucx_tcp_zc"):
            row[f"{lane}_pull"] = results[lane][size]["pull_gbps"]
        ratios = {
            "ucx_sm_vs_memcpy": row["ucx_sm"] / row["memcpy"],
            "ucx_vs_ray": best_ucx / row["ray"],
            "ucx_sm_zc_vs_memcpy": row["ucx_sm_zc"] / row["memcpy"],
            "ucx_zc_vs_ray": best_zc / row["ray"],
            "ucx_sm_zc_vs_staged": row["ucx_sm_zc"] / row["ucx_sm"],
        }
        by_size[f"{size}MB"] = {**{f"{k}_gbps": v for k, v in row.items()}, **ratios}
        print(
            f"{size:>5}MB "
            + " ".join(f"{row[name]:>12.2f}" for name in results)
            + f" {ratios['ucx_sm_vs_memcpy']:>10.2f} {ratios['ucx_vs_ray']:>8.2f}"
            + f" {ratios['ucx_sm_zc_vs_memcpy']:>12.2f} {ratios['ucx_zc_vs_ray']:>7.2f}"
        )
    for suffix, what in (("", "staged: checksums verified and scattered"),
                         ("_zc", "zero-copy: checksums verified in place")):
        pull = " ".join(
            f"{s}MB sm {by_size[f'{s}MB'][f'ucx_sm{suffix}_pull_gbps']:.2f} / tcp "
            f"{by_size[f'{s}MB'][f'ucx_tcp{suffix}_pull_gbps']:.2f}"
            for s in SIZES_MB
        )
        print(f"UCX full connector pull, {what} (GB/s): {pull}")
    top = by_size[f"{SIZES_MB[-1]}MB"]
    return {
        "ucx_sm_gbps": top["ucx_sm_gbps"],
        "ucx_tcp_gbps": top["ucx_tcp_gbps"],
        "ray_gbps": top["ray_gbps"],
        "memcpy_gbps": top["memcpy_gbps"],
        "ucx_sm_vs_memcpy": top["ucx_sm_vs_memcpy"],
        "ucx_vs_ray": top["ucx_vs_ray"],
        "ucx_sm_pull_gbps": top["ucx_sm_pull_gbps"],
        "ucx_tcp_pull_gbps": top["ucx_tcp_pull_gbps"],
        "ucx_sm_zc_gbps": top["ucx_sm_zc_gbps"],
        "ucx_tcp_zc_gbps": top["ucx_tcp_zc_gbps"],
        "ucx_sm_zc_vs_memcpy": top["ucx_sm_zc_vs_memcpy"],
        "ucx_zc_vs_ray": top["ucx_zc_vs_ray"],
        "ucx_sm_zc_pull_gbps": top["ucx_sm_zc_pull_gbps"],
        "ucx_tcp_zc_pull_gbps": top["ucx_tcp_zc_pull_gbps"],
        "size_mb": SIZES_MB[-1],
        "by_size": by_size,
    }


def report_extra(
    extra: dict[str, dict[int, dict[str, float]]], memcpy: dict[int, dict[str, float]]
) -> dict[str, Any]:
    """The one-run zero-copy lane and UCX's own ceiling, against memcpy, by size."""
    out: dict[str, Any] = {}
    for name, fig in extra.items():
        cells = []
        for size in SIZES_MB:
            gbps, ratio = fig[size]["gbps"], fig[size]["gbps"] / memcpy[size]["gbps"]
            cells.append(f"{size}MB {gbps:.2f} ({ratio:.2f}x memcpy)")
            if "pull_gbps" in fig[size]:
                cells[-1] += f", pull {fig[size]['pull_gbps']:.2f}"
        top = fig[SIZES_MB[-1]]
        out[f"{name}_gbps"] = top["gbps"]
        out[f"{name}_vs_memcpy"] = top["gbps"] / memcpy[SIZES_MB[-1]]["gbps"]
        if "pull_gbps" in top:
            out[f"{name}_pull_gbps"] = top["pull_gbps"]
        print(f"{name} (GB/s): " + "; ".join(cells))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the figures to this path")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per size (best is kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {
        "memcpy": bench_memcpy(args.reps),
        "ucx_sm": bench_ucx("sm,tcp,self", True, args.reps),
        "ucx_tcp": bench_ucx("tcp,self", False, args.reps),
        "ray": bench_ray(args.reps),
        "ucx_sm_zc": bench_ucx("sm,tcp,self", True, args.reps, zero_copy=True),
        "ucx_tcp_zc": bench_ucx("tcp,self", False, args.reps, zero_copy=True),
    }
    extra = {"ucx_sm_zc_run": bench_ucx("sm,tcp,self", True, args.reps, zero_copy=True,
                                        contiguous=True)}
    perftest = bench_ucx_perftest(args.reps)
    if perftest is not None:
        extra["ucx_perftest_sm"] = perftest
    bounds = bench_bounds(args.reps)
    summary = report(results)
    memcpy = summary["memcpy_gbps"]
    print(
        f"Bounds at {SIZES_MB[-1]} MB: gather alone {bounds['gather_gbps']:.2f} GB/s; two concurrent "
        f"copies {bounds['concurrent_copy_gbps']:.2f} GB/s in all ({bounds['concurrent_copy_gbps'] / memcpy:.2f}x "
        f"one copy). Two copies in turn (gather, then a read at memcpy speed) would give "
        f"{1 / (1 / bounds['gather_gbps'] + 1 / memcpy):.2f} GB/s"
    )
    summary.update(bounds)
    summary.update(report_extra(extra, results["memcpy"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
