"""Evaluation metrics for anomaly detection, as pure NumPy functions.

Image level: AUROC of the image scores and the best F1 over thresholds (:func:`image_auroc`,
:func:`f1_max`). Pixel level: AUROC over every pixel of every test image (:func:`pixel_auroc`) and
the area under the per-region-overlap curve up to a false-positive rate of 0.3 (:func:`aupro`).
:func:`evaluate_scores` computes them all, overall and per defect type.

Conventions:

- Label 1 / True means defective (the positive class); higher scores mean "more anomalous".
- A pixel or image is predicted defective when its score is **>= the threshold**; the thresholds
  tried are the distinct score values, so ties are never split.
- Every result is a fraction in [0, 1].
- Pixel inputs (``masks``, ``maps``) are either arrays (n, H, W) or sequences of n arrays
  (H_i, W_i), so images of different sizes are evaluated at their own resolution.

Bad inputs (shape mismatch, NaN or infinite scores, labels other than 0 / 1, a single class)
raise :class:`~hetmm_jax.errors.InputError`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from hetmm_jax.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "aupro",
    "evaluate_scores",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "roc_curve",
]

_STRUCTURES = {
    4: ndimage.generate_binary_structure(2, 1),
    8: ndimage.generate_binary_structure(2, 2),
}


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _as_scores(values: Any, name: str) -> np.ndarray:
    """Real-valued scores as a float array (float32 kept, everything else float64)."""
    array = np.asarray(values)
    if array.dtype.kind in "OSUMmc":
        raise InputError(f"{name} must be real numbers, got dtype {array.dtype}")
    if array.dtype != np.float32:
        try:
            # Also widens bfloat16 / float16 maps straight from JAX.
            array = array.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} must be real numbers, got dtype {array.dtype}") from exc
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        first = np.unravel_index(int(np.argmin(finite)), array.shape)
        raise InputError(
            f"{name} contain {bad} NaN or infinite values (first at index "
            f"{tuple(int(i) for i in first)}); scores must be finite"
        )
    return array


def _as_binary(values: Any, name: str) -> np.ndarray:
    """Labels or masks as a bool array; accepts bool or numbers that are all 0 or 1."""
    array = np.asarray(values)
    if array.dtype == np.bool_:
        return array
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"{name} must be boolean or 0 / 1, got dtype {array.dtype}")
    if array.size and not np.isin(array, (0, 1)).all():
        others = np.unique(array[~np.isin(array, (0, 1))])[:5]
        raise InputError(
            f"{name} must be boolean or 0 / 1, found other values {others.tolist()} "
            "(a 0 / 255 mask must be converted with mask > 127)"
        )
    return array.astype(bool)


def _check_image_level(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    labels = _as_binary(labels, "labels")
    scores = _as_scores(scores, "scores")
    if labels.ndim != 1 or scores.ndim != 1:
        raise InputError(
            f"labels and scores must be 1-D (n,), got shapes {labels.shape} and {scores.shape}"
        )
    if labels.shape != scores.shape:
        raise InputError(
            f"labels and scores must have the same length, got {labels.size} and {scores.size}"
        )
    _require_both_classes(labels, "labels", "images")
    return labels, scores


def _require_both_classes(positive: np.ndarray, name: str, unit: str) -> None:
    n_pos = int(np.count_nonzero(positive))
    if n_pos == 0 or n_pos == positive.size:
        only = "defective (1)" if n_pos else "good (0)"
        raise InputError(
            f"{name} hold only {only} {unit} ({positive.size} in all); this metric needs both "
            "good and defective ones"
        )


def _pixel_pairs(
    masks: Any, maps: Any, n_expected: int | None = None
) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """Validates pixel inputs and returns them as per-image lists.

    ``masks`` may hold None entries (pixel ground truth unknown for that image); arrays (n, H, W)
    and sequences of (H_i, W_i) arrays are both accepted for either argument.
    """
    mask_list = _per_image(masks, "masks", allow_none=True)
    map_list = _per_image(maps, "maps", allow_none=False)
    if len(mask_list) != len(map_list):
        raise InputError(f"got {len(mask_list)} masks but {len(map_list)} maps")
    if n_expected is not None and len(map_list) != n_expected:
        raise InputError(f"got {len(map_list)} maps and masks for {n_expected} images")
    checked_masks: list[np.ndarray | None] = []
    checked_maps: list[np.ndarray] = []
    for index, (mask, amap) in enumerate(zip(mask_list, map_list)):
        amap = _as_scores(amap, f"maps[{index}]")
        if amap.ndim != 2:
            raise InputError(f"maps[{index}] must be 2-D (H, W), got shape {amap.shape}")
        if mask is not None:
            mask = _as_binary(mask, f"masks[{index}]")
            if mask.shape != amap.shape:
                raise InputError(
                    f"masks[{index}] has shape {mask.shape} but maps[{index}] has {amap.shape}"
                )
        checked_masks.append(mask)
        checked_maps.append(amap)
    if not checked_maps:
        raise InputError("no maps given")
    return checked_masks, checked_maps


def _per_image(values: Any, name: str, allow_none: bool) -> list[Any]:
    if values is None:
        raise InputError(f"{name} is None")
    if isinstance(values, np.ndarray) or hasattr(values, "__array__"):
        array = np.asarray(values)
        if array.ndim != 3:
            raise InputError(f"{name} must be (n, H, W) or a list of (H, W), got {array.shape}")
        return list(array)
    items = list(values)
    for index, item in enumerate(items):
        if item is None and not allow_none:
            raise InputError(f"{name}[{index}] is None")
    return items


# --------------------------------------------------------------------------------------------
# Sorted cumulative counts: the one idea behind every curve here
# --------------------------------------------------------------------------------------------


def _descending(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order that sorts ``scores`` descending, and the last sorted index of each tie group."""
    order = np.argsort(scores, kind="stable")[::-1]
    ordered = scores[order]
    ends = np.flatnonzero(ordered[:-1] != ordered[1:])
    return order, np.append(ends, ordered.size - 1)


def _roc_counts(positive_sorted: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positive counts at each distinct threshold, from highest to lowest."""
    tp = np.cumsum(positive_sorted, dtype=np.int64)[ends]
    fp = (ends + 1) - tp
    return tp, fp


def _auc_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    """Trapezoidal ROC area from (0, 0) through the counts, exact in integers.

    With ties grouped into one step, the trapezoid equals the Mann-Whitney statistic with
    tied pairs counted 1/2.
    """
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    tp0 = np.concatenate(([0], tp))
    fp0 = np.concatenate(([0], fp))
    twice_area = int(np.sum(np.diff(fp0) * (tp0[1:] + tp0[:-1])))
    return twice_area / (2 * n_pos * n_neg)


def _thin(x: np.ndarray, y: np.ndarray, max_points: int | None) -> tuple[np.ndarray, np.ndarray]:
    if max_points is None or x.size <= max_points:
        return x, y
    if max_points < 2:
        raise InputError(f"max_points must be at least 2, got {max_points}")
    keep = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(np.int64))
    return x[keep], y[keep]


# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


def roc_curve(
    labels: Any, scores: Any, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: one point per distinct score, from (0, 0) to (1, 1).

    Args:
        labels: (n,) bool or 0 / 1, 1 = defective.
        scores: (n,) finite real scores, higher = more anomalous.
        max_points: thin the curve to about this many points (for plotting); None keeps all.

    Returns:
        (fpr, tpr, thresholds): float64 arrays; point i (i >= 1) predicts defective when
        score >= thresholds[i]; thresholds[0] is +inf (nothing predicted defective).
    """
    labels, scores = _check_image_level(labels, scores)
    return _roc_arrays(labels, scores, max_points)


def _roc_arrays(
    positive: np.ndarray, scores: np.ndarray, max_points: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order, ends = _descending(scores)
    tp, fp = _roc_counts(positive[order], ends)
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    tpr = np.concatenate(([0.0], tp / tp[-1]))
    thresholds = np.concatenate(([np.inf], scores[order][ends].astype(np.float64)))
    if max_points is not None and fpr.size > max_points:
        index = np.arange(fpr.size)
        _, keep = _thin(index, index, max_points)
        return fpr[keep], tpr[keep], thresholds[keep]
    return fpr, tpr, thresholds


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image scores.

    Tied scores count one half (the trapezoidal rule over distinct thresholds), as in
    scikit-learn's ``roc_auc_score``.

    Args:
        labels: (n,) bool or 0 / 1, 1 = defective; both classes must occur.
        scores: (n,) finite real scores, higher = more anomalous.

    Returns:
        AUROC in [0, 1].

    Raises:
        InputError: shapes differ, labels not 0 / 1, one class only, NaN or infinite scores.
    """
    labels, scores = _check_image_level(labels, scores)
    order, ends = _descending(scores)
    return _auc_from_counts(*_roc_counts(labels[order], ends))


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Best F1 score over thresholds, and the threshold that reaches it.

    Predicts "defective" when ``score >= threshold``; the thresholds tried are the distinct
    scores. ``F1 = 2 TP / (2 TP + FP + FN)``. When several thresholds reach the same best F1,
    the highest of them is returned (the one that flags the fewest images).

    Args:
        labels: (n,) bool or 0 / 1, 1 = defective; both classes must occur.
        scores: (n,) finite real scores.

    Returns:
        (f1, threshold): the best F1 in (0, 1] and a threshold equal to one of the scores.

    Raises:
        InputError: as :func:`image_auroc`.
    """
    labels, scores = _check_image_level(labels, scores)
    order, ends = _descending(scores)
    tp, fp = _roc_counts(labels[order], ends)
    n_pos = tp[-1]
    f1 = 2.0 * tp / (tp + fp + n_pos)
    best = int(np.argmax(f1))  # the first maximum is the highest threshold
    return float(f1[best]), float(scores[order][ends[best]])


# --------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------


class _PixelRanking:
    """All pixels of a set of images, sorted once by score.

    Each pixel is reduced to its score and a small integer "owner": ``i`` for a normal pixel of
    image ``i``, ``n + r`` for a pixel of ground-truth region ``r`` (numbered over all images).
    Everything else (is it defective, its region's size, its image) is looked up from the owner
    in small tables, so no large array has to be permuted after the sort.

    For float32 maps the score and owner are packed into one uint64 (score bits made sortable
    in the high word), and a plain ``np.sort`` (vectorised, several times faster than
    ``np.argsort``) orders them. Other dtypes fall back to ``np.argsort`` in float64.

    Subsets of images (e.g. one defect type plus the good images) are evaluated by filtering
    the sorted arrays, which keeps them sorted, so the sort is never repeated.
    """

    def __init__(self, masks: list[np.ndarray], maps: list[np.ndarray], connectivity: int) -> None:
        if connectivity not in _STRUCTURES:
            raise InputError(f"connectivity must be 4 or 8, got {connectivity!r}")
        structure = _STRUCTURES[connectivity]
        n_images = len(maps)
        packed = all(m.dtype == np.float32 for m in maps)

        total = int(sum(m.size for m in maps))
        # Owners are fewer than pixels + images; they must fit the packed key's low word.
        packed = packed and total + n_images < 2**32
        owners = np.empty(total, dtype=np.uint64 if packed else np.int64)
        scores = None if packed else np.empty(total, dtype=np.float64)
        region_sizes: list[np.ndarray] = []
        region_image: list[np.ndarray] = []
        self.n_regions = np.zeros(n_images, dtype=np.int64)
        self.n_normal = np.zeros(n_images, dtype=np.int64)

        start, first_region = 0, n_images
        for index, (mask, amap) in enumerate(zip(masks, maps)):
            stop = start + amap.size
            labelled, n_regions = ndimage.label(mask, structure=structure)
            labelled = labelled.ravel().astype(np.int64)
            owner = np.where(labelled > 0, first_region + labelled - 1, index)
            if packed:
                high = _sortable_bits(amap.ravel()) << np.uint64(32)
                owners[start:stop] = high | owner.astype(np.uint64)
            else:
                owners[start:stop] = owner
                scores[start:stop] = amap.ravel()
            region_sizes.append(np.bincount(labelled, minlength=n_regions + 1)[1:])
            region_image.append(np.full(n_regions, index, dtype=np.int64))
            self.n_regions[index] = n_regions
            self.n_normal[index] = amap.size - int(np.count_nonzero(mask))
            start, first_region = stop, first_region + n_regions

        if packed:
            owners.sort()
            # Split the two 32-bit words into contiguous arrays in descending order (later
            # passes run over them several times); the high word only needs to say where the
            # score changes.
            words = owners.view(np.uint32).reshape(-1, 2)
            low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
            self.score_keys = words[::-1, high].copy()
            self.owners = words[::-1, low].copy()
            del words, owners
        else:
            order = np.argsort(scores, kind="stable")[::-1]
            self.score_keys = scores[order]
            self.owners = owners[order]
            del order, owners
        del scores

        sizes = np.concatenate(region_sizes) if region_sizes else np.zeros(0, np.int64)
        self.n_images = n_images
        self.owner_weight = np.concatenate((np.zeros(n_images), 1.0 / np.maximum(sizes, 1)))
        self.owner_image = np.concatenate((np.arange(n_images, dtype=np.int64), *region_image))

    def curves(
        self,
        images: np.ndarray | None = None,
        with_auroc: bool = True,
        with_pro: bool = True,
        max_fpr: float = 1.0,
    ) -> tuple[float | None, np.ndarray | None, np.ndarray | None]:
        """Pixel AUROC and the full PRO curve over a subset of images (all when None).

        Args:
            images: indices of the images to use; None for all.
            with_auroc, with_pro: skip the part not needed (each costs passes over all pixels).
            max_fpr: the PRO curve is only needed up to this FPR; it is computed up to the first
                point beyond it (kept for interpolation), which skips the low-score pixels.

        Returns:
            (auroc, fpr, pro); auroc is None when the subset lacks normal or defective pixels,
            fpr and pro are None when it has no ground-truth region or no normal pixel.
        """
        if images is None:
            keys, owners = self.score_keys, self.owners
            n_regions = int(self.n_regions.sum())
            n_normal = int(self.n_normal.sum())
        else:
            chosen = np.zeros(self.n_images, dtype=bool)
            chosen[images] = True
            keep = chosen[self.owner_image][self.owners]
            keys, owners = self.score_keys[keep], self.owners[keep]
            n_regions = int(self.n_regions[chosen].sum())
            n_normal = int(self.n_normal[chosen].sum())
        if keys.size == 0:
            return None, None, None

        ends = np.append(np.flatnonzero(keys[:-1] != keys[1:]), keys.size - 1)
        positive = owners >= self.n_images
        tp, fp = _roc_counts(positive, ends)
        auroc = None
        if with_auroc and tp[-1] > 0 and fp[-1] > 0:
            auroc = _auc_from_counts(tp, fp)
        if not with_pro or n_regions == 0 or n_normal == 0:
            return auroc, None, None

        # Every region pixel carries 1 / |region|, so the running sum at a threshold is the
        # sum over regions of the fraction of the region already above it.
        n_points = ends.size
        if max_fpr < 1.0:
            # One point beyond the limit is needed; one more guards the float comparison.
            n_points = min(int(np.searchsorted(fp, max_fpr * n_normal, side="right")) + 2, n_points)
        ends, fp = ends[:n_points], fp[:n_points]
        overlap = np.cumsum(self.owner_weight[owners[: ends[-1] + 1]])[ends] / n_regions
        fpr = np.concatenate(([0.0], fp / n_normal))
        pro = np.concatenate(([0.0], np.minimum(overlap, 1.0)))
        return auroc, fpr, pro


def _sortable_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as uint64 holding 32 bits whose unsigned order is the float order."""
    # Adding +0.0 turns -0.0 into +0.0, so that equal values get equal bits.
    bits = (values.astype(np.float32) + np.float32(0.0)).view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    flipped = np.where(negative, ~bits, bits | np.uint32(0x80000000))
    return flipped.astype(np.uint64)


def _truncate_curve(
    fpr: np.ndarray, pro: np.ndarray, max_fpr: float
) -> tuple[np.ndarray, np.ndarray]:
    """The part of a monotone curve with fpr <= max_fpr, ending exactly at max_fpr.

    The end point is linearly interpolated between the last point at or below ``max_fpr`` and
    the first one beyond it, so the area is that of the piecewise-linear curve.
    """
    inside = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:inside], pro[:inside]
    if x[-1] < max_fpr and inside < fpr.size:
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        y_end = y0 + (max_fpr - x0) * (y1 - y0) / (x1 - x0)
        x = np.append(x, max_fpr)
        y = np.append(y, y_end)
    return x, y


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _check_max_fpr(max_fpr: float) -> float:
    max_fpr = float(max_fpr)
    if not 0.0 < max_fpr <= 1.0:
        raise InputError(f"max_fpr must be in (0, 1], got {max_fpr}")
    return max_fpr


def _known(masks: list[np.ndarray | None], maps: list[np.ndarray]) -> tuple[list, list]:
    kept = [(mask, amap) for mask, amap in zip(masks, maps) if mask is not None]
    if len(kept) < len(maps):
        log.warning(
            "%d of %d images have no mask; pixel metrics use the other %d",
            len(maps) - len(kept),
            len(maps),
            len(kept),
        )
    if not kept:
        raise InputError("no image has a mask: pixel metrics need ground truth")
    return [m for m, _ in kept], [a for _, a in kept]


def pixel_auroc(masks: Any, maps: Any) -> float:
    """AUROC over all pixels of all images pooled together.

    Args:
        masks: bool (n, H, W) or n bool (H_i, W_i) arrays, True = defective pixel.
        maps: anomaly maps of the same shapes, finite, higher = more anomalous.

    Returns:
        AUROC in [0, 1].

    Raises:
        InputError: shapes differ, non-binary masks, non-finite maps, or the masks have no
            defective pixel (or no normal one).
    """
    masks, maps = _known(*_pixel_pairs(masks, maps))
    ranking = _PixelRanking(masks, maps, connectivity=8)
    auroc, _, _ = ranking.curves(with_pro=False)
    if auroc is None:
        _require_both_classes(np.concatenate([m.ravel() for m in masks]), "masks", "pixels")
    return float(auroc)


def pro_curve(
    masks: Any,
    maps: Any,
    max_fpr: float = 1.0,
    connectivity: int = 8,
    max_points: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap (PRO) curve: PRO against the pixel false-positive rate.

    For a threshold t (a pixel is predicted defective when its score >= t), taken at every
    distinct score:

    - FPR(t): fraction of the normal pixels of all images with score >= t;
    - PRO(t): mean, over all ground-truth regions of all images, of the fraction of the region's
      pixels with score >= t. A region is a connected component of a mask (8-connectivity by
      default, as MVTec AD's reference evaluation, which labels with a 3 x 3 structure of ones).

    The curve starts at (0, 0). Masks without any defective pixel (e.g. MTD's empty "uneven"
    masks) add normal pixels but no region.

    Args:
        masks: bool (n, H, W) or n bool (H_i, W_i) arrays, True = defective pixel.
        maps: anomaly maps of the same shapes.
        max_fpr: cut the curve here, the last point interpolated at exactly ``max_fpr``.
        connectivity: 8 (default) or 4 neighbours per region pixel.
        max_points: thin the curve to about this many points (for plotting); None keeps all.

    Returns:
        (fpr, pro): float64 arrays of equal length, both non-decreasing.

    Raises:
        InputError: bad shapes or values, no ground-truth region, or no normal pixel.
    """
    max_fpr = _check_max_fpr(max_fpr)
    masks, maps = _known(*_pixel_pairs(masks, maps))
    ranking = _PixelRanking(masks, maps, connectivity)
    _, fpr, pro = ranking.curves(with_auroc=False, max_fpr=max_fpr)
    if fpr is None:
        raise InputError(
            "the PRO curve needs at least one defective region and one normal pixel in the masks"
        )
    fpr, pro = _truncate_curve(fpr, pro, max_fpr)
    return _thin(fpr, pro, max_points)


def aupro(masks: Any, maps: Any, max_fpr: float = 0.3, connectivity: int = 8) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` (the standard AUPRO).

    The area under :func:`pro_curve` from FPR 0 to ``max_fpr`` (trapezoidal rule, with the
    curve interpolated at exactly ``max_fpr``), divided by ``max_fpr``, so that a perfect map
    scores 1. The axes are **not** min-max rescaled before the area is taken (the HETMM
    authors' code does rescale, which inflates the figure); this is MVTec AD's definition.

    Args:
        masks: bool (n, H, W) or n bool (H_i, W_i) arrays, True = defective pixel.
        maps: anomaly maps of the same shapes.
        max_fpr: integration limit in (0, 1]; 0.3 is the usual one.
        connectivity: 8 (default, as MVTec AD's reference) or 4.

    Returns:
        AUPRO in [0, 1].

    Raises:
        InputError: as :func:`pro_curve`.
    """
    fpr, pro = pro_curve(masks, maps, max_fpr=max_fpr, connectivity=connectivity)
    return _trapezoid(fpr, pro) / max_fpr


# --------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------


def evaluate_scores(
    labels: Any,
    scores: Any,
    defect_types: Sequence[str],
    masks: Any = None,
    maps: Any = None,
    max_fpr: float = 0.3,
    connectivity: int = 8,
) -> dict[str, Any]:
    """All image- and pixel-level metrics, overall and per defect type.

    Per defect type, the images of that type are scored against all the good images (label 0):
    image AUROC over those images, pixel AUROC and AUPRO over their pixels.

    Args:
        labels: (n,) 0 / 1 image labels, 1 = defective.
        scores: (n,) image scores.
        defect_types: n names, e.g. "good", "crack" (from :class:`hetmm_jax.data.Sample`).
        masks: optional bool (n, H, W) or n arrays (H_i, W_i); an entry may be None for a
            defective image without pixel ground truth, which is then left out of pixel metrics.
        maps: anomaly maps matching ``masks``; required when ``masks`` is given.
        max_fpr: AUPRO integration limit.
        connectivity: region connectivity for AUPRO (8 or 4).

    Returns:
        dict with "n_images", "n_defective", "image_auroc", "f1_max", "f1_threshold",
        "pixel_auroc" and "aupro" (None without masks, or when the pixels do not allow them),
        and "per_defect": {defect: {"n", "image_auroc", "pixel_auroc", "aupro"}}.

    Raises:
        InputError: inconsistent lengths or any error of the individual metrics.
    """
    labels, scores = _check_image_level(labels, scores)
    defect_types = [str(d) for d in defect_types]
    if len(defect_types) != labels.size:
        raise InputError(
            f"got {len(defect_types)} defect types for {labels.size} labels and scores"
        )
    if (masks is None) != (maps is None):
        raise InputError("masks and maps must be given together")
    max_fpr = _check_max_fpr(max_fpr)

    f1, threshold = f1_max(labels, scores)
    result: dict[str, Any] = {
        "n_images": int(labels.size),
        "n_defective": int(np.count_nonzero(labels)),
        "image_auroc": image_auroc(labels, scores),
        "f1_max": f1,
        "f1_threshold": threshold,
        "pixel_auroc": None,
        "aupro": None,
        "per_defect": {},
    }

    ranking = None
    with_mask = np.zeros(labels.size, dtype=bool)
    if masks is not None:
        mask_list, map_list = _pixel_pairs(masks, maps, n_expected=labels.size)
        with_mask = np.array([m is not None for m in mask_list])
        known_masks, known_maps = _known(mask_list, map_list)
        ranking = _PixelRanking(known_masks, known_maps, connectivity)
        # Positions of each test image inside the ranking (which only holds masked images).
        position = np.cumsum(with_mask) - 1
        auroc, fpr, pro = ranking.curves(max_fpr=max_fpr)
        result["pixel_auroc"] = auroc
        result["aupro"] = _area(fpr, pro, max_fpr)
        _warn_missing(auroc, fpr, "all images")

    good = ~labels
    defects = sorted({d for d, label in zip(defect_types, labels) if label})
    for defect in defects:
        members = np.array([d == defect for d in defect_types]) & labels
        subset = members | good
        entry: dict[str, Any] = {
            "n": int(np.count_nonzero(members)),
            "image_auroc": image_auroc(labels[subset], scores[subset]),
            "pixel_auroc": None,
            "aupro": None,
        }
        if ranking is not None:
            images = position[subset & with_mask]
            auroc, fpr, pro = ranking.curves(images, max_fpr=max_fpr)
            entry["pixel_auroc"] = auroc
            entry["aupro"] = _area(fpr, pro, max_fpr)
            _warn_missing(auroc, fpr, f"defect {defect!r}")
        result["per_defect"][defect] = entry
    return result


def _area(fpr: np.ndarray | None, pro: np.ndarray | None, max_fpr: float) -> float | None:
    if fpr is None or pro is None:
        return None
    return _trapezoid(*_truncate_curve(fpr, pro, max_fpr)) / max_fpr


def _warn_missing(auroc: float | None, fpr: np.ndarray | None, where: str) -> None:
    if auroc is None:
        log.warning(
            "pixel AUROC undefined for %s: the masks lack defective or normal pixels", where
        )
    if fpr is None:
        log.warning("AUPRO undefined for %s: the masks have no defective region", where)
