"""Few-shot: detection quality versus the number of training images (the paper's Figure 8).

What it shows: HETMM needs no training, so a handful of good images already makes a usable
detector. For each number of training images n (default 1, 2, 5, 10, 20, 50) it fits on n
images drawn at random from ``train/good`` (``--draws`` draws per n, seeded), scores the test
set and reports image AUROC and AUPRO (pixel level, FPR up to 0.3), mean and standard deviation
over the draws. A PNG plot of the means is written to ``--plot``.

Data: MTD (``../shared/data/mtd/magnetic_tile``: 762 training images, 593 test images). By
default 150 test images are used, spread evenly over the defect types (``--limit 0``: all).
``--synthetic`` uses a small made-up set of striped textures instead.

Run::

    python examples/few_shot.py                                  # MTD, default preset
    python examples/few_shot.py --sizes 1,5,20 --draws 2 --limit 60 \\
        --backbone efficientnet_lite0 --image-size 128           # a few minutes
    python examples/few_shot.py --synthetic --sizes 1,4 --draws 2 \\
        --backbone efficientnet_lite0 --image-size 64            # CI

Time on a 2-core CPU with the default preset: about 3.5 minutes with ``--limit 60`` (each n is
compiled once, and each draw extracts the test features again), roughly twice that with the
default 150 test images; under half a minute with ``--synthetic`` as above.
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
                        help="folder holding mtd/magnetic_tile (default: %(default)s)")
    parser.add_argument("--synthetic", action="store_true",
                        help="make a small striped-texture data set instead of reading MTD")
    parser.add_argument("--sizes", default="1,2,5,10,20,50",
                        help="numbers of training images, comma-separated (default: "
                             "%(default)s)")
    parser.add_argument("--draws", type=int, default=3,
                        help="random training sets per size (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=150,
                        help="test images used, spread over the defect types (0: all; "
                             "default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path("few_shot.png"),
                        help="PNG plot of the means (default: %(default)s)")
    _common.add_detector_args(parser)
    args = parser.parse_args(argv)
    _common.quiet_warnings()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    sizes = sorted({int(v) for v in args.sizes.split(",")})
    if sizes[0] < 1 or args.draws < 1:
        parser.error("--sizes must be positive integers and --draws at least 1")

    with tempfile.TemporaryDirectory() as scratch:
        if args.synthetic:
            root = _common.write_synthetic_category(Path(scratch) / "synthetic", size=96,
                                                    n_train=max(sizes), n_good=4, n_defect=4)
        else:
            root = _common.category_root(args.data, _common.MTD)
        from hetmm_jax import data, metrics, visualize

        category = data.load_category(root)
        if max(sizes) > len(category.train):
            parser.error(f"--sizes asks for {max(sizes)} images; {root} has "
                         f"{len(category.train)} training images")
        detector = _common.make_detector(args)
        paths, labels, masks = _common.test_set(category, args.limit, detector.image_size)
        print(f"data: {root} ({len(category.train)} training images; {len(paths)} test images, "
              f"{int(labels.sum())} defective)")
        print(f"detector: {_common.describe(detector)}; {args.draws} draws per size, "
              f"seed {args.seed}")

        rng = np.random.default_rng(args.seed)
        rows, curve = [], {"image AUROC": [], "AUPRO": []}
        start = time.perf_counter()
        for n in sizes:
            aurocs, pros = [], []
            for _ in range(args.draws):
                pick = rng.choice(len(category.train), size=n, replace=False)
                detector.fit([str(category.train[i]) for i in sorted(pick)])
                prediction = detector.predict(paths, model_maps=True)
                aurocs.append(metrics.image_auroc(labels, prediction.scores))
                pros.append(metrics.aupro(masks, prediction.model_maps))
            rows.append((n, args.draws, float(np.mean(aurocs)), float(np.std(aurocs)),
                         float(np.mean(pros)), float(np.std(pros))))
            curve["image AUROC"].append(np.mean(aurocs))
            curve["AUPRO"].append(np.mean(pros))
            print(f"  n={n}: image AUROC {np.mean(aurocs):.4f}, AUPRO {np.mean(pros):.4f} "
                  f"({time.perf_counter() - start:.0f} s so far)", flush=True)

    _common.print_table("Few-shot: metrics versus number of training images (mean, std over "
                        "draws)", ("n train", "draws", "AUROC mean", "AUROC std", "AUPRO mean",
                                   "AUPRO std"), rows)
    visualize.plot_curves(args.plot, [(name, np.array(sizes), np.array(values))
                                      for name, values in curve.items()],
                          xlabel="training images", ylabel="metric",
                          title="Few-shot (means over draws)")
    print(f"\n{time.perf_counter() - start:.0f} s; plot written to {args.plot.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
