"""Hot update: a new kind of normal image is flagged at first, then accepted after ``update``.

What it shows:
  1. a detector fitted on good images of one appearance, with a threshold calibrated on
     held-out good images of that appearance, flags good images of a new appearance;
  2. ``Detector.update`` with a few good images of the new appearance (no refit, the threshold
     is kept) makes the held-out ones of that appearance pass, while defective images are
     still flagged;
  3. ``update`` equals refitting on all the images: the scores are compared.

The new appearance is real, not simulated. The Magnetic Tile Defects (MTD) images were taken
under six lighting / exposure settings, recorded in the file names as ``exp1`` ... ``exp6``;
the mean grey level rises from about 66 (exp1) to about 155 (exp6). By default the detector
first knows only the darkest setting (exp1); good images of the brightest (exp6) are the
new kind. Defective test images are reported per setting (old / new) as well.
``--synthetic`` uses striped textures instead; the new kind is the mirror image of the
stripes (the other diagonal), the defects are dark scratches on both kinds.

Run::

    python examples/hot_update.py                       # MTD, default preset
    python examples/hot_update.py --synthetic --backbone efficientnet_lite0 --image-size 64

Time on a 2-core CPU: about 2 minutes with the default preset on MTD, about 20 s with
``--synthetic`` and the flags above.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import numpy as np

CALIBRATION = "old good, calibration"
UPDATE = "new good, for update"
HELD_OUT = "new good, held out"


def _split_mtd(args: argparse.Namespace) -> dict[str, list]:
    """Good images of the old and new settings, and defective test images of both, as paths."""
    root = _common.category_root(args.data, _common.MTD)
    from hetmm_jax import data

    category = data.load_category(root)
    rng = np.random.default_rng(args.seed)

    def setting(path: Path) -> str:
        return path.name.split("_", 1)[0]

    def pick(paths: list, n: int) -> list[str]:
        if len(paths) < n:
            raise SystemExit(f"error: asked for {n} images, only {len(paths)} available")
        return [str(paths[i]) for i in sorted(rng.permutation(len(paths))[:n])]

    old, new = set(args.old.split(",")), set(args.new.split(","))
    old_good = [p for p in category.train if setting(p) in old]
    new_good = [p for p in category.train if setting(p) in new]
    old_good = pick(old_good, args.n_fit + args.n_calib)
    new_good = pick(new_good, args.n_update + args.n_heldout)
    defective = [s.path for s in category.test if s.label == 1]
    return {
        "fit": old_good[:args.n_fit],
        CALIBRATION: old_good[args.n_fit:],
        UPDATE: new_good[:args.n_update],
        HELD_OUT: new_good[args.n_update:],
        "defective, old setting": pick([p for p in defective if setting(p) in old],
                                       args.n_defect),
        "defective, new setting": pick([p for p in defective if setting(p) in new],
                                       args.n_defect),
    }


def _split_synthetic(args: argparse.Namespace) -> dict[str, list]:
    """The same groups as :func:`_split_mtd`, made as uint8 arrays."""
    rng = np.random.default_rng(args.seed)

    def make(n: int, **kind: bool) -> list[np.ndarray]:
        return [_common.synthetic_image(rng, 96, **kind)[0] for _ in range(n)]

    return {
        "fit": make(args.n_fit),
        CALIBRATION: make(args.n_calib),
        UPDATE: make(args.n_update, flipped=True),
        HELD_OUT: make(args.n_heldout, flipped=True),
        "defective, old setting": make(args.n_defect, defect=True),
        "defective, new setting": make(args.n_defect, defect=True, flipped=True),
    }


def _separation(scores: dict[str, np.ndarray]) -> float:
    """Image AUROC of the new setting's held-out good images against its defective ones."""
    from hetmm_jax.metrics import image_auroc

    good, bad = scores[HELD_OUT], scores["defective, new setting"]
    labels = np.r_[np.zeros(len(good), int), np.ones(len(bad), int)]
    return image_auroc(labels, np.r_[good, bad])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=_common.DEFAULT_DATA,
                        help="folder holding mtd/magnetic_tile (default: %(default)s)")
    parser.add_argument("--synthetic", action="store_true",
                        help="use made-up striped textures instead of MTD")
    parser.add_argument("--old", default="exp1",
                        help="MTD settings the detector is fitted on (default: %(default)s)")
    parser.add_argument("--new", default="exp6",
                        help="MTD settings that make the new kind (default: %(default)s)")
    parser.add_argument("--n-fit", type=int, default=60, help="old-kind images to fit on")
    parser.add_argument("--n-calib", type=int, default=20,
                        help="old-kind good images to calibrate the threshold on")
    parser.add_argument("--n-update", type=int, default=20,
                        help="new-kind good images given to update()")
    parser.add_argument("--n-heldout", type=int, default=30,
                        help="new-kind good images held out to check the update")
    parser.add_argument("--n-defect", type=int, default=20,
                        help="defective test images per setting")
    parser.add_argument("--max-fpr", type=float, default=None,
                        help="share of good calibration images the threshold may flag "
                             "(default 1/n-calib: their highest score)")
    parser.add_argument("--seed", type=int, default=0)
    _common.add_detector_args(parser)
    args = parser.parse_args(argv)
    _common.quiet_warnings()

    groups = _split_synthetic(args) if args.synthetic else _split_mtd(args)
    detector = _common.make_detector(args)
    print(f"data: {'synthetic stripes' if args.synthetic else args.data / 'mtd/magnetic_tile'}"
          f"; old kind {'stripes' if args.synthetic else args.old}, new kind "
          f"{'mirrored stripes' if args.synthetic else args.new}")
    print(f"detector: {_common.describe(detector)}")
    print("groups: " + "; ".join(f"{name}: {len(items)}" for name, items in groups.items()))

    start = time.perf_counter()
    detector.fit(groups["fit"])
    max_fpr = args.max_fpr if args.max_fpr is not None else 1.0 / len(groups[CALIBRATION])
    detector.calibrate(groups[CALIBRATION], max_fpr=max_fpr)
    threshold = detector.threshold
    scored = [CALIBRATION, UPDATE, HELD_OUT, "defective, old setting", "defective, new setting"]
    before = {name: detector.score(groups[name]) for name in scored}
    n_before = detector.n_templates_
    auroc_before = _separation(before)

    detector.update(groups[UPDATE])
    after = {name: detector.score(groups[name]) for name in scored}
    seconds = time.perf_counter() - start
    auroc_after = _separation(after)

    rows = []
    for name in scored:
        expect = "flag" if name.startswith("defective") else "pass"
        rows.append((name, len(groups[name]), expect, float(np.median(before[name])),
                     f"{int(np.sum(before[name] >= threshold))}/{len(groups[name])}",
                     float(np.median(after[name])),
                     f"{int(np.sum(after[name] >= threshold))}/{len(groups[name])}"))
    _common.print_table(
        f"Flagged (score >= threshold {threshold:.4f}) before / after update "
        f"({n_before} -> {detector.n_templates_} templates)",
        ("group", "n", "want", "median before", "flagged before", "median after",
         "flagged after"), rows)
    if args.max_fpr is None:
        print("(the threshold is the highest calibration score, so that one image reaches it)")

    _common.print_table(
        "New kind: held-out good versus defective images of the new setting (threshold-free)",
        ("measure", "before update", "after update"),
        [("image AUROC", auroc_before, auroc_after)])

    held = groups[HELD_OUT]
    _common.print_table(
        "Held-out good images of the new kind, one by one",
        ("image", "score before", "score after", "flagged before", "flagged after"),
        [(Path(item).name if isinstance(item, str) else f"array {i}", float(b), float(a),
          "yes" if b >= threshold else "no", "yes" if a >= threshold else "no")
         for i, (item, b, a) in enumerate(zip(held, before[HELD_OUT],
                                              after[HELD_OUT]))])

    refit = _common.make_detector(args).fit(groups["fit"] + groups[UPDATE])
    rows = []
    for name in (HELD_OUT, "defective, new setting"):
        diff = float(np.max(np.abs(refit.score(groups[name]) - after[name])))
        rows.append((name, len(groups[name]), f"{diff:.3g}"))
    same = all(np.array_equal(refit.templates_[k], detector.templates_[k])
               for k in detector.templates_)
    rows.append(("templates identical", "-", "yes" if same else "no"))
    _common.print_table("update() versus refit on old + new images",
                        ("compared", "n", "max |score difference|"), rows)
    print(f"\nfit + calibrate + update + scoring: {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
