"""Template selection: PTS versus random and k-means at several K (the paper's Figure 9).

What it shows: how much of the full template set's accuracy survives when it is compressed to K
sheets, for each way of choosing them:

- ``pts``: Pixel-level Template Selection (Algorithm 1): OPTICS density regions per position,
  then the sheets that best represent them;
- ``random``: K sheets drawn independently at every position (per-pixel random);
- ``random_image``: the same K whole training images at every position (per-image random);
- ``kmeans``: k-means with K clusters per position, the member nearest each centroid.

The features are extracted once: the detector is fitted on all the training images, and each
configuration is a shallow copy of it whose template set is compressed with
``Detector.compress(k, strategy)``; the copies share the fitted backbone, so only the
matching runs again. Each configuration scores the same test images; image AUROC and AUPRO
(FPR up to 0.3) are printed as a table with the all-templates figures, and plotted to
``--plot`` (one PNG per metric).

Data: MTD (``../shared/data/mtd/magnetic_tile``, 762 training images). By default 150 test
images spread over the defect types (``--limit 0``: all 593).

Run::

    python examples/template_selection.py                          # MTD, default preset
    python examples/template_selection.py --ks 1,10 --limit 40 --n-train 100 \\
        --backbone efficientnet_lite0 --image-size 128              # a few minutes

Time on a 2-core CPU (measured with ``--limit 60`` on the 762 MTD templates, default preset):
feature extraction about 70 s; PTS selection 45-90 s per K (OPTICS at every position, once
per K), k-means 15-200 s per K, random under 1 s; scoring 60 test images 5-20 s per
configuration and about 75 s with all 762 templates; about 17 minutes in all. The default
150 test images take about 25 minutes; ``--n-train``, ``--limit``, ``--ks`` and
``--strategies`` shorten it.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import _common
import numpy as np

STRATEGIES = ("pts", "random", "random_image", "kmeans")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=_common.DEFAULT_DATA,
                        help="folder holding mtd/magnetic_tile (default: %(default)s)")
    parser.add_argument("--ks", default="1,5,10,30,60",
                        help="template counts K, comma-separated (default: %(default)s)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="selection strategies, comma-separated (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=150,
                        help="test images used, spread over the defect types (0: all; "
                             "default: %(default)s)")
    parser.add_argument("--n-train", type=int, default=0,
                        help="fit on this many training images drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of --n-train and of the random / k-means strategies")
    parser.add_argument("--plot", type=Path, default=Path("template_selection.png"),
                        help="PNG plot; the AUPRO plot gets '_aupro' added to the name")
    _common.add_detector_args(parser)
    args = parser.parse_args(argv)
    _common.quiet_warnings()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    ks = sorted({int(v) for v in args.ks.split(",")})
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown or not strategies or ks[0] < 1:
        parser.error(f"--strategies takes {STRATEGIES}, --ks positive integers")

    root = _common.category_root(args.data, _common.MTD, synthetic=False)
    from hetmm_jax import data, metrics, visualize

    category = data.load_category(root)
    train = [str(p) for p in category.train]
    if args.n_train:
        rng = np.random.default_rng(args.seed)
        train = [train[i] for i in sorted(rng.permutation(len(train))[:args.n_train])]
    ks = [k for k in ks if k < len(train)]
    fitted = _common.make_detector(args)
    paths, labels, masks = _common.test_set(category, args.limit, fitted.image_size)
    print(f"data: {category.root} (fit on {len(train)} training images; {len(paths)} test "
          f"images, {int(labels.sum())} defective)")
    print(f"detector: {_common.describe(fitted)}")

    start = time.perf_counter()
    fitted.fit(train)
    print(f"features of {len(train)} training images: {time.perf_counter() - start:.0f} s",
          flush=True)

    def evaluate(detector) -> tuple[float, float, float]:
        begin = time.perf_counter()
        prediction = detector.predict(paths, model_maps=True)
        return (metrics.image_auroc(labels, prediction.scores),
                metrics.aupro(masks, prediction.model_maps), time.perf_counter() - begin)

    full_auroc, full_aupro, full_s = evaluate(fitted)
    rows = [("all", len(train), full_auroc, full_aupro, "-", f"{full_s:.0f}")]
    print(f"  all {len(train)} templates: AUROC {full_auroc:.4f}, AUPRO {full_aupro:.4f}",
          flush=True)
    results = {name: ([], []) for name in strategies}
    for strategy in strategies:
        for k in ks:
            # A shallow copy shares the fitted backbone and the full template dict; compress()
            # replaces the copy's dict and leaves the original's untouched.
            detector = copy.copy(fitted)
            begin = time.perf_counter()
            detector.compress(k, strategy=strategy, seed=args.seed)
            select_s = time.perf_counter() - begin
            auroc, aupro, score_s = evaluate(detector)
            results[strategy][0].append(auroc)
            results[strategy][1].append(aupro)
            rows.append((strategy, k, auroc, aupro, f"{select_s:.1f}", f"{score_s:.0f}"))
            print(f"  {strategy} K={k}: AUROC {auroc:.4f}, AUPRO {aupro:.4f} (selection "
                  f"{select_s:.1f} s, scoring {score_s:.0f} s)", flush=True)

    _common.print_table("Template selection on MTD: image AUROC and AUPRO per strategy and K",
                        ("strategy", "K", "image AUROC", "AUPRO", "select s", "score s"), rows)
    for index, metric, path in ((0, "image AUROC", args.plot),
                                (1, "AUPRO", args.plot.with_name(f"{args.plot.stem}_aupro.png"))):
        full = (full_auroc, full_aupro)[index]
        curves = [(name, np.array(ks), np.array(values[index]))
                  for name, values in results.items()]
        curves.append((f"all {len(train)}", np.array([ks[0], ks[-1]]), np.array([full, full])))
        visualize.plot_curves(path, curves, xlabel="templates K", ylabel=metric,
                              title=f"Template selection on MTD: {metric}")
        print(f"plot written to {path.resolve()}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
