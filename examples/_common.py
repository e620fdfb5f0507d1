"""Helpers shared by the example scripts: data location, detector flags, tables, synthetic data.

Not part of the library. The scripts import it as ``_common`` (Python puts the script's own
folder first on ``sys.path``), so they run as ``python examples/<name>.py`` from anywhere.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: ``<checkout>/../shared/data``: where the project's offline data sets live beside the repository.
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COOKIE = ("cookies", "cookie")
MTD = ("mtd", "magnetic_tile")


def add_detector_args(parser: argparse.ArgumentParser) -> None:
    """Flags that pick the detector: a preset, with backbone / size / batch overrides."""
    group = parser.add_argument_group("detector")
    group.add_argument("--preset", default="default", choices=("default", "paper"),
                       help="named configuration (default: %(default)s, EfficientNet-Lite2 "
                            "at 256 px, offline)")
    group.add_argument("--backbone", default=None,
                       help="override the preset's backbone, e.g. efficientnet_lite0 (faster)")
    group.add_argument("--image-size", type=int, default=None,
                       help="override the preset's image size in pixels, e.g. 128 (faster)")
    group.add_argument("--batch-size", type=int, default=8, help="images per batch")


def make_detector(args: argparse.Namespace) -> Any:
    """A fresh, unfitted :class:`hetmm_jax.Detector` from the flags of :func:`add_detector_args`.

    An image size other than the preset's scales the matching windows and the blur with it
    (windows rounded to odd sizes), so that they cover the same share of the image.
    """
    from hetmm_jax import PRESETS, Detector

    preset = PRESETS[args.preset]
    overrides: dict[str, Any] = {"batch_size": args.batch_size}
    if args.backbone:
        overrides["backbone"] = args.backbone
    if args.image_size and args.image_size != preset["image_size"]:
        scale = args.image_size / preset["image_size"]

        def odd(window: int) -> int:
            return max(1, 2 * round((window * scale - 1) / 2) + 1)

        overrides.update(image_size=args.image_size,
                         forward_patches=tuple(odd(p) for p in preset["forward_patches"]),
                         backward_patches=tuple(odd(p) for p in preset["backward_patches"]),
                         sigma=preset["sigma"] * scale)
    return Detector.from_preset(args.preset, **overrides)


def describe(detector: Any) -> str:
    """One line naming the detector's configuration."""
    return (f"{detector.backbone} at {detector.image_size} px, layers {list(detector.layers)}, "
            f"windows {list(detector.forward_patches)}/{list(detector.backward_patches)}")


def category_root(data: str | Path, parts: Sequence[str], *, synthetic: bool = True) -> Path:
    """``data/<parts>``, or exit with a message saying what is missing and how to proceed.

    ``synthetic`` says whether the calling script offers ``--synthetic`` as a way out.
    """
    root = Path(data).joinpath(*parts)
    if not (root / "train" / "good").is_dir() or not (root / "test").is_dir():
        where = "/".join(parts) or root.name
        sys.exit(f"error: no MVTec-layout data set at {root} (expected train/good and test/ "
                 f"folders); pass --data <folder holding {where}>"
                 + (" or use --synthetic" if synthetic else ""))
    return root


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Prints a plain-text table; floats get 4 decimals, None prints as '-'."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, (float, np.floating)):
            return f"{value:.4f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def quiet_warnings() -> None:
    """Silences the notices that are expected in the examples' small settings."""
    warnings.filterwarnings("ignore", message=".*too few to estimate.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def synthetic_image(rng: np.random.Generator, size: int, *, defect: bool = False,
                    flipped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A textile-like uint8 (size, size, 3) image of noisy diagonal stripes, and its bool mask.

    Good images differ in the stripes' phase and the noise. ``defect`` paints a dark scratch (a
    short thick line at a random place and angle), true in the mask. ``flipped`` mirrors the
    stripes, i.e. a second kind of normal product.
    """
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    if flipped:
        xx = size - 1 - xx
    period = size / 8.0
    phase = rng.uniform(0, 2 * np.pi)
    base = 0.55 + 0.3 * np.sin((xx + yy) * 2 * np.pi / period + phase)
    image = base[..., None] * np.array([0.95, 0.8, 0.6]) + rng.normal(0, 0.04, (size, size, 3))
    mask = np.zeros((size, size), bool)
    if defect:
        cy, cx = rng.uniform(size * 0.25, size * 0.75, size=2)
        angle = rng.uniform(0, np.pi)
        length, width = size * 0.3, max(2.0, size / 24)
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
        image[mask] = [0.1, 0.1, 0.15]
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


def write_synthetic_category(root: Path, *, size: int = 96, n_train: int = 12,
                             n_good: int = 4, n_defect: int = 4, flipped_good: int = 0,
                             seed: int = 0) -> Path:
    """Writes a small data set in the MVTec AD layout and returns its root.

    Layout: ``train/good`` (n_train), ``test/good`` (n_good), ``test/scratch`` (n_defect) with
    masks in ``ground_truth/scratch``; with ``flipped_good``, also ``extra/flipped`` holding
    that many good images of the mirrored kind (outside ``train``/``test``, so
    :func:`hetmm_jax.data.load_category` does not see them).
    """
    rng = np.random.default_rng(seed)
    folders = {name: root / name for name in ("train/good", "test/good", "test/scratch",
                                              "ground_truth/scratch", "extra/flipped")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(synthetic_image(rng, size)[0]).save(folders["train/good"] / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(synthetic_image(rng, size)[0]).save(folders["test/good"] / f"{i:03d}.png")
    for i in range(n_defect):
        image, mask = synthetic_image(rng, size, defect=True)
        Image.fromarray(image).save(folders["test/scratch"] / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            folders["ground_truth/scratch"] / f"{i:03d}_mask.png")
    for i in range(flipped_good):
        image = synthetic_image(rng, size, flipped=True)[0]
        Image.fromarray(image).save(folders["extra/flipped"] / f"{i:03d}.png")
    return root


def spread(items: Sequence[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` items picked evenly along the sequence (all when limit is None or 0).

    MVTec-layout test samples are sorted by defect type, so this keeps every type's share.
    """
    items = list(items)
    if not limit or limit >= len(items):
        return items
    picks = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in sorted(set(picks))]


def test_set(category: Any, limit: int | None, size: int) -> tuple[list[str], np.ndarray, Any]:
    """Paths, labels (n,) and bool masks (n, size, size) of a spread of the test samples."""
    from hetmm_jax import data

    samples = spread(category.test, limit)
    labels = np.array([s.label for s in samples], np.int64)
    if labels.min() == labels.max():
        sys.exit(f"error: the {len(samples)} test images picked are all of one class; "
                 f"raise --limit")
    return [str(s.path) for s in samples], labels, data.load_masks(samples, (size, size))
