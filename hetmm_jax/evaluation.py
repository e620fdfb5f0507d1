"""End-to-end evaluation on a data set in the MVTec AD layout, with a written report.

:func:`evaluate_category` fits a detector on ``train/good``, scores every image of ``test/``,
computes the metrics of :mod:`hetmm_jax.metrics` and writes ``metrics.json``, ``report.md``,
ROC and PRO curve plots and a grid of the best and worst cases into an output folder.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hetmm_jax import data as data_lib
from hetmm_jax import metrics as metrics_lib
from hetmm_jax import model_io, visualize
from hetmm_jax.detector import Detector

log = logging.getLogger(__name__)


def evaluate_category(detector: Detector, root: str | os.PathLike,
                      out_dir: str | os.PathLike | None = None, *, k: int | None = None,
                      strategy: str = "pts", examples: int = 4) -> dict[str, Any]:
    """Fits on ``root/train/good``, scores ``root/test`` and reports.

    Args:
      detector: an unfitted (or fitted, it is refitted) detector.
      root: the category folder.
      out_dir: where to write the report files; None writes nothing.
      k: compress the template set to ``k`` sheets with ``strategy`` before scoring.
      strategy: template selection for ``k``: "pts", "random" or "kmeans".
      examples: number of best and of worst cases drawn in ``examples.png``.

    Returns:
      The metrics dict written to ``metrics.json``: ``image_auroc``, ``pixel_auroc``, ``aupro``,
      ``f1_max`` (fractions), ``per_defect``, ``fit_seconds``, ``images_per_second``,
      ``n_templates``, ``config`` and more.

    Note:
      ``images_per_second`` times the whole scoring loop (reading, resizing, features,
      matching, image scores) after one warm-up batch, so JIT compilation is not counted; the
      warm-up time is reported as ``compile_seconds``.
    """
    root = Path(root)
    category = data_lib.load_category(root)
    samples = category.test
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    detector.fit([str(p) for p in category.train])
    n_fitted = detector.n_templates_
    if k is not None:
        detector.compress(k, strategy=strategy)
    fit_seconds = time.perf_counter() - start
    log.info("fit on %d images in %.1f s (%d templates)", n_fitted, fit_seconds,
             detector.n_templates_)

    paths = [str(s.path) for s in samples]
    start = time.perf_counter()
    detector.predict(paths[: detector.batch_size])
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    prediction = detector.predict(paths, model_maps=True)
    seconds = time.perf_counter() - start

    size = int(detector.image_size)
    labels = np.array([s.label for s in samples], np.int64)
    defects = [s.defect for s in samples]
    masks = data_lib.load_masks(samples, (size, size))
    results = metrics_lib.evaluate_scores(labels, prediction.scores, defects, masks=masks,
                                          maps=prediction.model_maps)
    results.update(
        category=root.name, data=str(root), n_train=n_fitted, n_test=len(samples),
        n_templates=detector.n_templates_, template_selection=strategy if k else None,
        fit_seconds=round(fit_seconds, 3), compile_seconds=round(compile_seconds, 3),
        predict_seconds=round(seconds, 3), images_per_second=round(len(samples) / seconds, 3),
        config=detector.get_params(), device=str(jax.devices()[0]),
        platform=platform.platform())
    if out_dir is not None:
        _write_report(out_dir, results, samples, prediction, labels, masks)
    return results


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of the overall and per-defect metrics, in percent."""
    def pct(value: Any) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    lines = ["| defect | n | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|"]
    for name, row in sorted(results.get("per_defect", {}).items()):
        lines.append(f"| {name} | {row.get('n', '-')} | {pct(row.get('image_auroc'))} | "
                     f"{pct(row.get('pixel_auroc'))} | {pct(row.get('aupro'))} |")
    lines.append(f"| **all** | {results['n_test']} | {pct(results['image_auroc'])} | "
                 f"{pct(results.get('pixel_auroc'))} | {pct(results.get('aupro'))} |")
    lines.append("")
    lines.append(f"F1-max {pct(results['f1_max'])} at threshold {results['f1_threshold']:.4f}; "
                 f"{results['n_templates']} templates; fit {results['fit_seconds']:.1f} s; "
                 f"{results['images_per_second']:.2f} images/s")
    return "\n".join(lines)


def _write_report(out_dir: Path, results: dict[str, Any], samples: list, prediction: Any,
                  labels: np.ndarray, masks: np.ndarray) -> None:
    text = json.dumps(results, indent=2, default=_json_default)
    model_io.atomic_write(out_dir / "metrics.json", lambda h: h.write(text.encode("utf-8")))

    fpr, tpr, _ = metrics_lib.roc_curve(labels, prediction.scores, max_points=2000)
    visualize.plot_curves(out_dir / "roc.png",
                          [(f"image AUROC {100 * results['image_auroc']:.1f}", fpr, tpr)],
                          xlabel="false-positive rate", ylabel="true-positive rate",
                          title=f"{results['category']}: image ROC", diagonal=True)
    if masks.any():
        pro_fpr, pro = metrics_lib.pro_curve(masks, prediction.model_maps, max_fpr=0.3,
                                             max_points=2000)
        visualize.plot_curves(out_dir / "pro.png",
                              [(f"AUPRO {100 * results['aupro']:.1f}", pro_fpr, pro)],
                              xlabel="false-positive rate (pixels)",
                              ylabel="per-region overlap",
                              title=f"{results['category']}: PRO up to FPR 0.3", xmax=0.3)
    _examples(out_dir / "examples.png", samples, prediction, labels)

    report = [f"# HETMM evaluation: {results['category']}", "",
              f"Data: `{results['data']}` ({results['n_train']} training images, "
              f"{results['n_test']} test images).", "", format_table(results), "",
              "Metrics are fractions x 100. AUPRO integrates the per-region overlap up to a "
              "pixel false-positive rate of 0.3 and divides by 0.3, without rescaling.", "",
              "![ROC](roc.png)", ""]
    if masks.any():
        report += ["![PRO](pro.png)", ""]
    report += ["![examples](examples.png)", "", "Configuration:", "", "```json",
               json.dumps(results["config"], indent=2), "```", ""]
    body = "\n".join(report)
    model_io.atomic_write(out_dir / "report.md", lambda h: h.write(body.encode("utf-8")))


def _examples(path: Path, samples: list, prediction: Any, labels: np.ndarray,
              count: int = 4) -> None:
    """Best and worst cases: the most clearly right and the most wrong of each class."""
    scores = prediction.scores
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels == 1)
    picks: list[tuple[str, int]] = []
    if len(bad):
        order = bad[np.argsort(-scores[bad])]
        picks += [("best defective", i) for i in order[:count // 2]]
        picks += [("worst defective", i) for i in order[::-1][:count // 2]]
    if len(good):
        order = good[np.argsort(scores[good])]
        picks += [("best good", i) for i in order[:count // 2]]
        picks += [("worst good", i) for i in order[::-1][:count // 2]]
    vmin = float(np.min(prediction.model_maps))
    vmax = float(np.max(prediction.model_maps))
    tiles = []
    for caption, i in picks:
        image = data_lib.read_image(samples[i].path)
        mask = data_lib.load_mask(samples[i])
        tiles.append((f"{caption}: {samples[i].defect}\n{Path(samples[i].path).name} "
                      f"score {scores[i]:.3f}",
                      visualize.overlay(image, prediction.maps[i], vmin=vmin, vmax=vmax,
                                        mask=mask if mask.any() else None)))
    visualize.grid(path, tiles, columns=4)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
