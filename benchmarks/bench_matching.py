"""Speed of the HETMM matching against this machine's matrix-product rate and a naive baseline.

For each of the paper's feature shapes (64x64x256 window 9, 32x32x512 window 7, 16x16x1024
window 5; backward window 3) and N template sheets it prints milliseconds per query image, the
useful rate (2 * H * W * window area * N * C flops per direction, divided by the time), the rate
of a jitted float32 ``jnp.dot`` of comparable size timed in the same run, and their ratio. Then a
direct per-offset implementation (the obvious port of the authors' kernels: for every window
offset, shift, dot over C with all sheets, max) is timed on a smaller case, and the float32 vs
bfloat16 error of the maps is measured. ``--big`` matches 400 sheets of 64x64x256 (the
WideResNet-101-2 layer-1 shape) and reports the peak resident memory.

Times are wall-clock minima over ``--repeats`` runs after one warm-up (compile) run. On a shared
machine they are noisy; the GEMM rate is re-measured next to every row so that the ratio is
taken under the same load.

Usage:
    python benchmarks/bench_matching.py [--sheets 10 60 200] [--batch 1] [--repeats 3] [--big]
"""

from __future__ import annotations

import argparse
import functools
import resource
import threading
import time

import jax
import jax.numpy as jnp

from hetmm_jax import matching

SHAPES = [(64, 256, 9), (32, 512, 7), (16, 1024, 5)]
BACKWARD_PATCH = 3


CLOCK = time.perf_counter


def best_time(fn, repeats: int, *args, **kwargs) -> float:
    """Minimum time of ``fn(*args, **kwargs)`` over ``repeats`` runs after a warm-up."""
    fn = functools.partial(fn, *args, **kwargs)
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = CLOCK()
        jax.block_until_ready(fn())
        times.append(CLOCK() - start)
    return min(times)


def gemm_rate(size: int, channels: int, repeats: int, dtype=jnp.float32) -> float:
    """GFLOP/s of a jitted (size x C) @ (C x 4096) product, the scale of one matching step."""
    key = jax.random.PRNGKey(1)
    a = jax.random.normal(key, (size, channels), dtype)
    b = jax.random.normal(key, (channels, 4096), dtype)
    dot = jax.jit(jnp.dot)
    seconds = best_time(lambda: dot(a, b), repeats)
    return 2 * size * channels * 4096 / seconds / 1e9


def naive_forward(query, templates, patch):
    """Per-offset forward matching: a (B, N, H, W) similarity map per window offset."""
    _, height, width, _ = query.shape
    half = patch // 2
    q = matching.l2_normalize(query)
    t = matching.l2_normalize(templates)
    padded = jnp.pad(t, ((0, 0), (half, half), (half, half), (0, 0)))
    valid = jnp.pad(jnp.ones((height, width), bool), half)
    best = jnp.full(query.shape[:3], -jnp.inf)
    for dy in range(patch):
        for dx in range(patch):
            shifted = padded[:, dy:dy + height, dx:dx + width]
            sims = jnp.einsum("bhwc,nhwc->bnhw", q, shifted)
            sims = jnp.where(valid[dy:dy + height, dx:dx + width], sims.max(axis=1), -jnp.inf)
            best = jnp.maximum(best, sims)
    return 1.0 - best


def features(key, shape):
    """Random features with a ReLU-like positive bias, like CNN activations."""
    return jax.nn.relu(jax.random.normal(key, shape) + 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sheets", type=int, nargs="+", default=[10, 60, 200])
    parser.add_argument("--batch", type=int, default=1, help="query images per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big", action="store_true", help="also run 400 sheets of 64x64x256")
    parser.add_argument("--only-big", action="store_true", help="run only the 400-sheet case")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall time, or the process's CPU time (steadier on a machine shared with other "
             "jobs; pin to one core with taskset to compare per-core rates)",
    )
    parser.add_argument("--skip-extras", action="store_true",
                        help="skip the naive baseline and the bfloat16 comparison")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.only_big:
        big(args)
        return
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"{jax.local_device_count()} device(s), batch {args.batch}, {args.clock} clock")

    header = (f"{'shape':>12} {'win':>3} {'N':>4} {'what':>8} {'ms/img':>9} {'GFLOP/s':>8} "
              f"{'GEMM':>7} {'ratio':>6}")
    print(header)
    key = jax.random.PRNGKey(0)
    for size, channels, patch in SHAPES:
        query = features(key, (args.batch, size, size, channels))
        for sheets in args.sheets:
            templates = matching.l2_normalize(
                features(jax.random.fold_in(key, sheets), (sheets, size, size, channels))
            )
            per_dir = 2 * size * size * channels * sheets * args.batch
            runs = [
                ("forward", per_dir * patch**2, matching.forward_hetm, (patch,)),
                ("backward", per_dir * BACKWARD_PATCH**2, matching.backward_hetm,
                 (BACKWARD_PATCH,)),
                ("hetmm", per_dir * (patch**2 + BACKWARD_PATCH**2), matching.hetmm,
                 (patch, BACKWARD_PATCH, 0.8)),
            ]
            for name, flops, fn, extra in runs:
                seconds = best_time(
                    fn, args.repeats, query, templates, *extra, templates_normalized=True
                )
                rate = flops / seconds / 1e9
                gemm = gemm_rate(size * size, channels, args.repeats)
                print(f"{size:>4}x{size}x{channels:<4} {patch:>3} {sheets:>4} {name:>8} "
                      f"{seconds * 1e3 / args.batch:>9.1f} {rate:>8.1f} {gemm:>7.1f} "
                      f"{rate / gemm:>6.2f}", flush=True)

    if args.skip_extras:
        return
    print("\nnaive per-offset baseline (jitted JAX, same inputs), forward only")
    for size, channels, patch, sheets in [(32, 512, 7, 10), (64, 256, 9, 10)]:
        query = features(key, (1, size, size, channels))
        templates = features(jax.random.fold_in(key, 1), (sheets, size, size, channels))
        naive = jax.jit(naive_forward, static_argnums=2)
        ours = best_time(matching.forward_hetm, args.repeats, query, templates, patch)
        slow = best_time(naive, args.repeats, query, templates, patch)
        diff = float(jnp.max(jnp.abs(
            naive(query, templates, patch) - matching.forward_hetm(query, templates, patch)
        )))
        print(f"  {size}x{size}x{channels} win {patch} N {sheets}: ours {ours * 1e3:.1f} ms, "
              f"naive {slow * 1e3:.1f} ms, speed-up {slow / ours:.1f}x (max diff {diff:.1e})")

    print("\nbfloat16 templates (compute in bfloat16, accumulate in float32) vs float32")
    for size, channels, patch in SHAPES:
        sheets = 60
        query = features(key, (1, size, size, channels))
        templates = matching.l2_normalize(
            features(jax.random.fold_in(key, 2), (sheets, size, size, channels))
        )
        low = templates.astype(jnp.bfloat16)
        exact = matching.hetmm(query, templates, patch, 3, 0.8, templates_normalized=True)
        approx = matching.hetmm(query, low, patch, 3, 0.8, templates_normalized=True)
        t32, t16 = (
            best_time(matching.hetmm, args.repeats, query, t, patch, 3, 0.8,
                      templates_normalized=True)
            for t in (templates, low)
        )
        err = float(jnp.max(jnp.abs(approx - exact)))
        print(f"  {size}x{size}x{channels} win {patch} N {sheets}: max abs map error {err:.2e} "
              f"(map range {float(exact.min()):.3f}..{float(exact.max()):.3f}), "
              f"time f32 {t32 * 1e3:.1f} ms, bf16 {t16 * 1e3:.1f} ms")

    if args.big:
        big(args)


def current_rss_gib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def big(args) -> None:
    """Peak memory of one query against 400 sheets of 64x64x256, sampled during the run."""
    sheets, size, channels = 400, 64, 256
    key = jax.random.PRNGKey(0)
    templates = jnp.concatenate([
        matching.l2_normalize(features(jax.random.fold_in(key, i), (50, size, size, channels)))
        for i in range(sheets // 50)
    ])
    query = features(key, (1, size, size, channels))
    jax.block_until_ready((templates, query))
    before = current_rss_gib()

    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_gib())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    jax.block_until_ready(
        matching.hetmm(query, templates, 9, 3, 0.8, templates_normalized=True)
    )
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    print(f"\n400 sheets of 64x64x256 (templates {templates.nbytes / 2**30:.2f} GiB): "
          f"hetmm {seconds:.1f} s for one image (compile included), RSS before "
          f"{before:.2f} GiB, peak during matching {peak[0]:.2f} GiB "
          f"(extra {peak[0] - before:.2f} GiB; process high-water mark "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


if __name__ == "__main__":
    main()
