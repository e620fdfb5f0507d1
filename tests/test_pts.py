"""Tests of hetmm_jax.selection against a plain loop of Algorithm 1 and against scikit-learn OPTICS."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.cluster import OPTICS

from hetmm_jax.errors import InputError
from hetmm_jax.selection import (
    TIE_TOLERANCE,
    compress_templates,
    cosine_distances,
    optics_labels,
    pts,
    select_indices,
)


def naive_algorithm1(vectors: np.ndarray, labels: np.ndarray, k: int) -> list[int]:
    """Algorithm 1 (Eqs. 7-9) at one position, written as plainly as the paper states it."""
    n = len(vectors)
    unit = [v / max(float(np.linalg.norm(v)), 1e-12) for v in vectors.astype(np.float64)]

    def cos(i: int, j: int) -> float:
        return float(np.dot(unit[i], unit[j]))

    def first_max(scores: dict[int, float], terms: int) -> int:
        # Equal up to rounding (TIE_TOLERANCE per summed cosine): the lowest index wins.
        best = max(scores.values())
        return min(i for i, s in scores.items() if s >= best - TIE_TOLERANCE * max(terms, 1))

    def centre(members: list[int]) -> int:
        scores = {i: sum(cos(i, j) for j in members) for i in members}
        return first_max(scores, len(members))

    kept = []
    for region in sorted({int(v) for v in labels if v >= 0}):
        kept.append(centre([i for i in range(n) if labels[i] == region]))  # Eq. 7
    if not kept:
        kept.append(centre(list(range(n))))  # Eq. 8
    kept = kept[:k]
    while len(kept) < k:
        scores = {i: sum(1.0 - cos(i, j) for j in kept) for i in range(n) if i not in kept}
        kept.append(first_max(scores, len(kept)))  # Eq. 9
    return kept


def naive_layer(templates: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N, H, W, C), (H, W, N) -> (K, H, W) indices by the plain loop at every position."""
    _, height, width, _ = templates.shape
    out = np.empty((k, height, width), dtype=np.int64)
    for y in range(height):
        for x in range(width):
            out[:, y, x] = naive_algorithm1(templates[:, y, x], labels[y, x], k)
    return out


def random_labels(rng, height, width, n, n_regions, noise=0.3):
    labels = rng.integers(0, max(n_regions, 1), size=(height, width, n))
    labels[rng.random((height, width, n)) < noise] = -1
    if n_regions == 0:
        labels[:] = -1
    return labels


@pytest.mark.parametrize(
    "n, k, n_regions",
    [
        (16, 4, 2),  # regions, then hard-nominal steps
        (16, 4, 0),  # no region: global centre first (Eq. 8)
        (16, 3, 7),  # more regions than K: the first K centres
        (16, 1, 3),  # K = 1
        (16, 15, 3),  # K = N - 1
        (25, 6, 1),
    ],
)
def test_selection_matches_naive_loop(n, k, n_regions):
    rng = np.random.default_rng(n * 100 + k * 10 + n_regions)
    templates = rng.normal(size=(n, 3, 2, 5)).astype(np.float32)
    labels = random_labels(rng, 3, 2, n, n_regions)
    expected = naive_layer(templates, labels, k)

    out, indices = pts(templates, k, labels=labels, return_indices=True)

    np.testing.assert_array_equal(indices, expected)
    for s in range(k):
        for y in range(3):
            for x in range(2):
                np.testing.assert_array_equal(out[s, y, x], templates[expected[s, y, x], y, x])


def test_sparse_label_values_are_visited_in_increasing_order():
    rng = np.random.default_rng(3)
    templates = rng.normal(size=(12, 1, 1, 4)).astype(np.float32)
    labels = np.array([[[9, 2, 2, -1, 9, 5, 5, 5, -1, 2, 9, -1]]])
    expected = naive_layer(templates, labels, 5)
    np.testing.assert_array_equal(select_indices(templates, labels, 5), expected)


@pytest.mark.parametrize("n_regions", [0, 2, 5])
def test_duplicated_vectors_break_ties_toward_lowest_index(n_regions):
    rng = np.random.default_rng(11 + n_regions)
    n = 18
    base = rng.normal(size=(4, 2, 2, 6)).astype(np.float32)
    templates = base[rng.integers(0, 4, size=n)]  # every vector has duplicates: exact ties
    templates[7] = templates[2] * 2.0  # same direction, so the same cosines
    labels = random_labels(rng, 2, 2, n, n_regions, noise=0.2)
    for k in (1, 3, 6, n - 1):
        expected = naive_layer(templates, labels, k)
        np.testing.assert_array_equal(select_indices(templates, labels, k), expected)
    # Among equal vectors the lowest index is kept first.
    single = select_indices(templates, np.full((2, 2, n), -1), 1)
    for y in range(2):
        for x in range(2):
            i = int(single[0, y, x])
            same = [j for j in range(n) if np.allclose(
                templates[j, y, x] / np.linalg.norm(templates[j, y, x]),
                templates[i, y, x] / np.linalg.norm(templates[i, y, x]))]
            assert i == min(same)


def test_chunking_and_padding_do_not_change_the_result():
    rng = np.random.default_rng(5)
    templates = rng.normal(size=(20, 3, 3, 4)).astype(np.float32)
    labels = random_labels(rng, 3, 3, 20, 3)
    whole = select_indices(templates, labels, 7)
    for chunk in (1, 2, 4):
        np.testing.assert_array_equal(select_indices(templates, labels, 7, chunk_size=chunk), whole)


def clustered_templates(rng, n, height, width, channels):
    """Vectors around a few directions per position, so OPTICS finds regions."""
    centres = rng.normal(size=(3, height, width, channels)) * 3.0
    which = rng.integers(0, 3, size=n)
    spread = rng.choice([0.3, 1.5], size=(n, 1, 1, 1))
    noise = rng.normal(size=(n, height, width, channels)) * spread
    return (centres[which] + noise).astype(np.float32)


def test_optics_labels_match_sklearn_per_position():
    rng = np.random.default_rng(0)
    templates = clustered_templates(rng, 48, 2, 2, 6)
    labels = optics_labels(templates, min_samples=4, n_jobs=1)
    found_regions = 0
    for y in range(2):
        for x in range(2):
            vectors = templates[:, y, x].astype(np.float64)
            by_cosine = OPTICS(min_samples=4, metric="cosine").fit(vectors)
            by_matrix = OPTICS(min_samples=4, metric="precomputed").fit(cosine_distances(vectors))
            np.testing.assert_array_equal(labels[y, x], by_cosine.labels_)
            np.testing.assert_array_equal(labels[y, x], by_matrix.labels_)
            found_regions += by_matrix.labels_.max() + 1
    assert found_regions > 0  # the case exercises region centres, not only Eq. 8


def test_optics_options_are_passed_through():
    rng = np.random.default_rng(8)
    templates = clustered_templates(rng, 40, 1, 2, 5)
    labels = optics_labels(templates, min_samples=3, xi=0.2, min_cluster_size=6, n_jobs=1)
    for x in range(2):
        ref = OPTICS(min_samples=3, xi=0.2, min_cluster_size=6, metric="cosine")
        np.testing.assert_array_equal(labels[0, x], ref.fit(templates[:, 0, x]).labels_)


def test_pts_with_optics_matches_naive_loop_on_sklearn_labels():
    rng = np.random.default_rng(1)
    n, k = 40, 5
    templates = clustered_templates(rng, n, 2, 3, 6)
    sk_labels = np.stack([
        np.stack([
            OPTICS(min_samples=max(2, n // k), metric="cosine").fit(templates[:, y, x]).labels_
            for x in range(3)
        ])
        for y in range(2)
    ])
    _, indices = pts(templates, k, return_indices=True, n_jobs=1)
    np.testing.assert_array_equal(indices, naive_layer(templates, sk_labels, k))


def test_pts_is_deterministic_across_runs_and_process_counts():
    rng = np.random.default_rng(2)
    templates = clustered_templates(rng, 36, 3, 3, 4)
    first = pts(templates, 4, n_jobs=1)
    np.testing.assert_array_equal(pts(templates, 4, n_jobs=1), first)
    np.testing.assert_array_equal(pts(templates, 4, n_jobs=2), first)


def test_cosine_distances_are_symmetric_nonnegative_with_zero_diagonal():
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(2, 30, 7))
    vectors[0, 5] = vectors[0, 4] * 3.0  # rounding can make 1 - cos slightly negative
    vectors[1, 9] = 0.0
    dist = cosine_distances(vectors)
    assert dist.shape == (2, 30, 30)
    np.testing.assert_array_equal(dist, np.swapaxes(dist, -1, -2))
    np.testing.assert_array_equal(np.diagonal(dist, axis1=-2, axis2=-1), 0.0)
    assert dist.min() >= 0.0 and dist.max() <= 2.0
    unit = vectors[0] / np.linalg.norm(vectors[0], axis=-1, keepdims=True)
    np.testing.assert_allclose(dist[0], 1.0 - unit @ unit.T, atol=1e-12)
    assert np.allclose(np.delete(dist[1, 9], 9), 1.0)


def test_random_strategies():
    rng = np.random.default_rng(6)
    templates = rng.normal(size=(30, 4, 4, 3)).astype(np.float32)
    out, per_pixel = pts(templates, 5, strategy="random", seed=3, return_indices=True)
    again = pts(templates, 5, strategy="random", seed=3, return_indices=True)[1]
    np.testing.assert_array_equal(per_pixel, again)
    assert per_pixel.min() >= 0 and per_pixel.max() < 30
    flat = per_pixel.reshape(5, -1)
    assert all(len(set(flat[:, p])) == 5 for p in range(flat.shape[1]))
    assert len({tuple(flat[:, p]) for p in range(flat.shape[1])}) > 1  # differs across pixels
    np.testing.assert_array_equal(
        out, np.take_along_axis(templates, per_pixel[..., None].astype(int), axis=0)
    )

    out, per_image = pts(templates, 5, strategy="random_image", seed=3, return_indices=True)
    sheets = per_image[:, 0, 0]
    assert len(set(sheets)) == 5 and list(sheets) == sorted(sheets)
    assert (per_image == sheets[:, None, None]).all()
    np.testing.assert_array_equal(out, templates[sheets])
    assert not np.array_equal(
        pts(templates, 5, strategy="random_image", seed=4, return_indices=True)[1], per_image
    )


def test_kmeans_keeps_one_distinct_member_per_cluster():
    rng = np.random.default_rng(7)
    k, per_cluster = 4, 6
    directions = np.eye(8)[:k] * 10.0
    which = np.repeat(np.arange(k), per_cluster)
    templates = (directions[which][:, None, None, :]
                 + rng.normal(size=(k * per_cluster, 2, 2, 8)) * 0.3).astype(np.float32)
    _, indices = pts(templates, k, strategy="kmeans", seed=0, n_jobs=1, return_indices=True)
    for y in range(2):
        for x in range(2):
            assert sorted(which[indices[:, y, x]]) == list(range(k))
    # Fewer distinct vectors than K: members stay distinct.
    dup = np.repeat(templates[:3], 4, axis=0)
    _, indices = pts(dup, 5, strategy="kmeans", n_jobs=1, return_indices=True)
    assert all(len(set(indices[:, y, x])) == 5 for y in range(2) for x in range(2))


def test_compress_templates_keeps_structure():
    rng = np.random.default_rng(9)
    layers = {
        "layer1": rng.normal(size=(12, 4, 4, 3)).astype(np.float32),
        "layer2": rng.normal(size=(12, 2, 2, 5)).astype(np.float32),
    }
    out = compress_templates(layers, 3, strategy="random", seed=1)
    assert list(out) == ["layer1", "layer2"]
    for name, layer in layers.items():
        np.testing.assert_array_equal(out[name], pts(layer, 3, strategy="random", seed=1))
    as_list = compress_templates(list(layers.values()), 3, strategy="random_image")
    assert [a.shape for a in as_list] == [(3, 4, 4, 3), (3, 2, 2, 5)]
    with pytest.raises(InputError):
        compress_templates(layers, 3, labels=np.zeros((4, 4, 12), int))
    with pytest.raises(InputError):
        compress_templates("layer1", 3)


def test_k_at_least_n_returns_the_set_unchanged_with_a_warning():
    templates = np.random.default_rng(0).normal(size=(5, 2, 2, 3)).astype(np.float32)
    for k in (5, 9):
        with pytest.warns(UserWarning, match="unchanged"):
            out = pts(templates, k)
        np.testing.assert_array_equal(out, templates)


def test_errors():
    templates = np.random.default_rng(0).normal(size=(6, 2, 2, 3)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for bad_k in (0, -1, 2.0, True):
            with pytest.raises(InputError, match="k="):
                pts(templates, bad_k)
    nan = templates.copy()
    nan[2, 1, 0, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        pts(nan, 2)
    with pytest.raises(InputError, match="shape"):
        pts(templates[0], 2)
    with pytest.raises(InputError, match="dtype"):
        pts(templates.astype(np.int32), 2)
    with pytest.raises(InputError, match="strategy"):
        pts(templates, 2, strategy="median")
    with pytest.raises(InputError, match="labels"):
        pts(templates, 2, labels=np.zeros((2, 2, 5), int))
    with pytest.raises(InputError, match="labels"):
        pts(templates, 2, labels=np.full((2, 2, 6), 6))
    with pytest.raises(InputError, match="labels"):
        pts(templates, 2, labels=np.zeros((2, 2, 6)))
    with pytest.raises(InputError, match="labels"):
        pts(templates, 2, strategy="random", labels=np.zeros((2, 2, 6), int))
    with pytest.raises(InputError, match="min_samples"):
        pts(templates, 2, min_samples=1)
    with pytest.raises(InputError, match="min_samples"):
        pts(templates, 2, min_samples=7)
    with pytest.raises(InputError, match="optics_params"):
        pts(templates, 2, optics_params={"metric": "euclidean"})
    with pytest.raises(InputError, match="n_jobs"):
        pts(templates, 2, n_jobs=0)
    with pytest.raises(InputError, match="chunk_size"):
        pts(templates, 2, labels=np.zeros((2, 2, 6), int), chunk_size=0)
