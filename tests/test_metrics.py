"""Tests of hetmm_jax.metrics against scikit-learn, brute force and cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from hetmm_jax import metrics
from hetmm_jax.errors import InputError

# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def pairwise_auroc(labels, scores):
    """AUROC as the probability that a defective sample outranks a good one (ties 1/2)."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def brute_pro_curve(masks, maps, thresholds, connectivity=8):
    """(fpr, pro) at the given thresholds, region by region, with plain loops."""
    structure = np.ones((3, 3)) if connectivity == 8 else None
    regions = []
    normal_scores = []
    for mask, amap in zip(masks, maps):
        labelled, n = ndimage.label(mask, structure=structure)
        for r in range(1, n + 1):
            regions.append(amap[labelled == r])
        normal_scores.append(amap[~mask])
    normal_scores = np.concatenate(normal_scores)
    fpr, pro = [0.0], [0.0]
    for t in sorted(thresholds, reverse=True):
        fpr.append(np.mean(normal_scores >= t))
        pro.append(np.mean([np.mean(region >= t) for region in regions]))
    return np.array(fpr), np.array(pro)


def brute_aupro(masks, maps, max_fpr=0.3, thresholds=None, connectivity=8):
    if thresholds is None:
        thresholds = np.unique(np.concatenate([np.ravel(m) for m in maps]))
    fpr, pro = brute_pro_curve(masks, maps, thresholds, connectivity)
    # np.interp needs strictly increasing x for a well-defined value; the curve may have
    # vertical steps, so keep the highest PRO reached at each FPR up to max_fpr.
    inside = fpr <= max_fpr
    x = list(fpr[inside])
    y = list(pro[inside])
    beyond = np.flatnonzero(~inside)
    if x[-1] < max_fpr and beyond.size:
        j = beyond[0]
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        x.append(max_fpr)
        y.append(y0 + (max_fpr - x0) * (y1 - y0) / (x1 - x0))
    area = sum((x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2 for i in range(1, len(x)))
    return area / max_fpr


def random_pixel_set(rng, n=6, size=(12, 10), levels=None, empty=(1,)):
    """Masks with a few rectangles (some images good, some with empty masks) and maps."""
    masks = np.zeros((n, *size), dtype=bool)
    for i in range(n):
        if i % 3 == 0 or i in empty:
            continue
        for _ in range(rng.integers(1, 3)):
            r, c = rng.integers(0, size[0] - 2), rng.integers(0, size[1] - 2)
            masks[i, r : r + rng.integers(1, 4), c : c + rng.integers(1, 5)] = True
    maps = rng.normal(size=(n, *size)) + 1.5 * masks
    if levels is not None:
        maps = np.round(maps * levels) / levels  # many ties
    return masks, maps.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rounding", [None, 1])
def test_image_auroc_matches_sklearn_and_pair_counting(seed, rounding):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    labels[:2] = [0, 1]
    scores = rng.normal(size=150) + labels
    if rounding is not None:
        scores = np.round(scores, rounding)
    ours = metrics.image_auroc(labels, scores)
    assert ours == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert ours == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)


def test_image_auroc_hand_cases():
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.image_auroc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert metrics.image_auroc([0, 1], [0.5, 0.5]) == 0.5
    # 1 defective above both good ones, 1 between them: (2 + 1) / 4 pairs.
    assert metrics.image_auroc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.9]) == 0.75
    assert metrics.image_auroc(np.array([False, True]), np.array([1, 2])) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_matches_sklearn_and_loop(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 120)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=120) + labels, 1)
    f1, threshold = metrics.f1_max(labels, scores)

    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        sk_f1 = 2 * precision * recall / (precision + recall)
    assert f1 == pytest.approx(np.nanmax(sk_f1), abs=1e-12)

    # The returned threshold reproduces the F1, and no higher threshold reaches it.
    predicted = scores >= threshold
    assert skm.f1_score(labels, predicted) == pytest.approx(f1, abs=1e-12)
    for t in np.unique(scores):
        f1_t = skm.f1_score(labels, scores >= t)
        assert f1_t <= f1 + 1e-12
        if t > threshold:
            assert f1_t < f1 - 1e-12


def test_f1_max_tie_rule_takes_highest_threshold():
    # threshold 0.9 -> TP 1, FP 0, FN 1: F1 2/3; threshold 0.5 -> TP 2, FP 2: F1 4/6 = 2/3.
    labels = [1, 0, 0, 1, 0]
    scores = [0.9, 0.5, 0.5, 0.5, 0.1]
    f1, threshold = metrics.f1_max(labels, scores)
    assert f1 == pytest.approx(2 / 3)
    assert threshold == 0.9


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 80)
    scores = np.round(rng.normal(size=80) + labels, 1)
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thr[1:])
    thin_fpr, thin_tpr, _ = metrics.roc_curve(labels, scores, max_points=10)
    assert thin_fpr.size <= 10 and thin_fpr[0] == 0 and thin_fpr[-1] == 1 and thin_tpr[-1] == 1


# --------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 2])
def test_pixel_auroc_matches_sklearn(levels):
    rng = np.random.default_rng(3)
    masks, maps = random_pixel_set(rng, n=8, levels=levels)
    expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert metrics.pixel_auroc(list(masks), list(maps.astype(np.float64))) == pytest.approx(
        expected, abs=1e-12
    )


def test_pixel_metrics_accept_images_of_different_sizes():
    rng = np.random.default_rng(4)
    masks_a, maps_a = random_pixel_set(rng, n=4, size=(9, 7), empty=())
    masks_b, maps_b = random_pixel_set(rng, n=4, size=(5, 13), empty=())
    masks = list(masks_a) + list(masks_b)
    maps = list(maps_a) + list(maps_b)
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(
        skm.roc_auc_score(flat_masks, flat_maps), abs=1e-12
    )
    assert metrics.aupro(masks, maps) == pytest.approx(brute_aupro(masks, maps), abs=1e-9)


def test_aupro_perfect_map_is_one():
    rng = np.random.default_rng(0)
    masks, _ = random_pixel_set(rng)
    assert metrics.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    # Any map ranking every defective pixel above every normal one is perfect too.
    maps = np.where(masks, 5.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert metrics.aupro(masks, maps) == pytest.approx(1.0)


def test_aupro_half_of_one_region_and_all_of_another():
    # Region A (4 pixels): half covered; region B (2 pixels): fully covered; no normal pixel
    # above 0. At FPR 0 the PRO is (1/2 + 1) / 2 = 3/4, then the curve goes straight to (1, 1):
    # area / 0.3 = 3/4 + (1/4) * 0.3 / 2 = 0.7875.
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0:4] = True
    mask[4, 4:6] = True
    amap = np.zeros((6, 6), dtype=np.float32)
    amap[0, 0:2] = 1.0
    amap[4, 4:6] = 1.0
    assert metrics.aupro(mask[None], amap[None]) == pytest.approx(0.7875)
    fpr, pro = metrics.pro_curve(mask[None], amap[None], max_fpr=0.3)
    np.testing.assert_allclose(fpr, [0, 0, 0.3])
    np.testing.assert_allclose(pro, [0, 0.75, 0.825])


def test_aupro_is_not_rescaled():
    # 10 defective pixels at 0.9 and 9 of 90 normal pixels at 0.95 (above them): the curve is
    # (0, 0) -> (0.1, 0) -> (0.1, 1) -> (1, 1). Area up to 0.3 is 0.2, AUPRO = 0.2 / 0.3 = 2/3.
    # The HETMM authors' code min-max rescales the axes first, which changes this figure; the
    # standard does not.
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, :] = True
    amap = np.zeros((10, 10))
    amap[0, :] = 0.9
    amap[1, :9] = 0.95
    assert metrics.aupro(mask[None], amap[None]) == pytest.approx(2 / 3)
    assert metrics.aupro(mask[None], amap[None], max_fpr=1.0) == pytest.approx(0.9)


def test_aupro_connectivity():
    # A single pixel touching a 3-pixel bar diagonally: one region of 4 pixels with
    # 8-connectivity, two regions (1 and 3 pixels) with 4-connectivity. Only the single pixel
    # scores high: PRO at FPR 0 is 1/4 vs 1/2, and AUPRO = a + (1 - a) * 0.15.
    mask = np.zeros((5, 6), dtype=bool)
    mask[1, 1] = True
    mask[2, 2:5] = True
    amap = np.zeros((5, 6))
    amap[1, 1] = 1.0
    assert metrics.aupro(mask[None], amap[None]) == pytest.approx(0.25 + 0.75 * 0.15)
    assert metrics.aupro(mask[None], amap[None], connectivity=4) == pytest.approx(0.575)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 3])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed, levels, max_fpr):
    rng = np.random.default_rng(seed)
    masks, maps = random_pixel_set(rng, n=7, levels=levels)
    ours = metrics.aupro(masks, maps, max_fpr=max_fpr)
    assert ours == pytest.approx(brute_aupro(masks, maps, max_fpr), abs=1e-9)
    ours4 = metrics.aupro(masks, maps, max_fpr=max_fpr, connectivity=4)
    assert ours4 == pytest.approx(brute_aupro(masks, maps, max_fpr, connectivity=4), abs=1e-9)


def test_aupro_close_to_many_evenly_spaced_thresholds():
    rng = np.random.default_rng(11)
    masks, maps = random_pixel_set(rng, n=6, size=(16, 16))
    thresholds = np.linspace(maps.min(), maps.max(), 3000)
    approx = brute_aupro(masks, maps, thresholds=thresholds)
    assert metrics.aupro(masks, maps) == pytest.approx(approx, abs=1e-3)


def test_pro_curve_shape_and_float_paths_agree():
    rng = np.random.default_rng(5)
    masks, maps = random_pixel_set(rng, n=6, levels=2)
    maps = maps - 1.0  # negative scores exercise the packed float32 keys
    maps[0, 0, 0] = -0.0
    maps[0, 0, 1] = 0.0
    fpr, pro = metrics.pro_curve(masks, maps, max_fpr=0.3)
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == pytest.approx(0.3)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    fpr64, pro64 = metrics.pro_curve(masks, maps.astype(np.float64), max_fpr=0.3)
    np.testing.assert_allclose(fpr, fpr64)
    np.testing.assert_allclose(pro, pro64)
    full_fpr, full_pro = metrics.pro_curve(masks, maps)
    assert full_fpr[-1] == 1.0 and full_pro[-1] == pytest.approx(1.0)
    thin_fpr, _ = metrics.pro_curve(masks, maps, max_points=5)
    assert thin_fpr.size <= 5 and thin_fpr[-1] == 1.0


def test_empty_masks_add_normal_pixels_only():
    mask = np.zeros((2, 4, 4), dtype=bool)
    mask[0, 0, 0] = True
    amap = np.zeros((2, 4, 4))
    amap[0, 0, 0] = 1.0
    assert metrics.aupro(mask, amap) == pytest.approx(1.0)
    amap[1] = 2.0  # an empty-mask image whose 16 pixels all outrank the defect
    # FPR jumps to 16/31 before any region pixel is found; nothing within 0.3.
    assert metrics.aupro(mask, amap) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------
# evaluate_scores
# --------------------------------------------------------------------------------------------


def test_evaluate_scores_matches_independent_per_defect_metrics():
    rng = np.random.default_rng(8)
    masks, maps = random_pixel_set(rng, n=12, levels=4, empty=(1, 2))
    labels = np.array([int(i % 3 != 0) for i in range(12)])
    defect_types = [
        "good" if not lab else ("crack" if i % 2 else "hole") for i, lab in enumerate(labels)
    ]
    scores = maps.reshape(12, -1).max(axis=1)
    result = metrics.evaluate_scores(labels, scores, defect_types, masks, maps)

    assert result["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert result["pixel_auroc"] == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()))
    assert result["aupro"] == pytest.approx(brute_aupro(masks, maps), abs=1e-9)
    assert result["f1_max"] == pytest.approx(metrics.f1_max(labels, scores)[0])
    assert result["n_images"] == 12 and result["n_defective"] == int(labels.sum())
    assert set(result["per_defect"]) == {"crack", "hole"}
    for defect, entry in result["per_defect"].items():
        subset = np.array([d in ("good", defect) for d in defect_types])
        assert entry["n"] == sum(d == defect for d in defect_types)
        assert entry["image_auroc"] == pytest.approx(
            skm.roc_auc_score(labels[subset], scores[subset])
        )
        assert entry["pixel_auroc"] == pytest.approx(
            skm.roc_auc_score(masks[subset].ravel(), maps[subset].ravel())
        )
        assert entry["aupro"] == pytest.approx(brute_aupro(masks[subset], maps[subset]), abs=1e-9)
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= result[key] <= 1.0


def test_evaluate_scores_without_masks_and_with_unknown_masks():
    rng = np.random.default_rng(9)
    masks, maps = random_pixel_set(rng, n=9, empty=())
    labels = np.array([int(i % 3 != 0) for i in range(9)])
    types = ["good" if not lab else "dent" for lab in labels]
    scores = maps.reshape(9, -1).max(axis=1)

    image_only = metrics.evaluate_scores(labels, scores, types)
    assert image_only["pixel_auroc"] is None and image_only["aupro"] is None
    assert image_only["per_defect"]["dent"]["aupro"] is None

    partial = list(masks)
    partial[1] = None  # a defective image whose mask is unknown
    result = metrics.evaluate_scores(labels, scores, types, partial, maps)
    keep = np.arange(9) != 1
    assert result["pixel_auroc"] == pytest.approx(
        skm.roc_auc_score(masks[keep].ravel(), maps[keep].ravel())
    )
    assert result["aupro"] == pytest.approx(brute_aupro(masks[keep], maps[keep]), abs=1e-9)
    assert result["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, scores))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", [metrics.image_auroc, metrics.f1_max, metrics.roc_curve])
def test_single_class_is_refused(function):
    with pytest.raises(InputError, match="only good"):
        function([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="only defective"):
        function([1, 1], [0.1, 0.2])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_refused(bad):
    with pytest.raises(InputError, match="NaN or infinite"):
        metrics.image_auroc([0, 1, 1], [0.1, bad, 0.3])
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[1, 1, 1] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 2, 2] = bad
    with pytest.raises(InputError, match=r"maps\[0\].*NaN or infinite"):
        metrics.aupro(masks, maps)


def test_shape_and_value_errors():
    with pytest.raises(InputError, match="same length"):
        metrics.image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(InputError, match="1-D"):
        metrics.image_auroc([[0, 1]], [[0.1, 0.2]])
    with pytest.raises(InputError, match="0 / 1"):
        metrics.image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="real numbers"):
        metrics.image_auroc([0, 1], ["a", "b"])

    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 0, 0] = True
    with pytest.raises(InputError, match="shape"):
        metrics.aupro(masks, np.zeros((2, 4, 5)))
    with pytest.raises(InputError, match="2 masks but 3 maps"):
        metrics.pixel_auroc(masks, np.zeros((3, 4, 4)))
    with pytest.raises(InputError, match=r"\(n, H, W\)"):
        metrics.pixel_auroc(masks[0], np.zeros((4, 4)))
    with pytest.raises(InputError, match="0 / 255"):
        metrics.aupro(masks.astype(np.uint8) * 255, np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="max_fpr"):
        metrics.aupro(masks, np.zeros((2, 4, 4)), max_fpr=0.0)
    with pytest.raises(InputError, match="connectivity"):
        metrics.aupro(masks, np.zeros((2, 4, 4)), connectivity=6)
    with pytest.raises(InputError, match="defective region"):
        metrics.aupro(np.zeros((2, 4, 4), dtype=bool), np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="only good"):
        metrics.pixel_auroc(np.zeros((2, 4, 4), dtype=bool), np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="defect types"):
        metrics.evaluate_scores([0, 1], [0.1, 0.2], ["good"])
    with pytest.raises(InputError, match="together"):
        metrics.evaluate_scores([0, 1], [0.1, 0.2], ["good", "x"], masks=masks)
    with pytest.raises(InputError, match="for 2 images"):
        metrics.evaluate_scores([0, 1], [0.1, 0.2], ["good", "x"], masks[:1], np.zeros((1, 4, 4)))
