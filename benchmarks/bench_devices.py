"""Time per image of the matching against the number of devices of a ("queries", "sheets") mesh.

For each device count (1, 2, 4, 8 by default) a fresh interpreter is started with
``--xla_force_host_platform_device_count`` (XLA reads it only at start-up) and times, on
EfficientNet-Lite2's layer shapes at 256 x 256 (64x64x24, 32x32x48, 16x16x120; windows 9, 7, 5
forward and 3 backward; alpha 0.8) with random unit-norm features:

* the baseline: the single-device :func:`hetmm_jax.matching.anomaly_map` in the same process;
* :func:`hetmm_jax.distributed.sharded_anomaly_map` on a mesh that splits only the queries
  (n x 1) and one that splits only the sheets (1 x n).

It prints milliseconds per image (minimum over ``--repeats`` runs after a compile run, the three
variants timed in turn so that they see the same load) and the
ratio baseline / mesh (above 1: the mesh is faster).

Read the numbers for what they are: forced host devices are not separate processors. They are
slices of one CPU client that share this machine's cores (2 here), so more "devices" cannot
add compute; the figures show the overhead of splitting (padding, the cross-device reduction,
a second pass for the backward direction, smaller matrix products) rather than a speed-up.
On real accelerators each device brings its own compute and memory.

Usage:
    python benchmarks/bench_devices.py [--counts 1 2 4 8] [--sheets 32] [--batch 8]
        [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from hetmm_jax.distributed import host_devices_env

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import jax, jax.numpy as jnp
    from hetmm_jax import distributed as dist, matching

    n_dev, sheets, batch, repeats = (int(v) for v in sys.argv[1:5])
    shapes = [(64, 64, 24), (32, 32, 48), (16, 16, 120)]
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(shapes))
    queries = [jax.random.normal(keys[2 * i], (batch, *s)) for i, s in enumerate(shapes)]
    templates = [matching.l2_normalize(jax.random.normal(keys[2 * i + 1], (sheets, *s)))
                 for i, s in enumerate(shapes)]
    args = dict(forward_patches=(9, 7, 5), backward_patches=(3, 3, 3), alphas=0.8,
                out_size=(256, 256), templates_normalized=True)

    def call(fn):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    runs = {"baseline": lambda: matching.anomaly_map(queries, templates, **args)}
    for name, shape in (("queries", (n_dev, 1)), ("sheets", (1, n_dev))):
        mesh = dist.make_mesh(*shape)
        placed = dist.shard_template_set(templates, mesh)
        runs[name] = (lambda mesh, placed: lambda: dist.sharded_anomaly_map(
            queries, placed, mesh=mesh, **args))(mesh, placed)
    for fn in runs.values():
        call(fn)  # compile
    # Round-robin, so that the three variants see the same changes in the machine's load.
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(call(fn))
    out = {name: min(t) / batch * 1e3 for name, t in times.items()}
    out["devices"] = jax.device_count()
    print("RESULT " + json.dumps(out))
    """
)


def run_child(n_dev: int, sheets: int, batch: int, repeats: int) -> dict:
    env = host_devices_env(n_dev, ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(n_dev), str(sheets), str(batch), str(repeats)],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{n_dev} devices: child failed:\n{proc.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--sheets", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"CPU cores on this machine: {os.cpu_count()}; forced host devices SHARE them, so")
    print("this measures the cost of splitting the work, not a multi-device speed-up.")
    print(f"EfficientNet-Lite2 shapes at 256x256, {args.sheets} sheets, batch {args.batch}, "
          f"min of {args.repeats} runs")
    print(f"{'devices':>7} {'baseline ms/img':>16} {'queries n x 1':>14} {'ratio':>6} "
          f"{'sheets 1 x n':>13} {'ratio':>6}")
    start = time.perf_counter()
    for n_dev in args.counts:
        r = run_child(n_dev, args.sheets, args.batch, args.repeats)
        print(f"{r['devices']:>7} {r['baseline']:>16.1f} {r['queries']:>14.1f} "
              f"{r['baseline'] / r['queries']:>6.2f} {r['sheets']:>13.1f} "
              f"{r['baseline'] / r['sheets']:>6.2f}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
