"""Time PTS on a realistic template set against the reference code's way of running OPTICS.

The template set is the features of the 762 defect-free MTD training images
(EfficientNet-Lite2, 256 x 256, layers 1-3 by default), extracted once and cached as .npy files;
without the data or the weights, random clustered data of the same shapes is used instead.

"Ours" is :func:`hetmm_jax.selection.compress_templates` on the whole set, every position of every
layer (OPTICS, then the selection of Eqs. 7-9), timed end to end including JIT compilation.

"Reference" is what the authors' code runs at every position: scikit-learn
``OPTICS(min_samples=N // K, metric=lambda a, b: 1 - a.dot(b.T))`` on the unit vectors. It is
timed on a sample of positions per layer and extrapolated to the full maps, then divided by the
number of workers (the authors spread positions over joblib processes; perfect scaling is
assumed, which favours them). Ours uses as many threads. Their selection step runs on a CUDA
GPU and is not counted.

Run: ``python benchmarks/bench_pts.py`` (options: ``--help``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import OPTICS

from hetmm_jax.selection import compress_templates, optics_labels

REPO = Path(__file__).resolve().parents[1]
MTD_GOOD = REPO.parent / "shared" / "data" / "mtd" / "magnetic_tile" / "train" / "good"
# EfficientNet-Lite2 at 256 x 256: strides 4, 8, 16 and their channels.
RANDOM_SHAPES = {"layer1": (64, 64, 24), "layer2": (32, 32, 48), "layer3": (16, 16, 120)}


def load_features(layers: list[str], cache: Path, force_random: bool) -> tuple[dict, str]:
    """dict layer -> (N, h, w, C) float32, and a description of where it came from."""
    files = {name: cache / f"mtd_efficientnet_lite2_256_{name}.npy" for name in layers}
    if not force_random:
        if all(path.exists() for path in files.values()):
            return {name: np.load(path) for name, path in files.items()}, f"MTD features ({cache})"
        try:
            from hetmm_jax.data import list_images
            from hetmm_jax.features import FeatureExtractor

            paths = list_images(MTD_GOOD)
            extractor = FeatureExtractor("efficientnet_lite2", layers=tuple(layers), image_size=256)
            start = time.perf_counter()
            feats = extractor.extract(paths, batch_size=16)
            elapsed = time.perf_counter() - start
            print(f"extracted features of {len(paths)} images in {elapsed:.0f} s")
            cache.mkdir(parents=True, exist_ok=True)
            for name, path in files.items():
                np.save(path, feats[name].astype(np.float32))
            return {name: feats[name].astype(np.float32) for name in layers}, "MTD features"
        except Exception as exc:  # noqa: BLE001 - any failure falls back to synthetic data
            print(f"no MTD features ({type(exc).__name__}: {exc}); using random data")
    return random_templates(layers, n=762), "random clustered data, N=762"


def random_templates(layers: list[str], n: int, seed: int = 0) -> dict:
    """Non-negative features around a few modes per position, with outliers."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in layers:
        h, w, c = RANDOM_SHAPES[name]
        modes = rng.gamma(2.0, 1.0, size=(4, h, w, c)).astype(np.float32)
        which = rng.choice(4, size=n, p=[0.5, 0.25, 0.15, 0.1])
        x = modes[which] + rng.normal(size=(n, h, w, c)).astype(np.float32) * 0.6
        x[rng.random(n) < 0.05] *= rng.gamma(1.0, 1.0, size=(1, h, w, c)).astype(np.float32)
        out[name] = np.maximum(x, 0.0)
    return out


def reference_optics(vectors: np.ndarray, min_samples: int) -> np.ndarray:
    """The reference code's call at one position: a Python lambda as the metric."""
    optics = OPTICS(min_samples=min_samples, metric=lambda a, b: 1 - a.dot(b.T))
    return optics.fit_predict(vectors.copy(order="C"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=60, help="sheets to keep (paper: 60 on MVTec)")
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3"])
    parser.add_argument("--sample", type=int, default=2, help="reference positions per layer")
    parser.add_argument("--n-jobs", type=int, default=None, help="workers (default: all cores)")
    parser.add_argument("--random", action="store_true", help="random data, not MTD features")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/hetmm_pts_bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    jobs = args.n_jobs or len(os.sched_getaffinity(0))
    templates, source = load_features(args.layers, args.cache, args.random)
    print(f"template set: {source}")
    for name, layer in templates.items():
        print(f"  {name}: {layer.shape} {layer.dtype}")
    n = next(iter(templates.values())).shape[0]
    k = args.k
    min_samples = max(2, n // k)
    load_before = os.getloadavg()
    print(f"K={k}, min_samples={min_samples}, {jobs} workers, {os.cpu_count()} cores, "
          f"load average before: {load_before[0]:.1f} {load_before[1]:.1f}")

    # Ours: the whole template set, every layer, OPTICS + selection.
    start = time.perf_counter()
    compressed = compress_templates(templates, k, n_jobs=jobs)
    ours = time.perf_counter() - start
    positions = {name: layer.shape[1] * layer.shape[2] for name, layer in templates.items()}
    print(f"ours: PTS of the full set ({sum(positions.values())} positions) in {ours:.1f} s "
          f"({1000 * ours / sum(positions.values()):.1f} ms per position)")
    for name, layer in compressed.items():
        assert layer.shape == (k,) + templates[name].shape[1:]

    # Reference: a sample of positions per layer, extrapolated.
    rng = np.random.default_rng(0)
    reference_serial = 0.0
    agree = total = 0
    for name, layer in templates.items():
        _, h, w, _ = layer.shape
        unit = layer / np.maximum(np.linalg.norm(layer, axis=-1, keepdims=True), 1e-12)
        spent = 0.0
        for flat in rng.choice(h * w, size=min(args.sample, h * w), replace=False):
            y, x = divmod(int(flat), w)
            start = time.perf_counter()
            ref_labels = reference_optics(unit[:, y, x].astype(np.float64), min_samples)
            spent += time.perf_counter() - start
            ours_labels = optics_labels(
                layer[:, y:y + 1, x:x + 1], min_samples=min_samples, n_jobs=1
            )[0, 0]
            agree += int(np.array_equal(ref_labels, ours_labels))
            total += 1
        per_position = spent / min(args.sample, h * w)
        reference_serial += per_position * h * w
        print(f"reference {name}: {per_position:.2f} s per position x {h * w} positions "
              f"= {per_position * h * w / 60:.1f} min serial")
    reference = reference_serial / jobs
    load_after = os.getloadavg()
    print(f"reference OPTICS labels equal to ours at {agree} of {total} sampled positions")
    print(f"reference (extrapolated): {reference_serial:.0f} s serial, "
          f"{reference:.0f} s on {jobs} processes (perfect scaling assumed)")
    print(f"ours: {ours:.1f} s on {jobs} threads -> {reference / ours:.0f}x faster on the same "
          f"{jobs} cores ({reference_serial / ours:.0f}x against one reference process)")
    print(f"load average after: {load_after[0]:.1f} {load_after[1]:.1f} "
          "(other jobs on this machine slow both sides)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
