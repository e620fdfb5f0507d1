"""Repair and adversarial perturbations on real images, through the backbone and smooth HETMM.

A detector is fitted on the defect-free training images of an MVTec-layout category (the cookie
set under ../shared/data by default) and given a threshold (F1-max over the test images). Then:

* repair: for a few defective test images, the perturbation within an L-inf budget (and an L2
  budget) that lowers the anomaly score most, and whether that brings the image under the
  threshold;
* adversarial: for a few good test images, a small L2 perturbation that lifts the exact score
  above the threshold, and how large it is.

Every score printed is the EXACT score of the detector (hard matching) on the float image; the
optimisation itself runs on the smooth score (see :mod:`hetmm_jax.differentiable`).

Usage:
    python examples/differentiable.py [--data DIR] [--backbone efficientnet_lite0]
        [--image-size 128] [--train 20] [--images 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hetmm_jax import Detector
from hetmm_jax import differentiable as diff
from hetmm_jax.data import list_images, read_image
from hetmm_jax.features import resize_image

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cookies" / "cookie"


def as_float(path: Path, size: int) -> np.ndarray:
    return resize_image(read_image(path), size).astype(np.float32) / 255.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="an MVTec-layout category folder (train/good, test/<defect>)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train", type=int, default=20, help="training images to fit on")
    parser.add_argument("--images", type=int, default=2, help="images per experiment")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per image")
    parser.add_argument("--temperature", type=float, default=0.02)
    args = parser.parse_args()

    if not (args.data / "train" / "good").is_dir():
        print(f"no MVTec-layout data at {args.data} (expected train/good inside): nothing to do")
        return 1
    start = time.perf_counter()
    size = args.image_size
    train = list_images(args.data / "train" / "good")[:args.train]
    good = list_images(args.data / "test" / "good")
    bad = [p for d in sorted((args.data / "test").iterdir()) if d.name != "good"
           for p in list_images(d)]
    detector = Detector(args.backbone, image_size=size, forward_patches=(7, 5, 3),
                        backward_patches=(3, 3, 3), sigma=4.0 * size / 256, batch_size=8)
    detector.fit(train)
    detector.calibrate(good + bad, labels=[0] * len(good) + [1] * len(bad))
    threshold = detector.threshold
    print(f"{args.data.name}: fitted on {len(train)} images, {args.backbone} at {size} px; "
          f"threshold {threshold:.4f} (F1-max over {len(good)} good + {len(bad)} defective)")

    model = diff.ScoreModel.from_detector(detector, temperature=args.temperature,
                                          pool_temperature=0.01)
    scores = detector.predict(bad).scores
    # The flagged images closest to the threshold: the ones a repair could plausibly clear.
    flagged = [bad[i] for i in np.argsort(scores) if scores[i] >= threshold][:args.images]
    print("\nrepair (defective images, lower the score within a budget):")
    for path in flagged:
        image = as_float(path, size)
        for norm, epsilon in (("linf", 8 / 255), ("l2", 4.0)):
            r = diff.repair(model, image, epsilon=epsilon, norm=norm, steps=args.steps)
            verdict = "below threshold" if r.exact_after < threshold else "still flagged"
            print(f"  {path.parent.name}/{path.name:<14} {norm:>4} eps {epsilon:.3f}: "
                  f"score {r.exact_before:.4f} -> {r.exact_after:.4f} "
                  f"({100 * (1 - r.exact_after / r.exact_before):.0f} % lower, {verdict}); "
                  f"smooth {r.smooth_scores[0]:.4f} -> {r.smooth_after:.4f}")

    scores = detector.predict(good).scores
    quiet = [good[i] for i in np.argsort(scores) if scores[i] < threshold][:args.images]
    print("\nadversarial (good images, smallest L2 push above the threshold):")
    for path in quiet:
        image = as_float(path, size)
        r = diff.adversarial(model, image, threshold, norm="l2", steps=args.steps,
                             learning_rate=1e-2)
        linf = float(np.abs(r.delta).max())
        print(f"  good/{path.name:<14} score {r.exact_before:.4f} -> {r.exact_after:.4f} "
              f"(threshold {threshold:.4f}, {'passed' if r.success else 'NOT passed'}); "
              f"||delta||_2 = {r.delta_norm:.3f}, ||delta||_inf = {linf:.3f} "
              f"({255 * linf:.1f}/255), RMS {r.delta_norm / np.sqrt(image.size):.4f}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
