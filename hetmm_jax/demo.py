"""An offline demonstration on real data that the install provides.

The PyPI package ``elpv-dataset`` (a runtime dependency) ships 2,624 electroluminescence images of
solar-cell crops (300 x 300, grayscale) with expert defect probabilities 0, 1/3, 2/3 and 1 and the
cell type (mono- or polycrystalline). The demo uses the monocrystalline cells: it fits on
defect-free cells (probability 0), then scores held-out defect-free cells and cells rated
defective with certainty (probability 1). The labels are image-level only, so the demo reports
image AUROC and F1-max, not pixel metrics.

Data: Buerhop-Lutz et al., "A Benchmark for Visual Identification of Defective Solar Cells in
Electroluminescence Imagery", EU PVSEC 2018; Deitsch et al., Solar Energy 2019. Licence
CC BY-NC-SA 4.0 (the data, not this code).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from hetmm_jax import metrics as metrics_lib
from hetmm_jax import visualize
from hetmm_jax.detector import Detector
from hetmm_jax.errors import DataError

log = logging.getLogger(__name__)


def load_elpv(cell_type: str = "mono") -> tuple[np.ndarray, np.ndarray]:
    """The solar-cell images of one type and their defect probabilities.

    Returns:
      images uint8 (n, 300, 300) and probabilities float (n,) in {0, 1/3, 2/3, 1}.
    """
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError as err:
        raise DataError("the demo needs the package elpv-dataset: pip install elpv-dataset") from err
    images, probs, types = load_dataset()
    keep = types == cell_type
    if not keep.any():
        raise DataError(f"elpv-dataset has no cells of type {cell_type!r}")
    return images[keep], probs[keep]


def run_demo(detector: Detector | None = None, out_dir: str | Path | None = None, *,
             n_train: int = 100, n_test_good: int = 100, n_test_defective: int = 100,
             seed: int = 0, k: int | None = None) -> dict[str, Any]:
    """Fits on good solar cells and scores held-out good and defective ones.

    Args:
      detector: the detector to use (default: the offline default preset).
      out_dir: folder for overlays of the best and worst cases (None: write nothing).
      n_train: defect-free training cells.
      n_test_good, n_test_defective: held-out cells of each class.
      seed: seed of the fixed random split.
      k: compress the template set to ``k`` sheets with PTS after fitting.

    Returns:
      dict with image_auroc, f1_max, f1_threshold, n_train, n_test, fit_seconds,
      images_per_second.
    """
    detector = detector or Detector.from_preset("default")
    images, probs = load_elpv("mono")
    rng = np.random.default_rng(seed)
    good = rng.permutation(np.flatnonzero(probs == 0.0))
    bad = rng.permutation(np.flatnonzero(probs == 1.0))
    if len(good) < n_train + n_test_good or len(bad) < n_test_defective:
        raise DataError(f"elpv-dataset has {len(good)} good and {len(bad)} defective mono "
                        f"cells, fewer than asked for")
    train = images[good[:n_train]]
    test_index = np.concatenate([good[n_train:n_train + n_test_good], bad[:n_test_defective]])
    test = images[test_index]
    labels = (probs[test_index] == 1.0).astype(np.int64)

    start = time.perf_counter()
    detector.fit(train)
    if k is not None:
        detector.compress(k)
    fit_seconds = time.perf_counter() - start
    detector.predict(test[: detector.batch_size])
    start = time.perf_counter()
    prediction = detector.predict(test)
    seconds = time.perf_counter() - start

    f1, threshold = metrics_lib.f1_max(labels, prediction.scores)
    results = dict(data="elpv-dataset, monocrystalline cells", n_train=n_train,
                   n_test=len(test), n_defective=int(labels.sum()),
                   image_auroc=metrics_lib.image_auroc(labels, prediction.scores),
                   f1_max=f1, f1_threshold=threshold, fit_seconds=round(fit_seconds, 2),
                   images_per_second=round(len(test) / seconds, 2),
                   backbone=detector.backbone, n_templates=detector.n_templates_)
    if out_dir is not None:
        _overlays(Path(out_dir), test, labels, prediction)
        results["out_dir"] = str(out_dir)
    return results


def _overlays(out_dir: Path, images: np.ndarray, labels: np.ndarray, prediction: Any) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = prediction.scores
    vmin = float(min(m.min() for m in prediction.maps))
    vmax = float(max(m.max() for m in prediction.maps))
    picks = []
    for label, name in ((1, "defective"), (0, "good")):
        index = np.flatnonzero(labels == label)
        order = index[np.argsort(-scores[index])]
        picks += [(f"{name}, highest score", order[0]), (f"{name}, lowest score", order[-1])]
    tiles = []
    for caption, i in picks:
        rgb = np.repeat(images[i][..., None], 3, axis=-1)
        tile = visualize.overlay(rgb, prediction.maps[i], vmin=vmin, vmax=vmax)
        visualize.save_png(out_dir / f"cell_{i:03d}_{'defective' if labels[i] else 'good'}.png",
                           tile)
        tiles.append((f"{caption}: {scores[i]:.3f}", tile))
    visualize.grid(out_dir / "examples.png", tiles, columns=4)
