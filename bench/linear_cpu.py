"""Benchmark: float32 projections on CPU, the native kernel (``kernels/native/linear.c``)
against oneDNN's packed inner product (what ``Linear`` uses otherwise), in one run.

Two settings, each at several row counts:

* ``stream`` - every projection of a model (default: 12 layers of a 768-wide model with a
  2,048-wide MLP: qkv 768->1280, o 768->768, gate|up 768->4096, down 2048->768; 302 MB),
  cycled, so that each weight comes from memory as in a decode step;
* ``hot``    - one weight of each shape called again and again (from cache).

Prints milliseconds per pass over the model's projections, GB/s of weights and GFLOP/s, and
native / oneDNN as a speed ratio. Not a test. The machine may be shared: compare the two
columns of one run, not runs.

    .venv/bin/python bench/linear_cpu.py [--rows 1,4,16,64,512] [--layers 12] [--hidden 768]
                                         [--intermediate 2048] [--kv 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from splitserve.kernels import native  # noqa: E402
from splitserve.kernels.linear import _PACK_BATCH_HINT  # noqa: E402


def _time(fn: Callable[[], None], reps: int) -> float:
    """Best of ``reps`` timed calls (ms), after two warm-up calls."""
    fn()
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,64,512")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--kv", type=int, default=256, help="K and V widths (GQA)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not native.status().available:
        sys.exit(f"no native kernels: {native.status().reason}")
    h, i = args.hidden, args.intermediate
    shapes = [(h, h + 2 * args.kv), (h, h), (h, 2 * i), (i, h)]  # (K, N) per projection
    g = torch.Generator().manual_seed(0)
    weights = [[torch.randn(n, k, generator=g) * 0.02 for k, n in shapes]
               for _ in range(args.layers)]
    onednn = [[torch.ops.mkldnn._reorder_linear_weight(w, _PACK_BATCH_HINT) for w in layer]
              for layer in weights]
    packed = [[native.pack_linear_weight(w) for w in layer] for layer in weights]
    del weights
    total_bytes = sum(k * n for k, n in shapes) * 4 * args.layers
    print(f"native build: {native.status().reason.split()[0]}, largest native weight {native.linear_max()} values; "
          f"torch threads {torch.get_num_threads()}; weights {total_bytes / 1e6:.0f} MB")
    print(f"{'setting':>7} {'rows':>5} {'oneDNN ms':>10} {'native ms':>10} {'GB/s':>13} "
          f"{'GFLOP/s':>11} {'native/oneDNN':>14}")
    results = []
    for setting in ("stream", "hot"):
        layers = range(args.layers) if setting == "stream" else [0] * args.layers
        for m in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(m, k, generator=g) for k, _ in shapes}

            def run_onednn(layers: range | list[int] = layers, xs: dict = xs) -> None:
                for layer in layers:
                    for (k, _), w in zip(shapes, onednn[layer], strict=True):
                        torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")

            def run_native(layers: range | list[int] = layers, xs: dict = xs) -> None:
                for layer in layers:
                    for (k, n), w in zip(shapes, packed[layer], strict=True):
                        native.small_linear(xs[k], w, n, None)

            a, b = _time(run_onednn, args.reps), _time(run_native, args.reps)
            flops = 2 * m * total_bytes / 4
            row = {"setting": setting, "rows": m, "onednn_ms": round(a, 3),
                   "native_ms": round(b, 3), "speedup": round(a / b, 2)}
            results.append(row)
            print(f"{setting:>7} {m:>5} {a:>10.2f} {b:>10.2f} "
                  f"{total_bytes / a / 1e6:>6.1f}/{total_bytes / b / 1e6:<6.1f} "
                  f"{flops / a / 1e6:>5.0f}/{flops / b / 1e6:<5.0f} {a / b:>14.2f}")
    if args.json:
        args.json.write_text(json.dumps({"shapes": shapes, "layers": args.layers,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
