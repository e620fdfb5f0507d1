"""Quick start: fit on good images, calibrate a threshold, predict, write overlays and masks.

What it shows:
  1. ``Detector.fit`` on a category's ``train/good`` images, minus a few held back;
  2. ``Detector.calibrate`` on those held-back good images (never on the test set), so the
     threshold is the highest score a good image reached (``--max-fpr`` sets another rate);
  3. ``Detector.predict`` on the test images: scores, labels, anomaly maps and masks;
  4. overlays (heat map plus predicted-mask outline) and mask PNGs written to ``--out``.

It prints one row per test image (true defect type, score, predicted label) and a summary
(image AUROC of the scores, and how many good / defective images the threshold flags).

Data: by default the cookie set in ``../shared/data/cookies/cookie`` (31 training images, 46
test images of 768 x 576 pixels); ``--synthetic`` makes a tiny striped-texture set instead.

Run::

    python examples/quickstart.py                      # cookies, default preset
    python examples/quickstart.py --synthetic --backbone efficientnet_lite0 --image-size 64

Time on a 2-core CPU: about 1-2 minutes with the default preset on the cookies (most of it
JIT compilation and feature extraction), about 20 s with ``--synthetic`` and the flags above.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common
import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=_common.DEFAULT_DATA,
                        help="folder holding cookies/cookie (default: %(default)s)")
    parser.add_argument("--category", default=None,
                        help="an MVTec-layout category folder to use instead of the cookies")
    parser.add_argument("--synthetic", action="store_true",
                        help="make a tiny synthetic data set instead of reading --data")
    parser.add_argument("--holdout", type=int, default=6,
                        help="good training images held back for calibration (default 6)")
    parser.add_argument("--max-fpr", type=float, default=None,
                        help="share of good images the threshold may flag (default 1/holdout: "
                             "the threshold is the highest held-out good score)")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many test "
                        "images (spread over all defect types)")
    parser.add_argument("--out", type=Path, default=Path("quickstart_out"),
                        help="folder for overlays and masks (default: %(default)s)")
    _common.add_detector_args(parser)
    args = parser.parse_args(argv)
    _common.quiet_warnings()

    with tempfile.TemporaryDirectory() as scratch:
        if args.synthetic:
            root = _common.write_synthetic_category(Path(scratch) / "synthetic", size=96,
                                                    n_train=16, n_good=4, n_defect=4)
        elif args.category:
            root = _common.category_root(args.category, ())
        else:
            root = _common.category_root(args.data, _common.COOKIE)
        # Imported after the data check, so a missing folder is reported without the wait.
        from hetmm_jax import data, metrics, visualize

        category = data.load_category(root)
        train = [str(p) for p in category.train]
        if not 1 <= args.holdout < len(train):
            parser.error(f"--holdout must lie in [1, {len(train) - 1}] for {len(train)} "
                         f"training images")
        # Every k-th image is held back, so both parts cover the whole training set.
        step = len(train) / args.holdout
        held = {int(i * step) for i in range(args.holdout)}
        fit_paths = [p for i, p in enumerate(train) if i not in held]
        calib_paths = [p for i, p in enumerate(train) if i in held]
        samples = _common.spread(category.test, args.limit)

        detector = _common.make_detector(args)
        print(f"data: {root} ({len(fit_paths)} fit, {len(calib_paths)} calibration, "
              f"{len(samples)} test images)")
        print(f"detector: {_common.describe(detector)}")

        start = time.perf_counter()
        detector.fit(fit_paths)
        fit_s = time.perf_counter() - start
        max_fpr = args.max_fpr if args.max_fpr is not None else 1.0 / len(calib_paths)
        detector.calibrate(calib_paths, max_fpr=max_fpr)

        start = time.perf_counter()
        prediction = detector.predict([str(s.path) for s in samples])
        predict_s = time.perf_counter() - start

        args.out.mkdir(parents=True, exist_ok=True)
        vmin = float(min(m.min() for m in prediction.maps))
        vmax = float(max(m.max() for m in prediction.maps))
        rows = []
        for sample, score, label, heat, mask in zip(samples, prediction.scores,
                                                    prediction.labels, prediction.maps,
                                                    prediction.masks):
            name = f"{sample.defect}_{sample.path.stem}"
            image = data.read_image(sample.path)
            visualize.save_png(args.out / f"{name}_overlay.png",
                               visualize.overlay(image, heat, vmin=vmin, vmax=vmax, mask=mask))
            visualize.save_mask(args.out / f"{name}_mask.png", mask)
            rows.append((sample.path.name, sample.defect, float(score),
                         "defective" if label else "good",
                         "ok" if label == sample.label else "WRONG"))

    labels = np.array([s.label for s in samples])
    _common.print_table("Test images", ("file", "truth", "score", "predicted", ""), rows)
    flagged_good = int(np.sum(prediction.labels[labels == 0]))
    flagged_bad = int(np.sum(prediction.labels[labels == 1]))
    auroc = (metrics.image_auroc(labels, prediction.scores)
             if 0 < labels.sum() < len(labels) else None)
    _common.print_table("Summary", ("measure", "value"), [
        ("threshold (calibrated on held-out good images)", detector.threshold),
        ("good test images flagged", f"{flagged_good} / {int(np.sum(labels == 0))}"),
        ("defective test images flagged", f"{flagged_bad} / {int(np.sum(labels == 1))}"),
        ("image AUROC", auroc),
        ("fit seconds", f"{fit_s:.1f}"),
        ("predict seconds", f"{predict_s:.1f}"),
    ])
    print(f"\noverlays and masks written to {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
