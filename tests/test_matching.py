"""HETMM matching against naive loops written straight from the paper's Eqs. 4-6, 10 and 11."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from hetmm_jax import matching
from hetmm_jax.errors import InputError


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _window_offsets(height, width, ph, pw, y, x):
    """Offsets (a, b) of a ph x pw window (ph along rows) whose target lies in the map."""
    for a in range(-(ph // 2), ph // 2 + 1):
        for b in range(-(pw // 2), pw // 2 + 1):
            if 0 <= y + a < height and 0 <= x + b < width:
                yield a, b


def naive_forward(query, templates, ph, pw):
    """Eq. 4, one query image (H, W, C): min over window and sheets of 1 - cos."""
    q, t = _unit(query), _unit(templates)
    height, width, _ = q.shape
    out = np.empty((height, width))
    for y in range(height):
        for x in range(width):
            out[y, x] = min(
                1.0 - q[y, x] @ t[n, y + a, x + b]
                for a, b in _window_offsets(height, width, ph, pw, y, x)
                for n in range(t.shape[0])
            )
    return out


def naive_backward(query, templates, ph, pw):
    """Eq. 5, one query image: min over query pixels p in the window of 1 - max_n cos."""
    q, t = _unit(query), _unit(templates)
    height, width, _ = q.shape
    out = np.empty((height, width))
    for y in range(height):
        for x in range(width):
            out[y, x] = min(
                1.0 - max(q[y + a, x + b] @ t[n, y, x] for n in range(t.shape[0]))
                for a, b in _window_offsets(height, width, ph, pw, y, x)
            )
    return out


def naive_bilinear(image, out_h, out_w):
    """Half-pixel-centre bilinear enlargement with clamped borders (torch align_corners=False)."""
    in_h, in_w = image.shape
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        sy = min(max((i + 0.5) * in_h / out_h - 0.5, 0.0), in_h - 1)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, in_h - 1), sy - y0
        for j in range(out_w):
            sx = min(max((j + 0.5) * in_w / out_w - 0.5, 0.0), in_w - 1)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, in_w - 1), sx - x0
            top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
            bottom = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


def _pair(patch):
    return (patch, patch) if isinstance(patch, int) else patch


def _data(seed, batch, height, width, channels, sheets):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
    templates = rng.normal(size=(sheets, height, width, channels)).astype(np.float32)
    # Un-normalised on purpose: the functions must normalise themselves.
    templates *= rng.uniform(0.5, 3.0, size=(sheets, height, width, 1)).astype(np.float32)
    return query, templates


CASES = [
    # batch, height, width, channels, sheets, forward patch, backward patch
    (1, 5, 6, 4, 3, 3, 3),
    (3, 6, 5, 8, 4, (3, 5), (5, 1)),
    (2, 4, 7, 3, 5, 9, (1, 3)),          # window larger than the map
    (1, 3, 3, 5, 2, (11, 7), 13),        # both windows larger than the map
    (2, 7, 4, 6, 6, 1, 1),               # pixel-to-pixel matching
]


@pytest.mark.parametrize("case", CASES)
def test_forward_backward_hetmm_match_naive_loops(case):
    batch, height, width, channels, sheets, fp, bp = case
    query, templates = _data(1, batch, height, width, channels, sheets)
    want_f = np.stack([naive_forward(q, templates, *_pair(fp)) for q in query])
    want_b = np.stack([naive_backward(q, templates, *_pair(bp)) for q in query])

    np.testing.assert_allclose(matching.forward_hetm(query, templates, fp), want_f, atol=1e-5)
    np.testing.assert_allclose(matching.backward_hetm(query, templates, bp), want_b, atol=1e-5)
    np.testing.assert_allclose(
        matching.hetmm(query, templates, fp, bp, 0.8), 0.8 * want_f + 0.2 * want_b, atol=1e-5
    )
    # An unbatched query gives an unbatched map.
    single = matching.hetmm(query[0], templates, fp, bp, 0.8)
    assert single.shape == (height, width)
    np.testing.assert_allclose(single, 0.8 * want_f[0] + 0.2 * want_b[0], atol=1e-5)


@pytest.mark.parametrize("rows, sheet_chunk", [(1, 1), (2, 3), (3, 2), (4, 5)])
def test_chunking_does_not_change_results(rows, sheet_chunk):
    query, templates = _data(2, 2, 7, 6, 5, 7)
    want = 0.6 * np.stack([naive_forward(q, templates, 5, 3) for q in query])
    want += 0.4 * np.stack([naive_backward(q, templates, 3, 3) for q in query])
    got = matching.hetmm(query, templates, (5, 3), 3, 0.6, rows=rows, sheet_chunk=sheet_chunk)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_small_memory_budget_chunks_and_stays_exact():
    query, templates = _data(3, 1, 8, 8, 16, 9)
    want = np.stack([naive_forward(q, templates, 3, 3) for q in query])
    budget = 10_000
    rows, chunk = matching._plan(1, 8, 8, 16, 9, 9, 4, budget, None, None)
    assert rows == 1 and chunk < 9
    got = matching.forward_hetm(query, templates, 3, max_chunk_bytes=budget)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("sheets", [1, 10, 400, 5000])
@pytest.mark.parametrize("budget", [64 << 20, 1 << 30])
def test_plan_keeps_one_step_within_the_memory_budget(sheets, budget):
    # 64x64x256 maps (WideResNet-101-2 layer 1), window 9, batches of 1 and 8.
    for batch in (1, 8):
        rows, chunk = matching._plan(batch, 64, 64, 256, sheets, 81, 4, budget, None, None)
        assert 1 <= chunk <= sheets and 64 % rows == 0
        query_bytes = rows * 64 * batch * 81 * 256 * 4
        sheet_bytes = rows * 64 * chunk * (2 * 256 * 4 + batch * 81 * 4)
        assert query_bytes + sheet_bytes <= budget


def test_budget_below_the_smallest_step_warns():
    query, templates = _data(3, 1, 4, 4, 8, 2)
    with pytest.warns(RuntimeWarning, match="max_chunk_bytes"):
        matching.forward_hetm(query, templates, 3, max_chunk_bytes=100)


def test_templates_normalized_flag_skips_normalising():
    query, templates = _data(4, 2, 5, 5, 6, 3)
    unit = matching.l2_normalize(templates)
    want = matching.hetmm(query, templates, 3, 3, 0.5)
    got = matching.hetmm(query, unit, 3, 3, 0.5, templates_normalized=True)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_jit_and_vmap_over_queries():
    query, templates = _data(5, 3, 6, 5, 4, 3)
    want = matching.hetmm(query, templates, 5, 3, 0.7)

    jitted = jax.jit(lambda q, t: matching.hetmm(q, t, 5, 3, 0.7))
    np.testing.assert_allclose(jitted(query, templates), want, atol=1e-6)

    mapped = jax.vmap(lambda q: matching.hetmm(q, templates, 5, 3, 0.7))
    np.testing.assert_allclose(mapped(query), want, atol=1e-6)

    # alpha is an ordinary (traceable) argument: d sum(map) / d alpha = sum(forward - backward).
    d_alpha = jax.grad(lambda a: jnp.sum(matching.hetmm(query, templates, 5, 3, a)))(0.7)
    forward = matching.forward_hetm(query, templates, 5)
    backward = matching.backward_hetm(query, templates, 3)
    np.testing.assert_allclose(d_alpha, jnp.sum(forward - backward), rtol=1e-5)


def test_grad_of_image_score_is_a_subgradient_of_the_max():
    query, templates = _data(6, 1, 5, 5, 4, 3)

    def score(q):
        return matching.image_score(matching.forward_hetm(q, templates, 3), sigma=0.0)[0]

    grad = jax.jit(jax.grad(score))(query)
    assert grad.shape == query.shape and np.all(np.isfinite(grad))

    # With no blur only the arg-max pixel moves the score: its gradient is that of
    # 1 - cos(q, t*) for the closest template pixel t*, computed here by hand.
    distances = naive_forward(query[0], templates, 3, 3)
    y, x = np.unravel_index(np.argmax(distances), distances.shape)
    q = query[0, y, x].astype(np.float64)
    best = max(
        ((_unit(templates[n, y + a, x + b]), _unit(q) @ _unit(templates[n, y + a, x + b]))
         for a, b in _window_offsets(5, 5, 3, 3, y, x) for n in range(3)),
        key=lambda item: item[1],
    )[0]
    norm = np.linalg.norm(q)
    want = -(best / norm - (q @ best) * q / norm**3)
    expected = np.zeros_like(grad)
    expected[0, y, x] = want
    np.testing.assert_allclose(grad, expected, atol=1e-5)


def test_grad_flows_through_a_feature_extractor_to_the_image():
    rng = np.random.default_rng(7)
    image = jnp.asarray(rng.normal(size=(1, 8, 8, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 6)), jnp.float32)
    templates = rng.normal(size=(3, 8, 8, 6)).astype(np.float32)

    def score(img):
        feats = jax.lax.conv_general_dilated(
            img, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return matching.image_score(matching.hetmm(feats, templates, 3, 3, 0.8), 1.0)[0]

    grad = jax.grad(score)(image)
    assert grad.shape == image.shape
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_smooth_variant_tends_to_the_exact_result():
    query, templates = _data(8, 2, 5, 6, 4, 4)
    exact = matching.hetmm(query, templates, 3, (3, 1), 0.8)
    gaps = []
    for temperature in (1e-1, 1e-2, 1e-4):
        smooth = matching.smooth_hetmm(query, templates, 3, (3, 1), 0.8, temperature)
        # A soft-max is >= the max, so every soft-min distance is <= the exact one.
        assert np.all(np.asarray(smooth) <= np.asarray(exact) + 1e-6)
        gaps.append(float(np.max(np.abs(smooth - exact))))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-3
    np.testing.assert_allclose(
        matching.smooth_forward_hetm(query, templates, 3, 1e-5),
        matching.forward_hetm(query, templates, 3), atol=1e-4,
    )
    np.testing.assert_allclose(
        matching.smooth_backward_hetm(query, templates, 3, 1e-5),
        matching.backward_hetm(query, templates, 3), atol=1e-4,
    )


def test_smooth_variant_gradient_matches_finite_differences():
    rng = np.random.default_rng(9)
    query = rng.normal(size=(1, 4, 5, 3))
    templates = rng.normal(size=(3, 4, 5, 3)).astype(np.float32)

    def score(q):
        maps = matching.smooth_hetmm(q, templates, 3, 3, 0.7, temperature=0.2)
        return matching.image_score(maps, sigma=1.0)[0] + 0.1 * jnp.sum(maps)

    grad = np.asarray(jax.grad(score)(jnp.asarray(query, jnp.float32)), np.float64)
    step = 1e-2
    for index in [(0, 0, 0, 0), (0, 1, 2, 1), (0, 3, 4, 2), (0, 2, 1, 0), (0, 0, 4, 1)]:
        plus, minus = query.copy(), query.copy()
        plus[index] += step
        minus[index] -= step
        numeric = (float(score(jnp.asarray(plus, jnp.float32)))
                   - float(score(jnp.asarray(minus, jnp.float32)))) / (2 * step)
        np.testing.assert_allclose(grad[index], numeric, atol=2e-3, rtol=2e-2)


def test_bfloat16_templates_stay_close():
    query, templates = _data(10, 2, 6, 6, 16, 5)
    exact = matching.hetmm(query, templates, 3, 3, 0.8)
    unit = matching.l2_normalize(templates).astype(jnp.bfloat16)
    approx = matching.hetmm(query, unit, 3, 3, 0.8, templates_normalized=True)
    assert approx.dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa: cosines are off by a few 1e-3 at most.
    np.testing.assert_allclose(approx, exact, atol=2e-2)


@pytest.mark.parametrize("sigma, shape", [(1.0, (2, 9, 7)), (4.0, (1, 6, 5)), (0.6, (12, 10))])
def test_image_score_and_blur_equal_scipy(sigma, shape):
    maps = np.random.default_rng(11).random(shape).astype(np.float32)
    axes = tuple(range(maps.ndim - 2, maps.ndim))
    blurred = scipy.ndimage.gaussian_filter(maps.astype(np.float64), sigma, axes=axes)
    np.testing.assert_allclose(matching.gaussian_blur(maps, sigma), blurred, atol=1e-5)
    np.testing.assert_allclose(
        matching.image_score(maps, sigma), blurred.max(axis=axes), atol=1e-5
    )


def test_normalize_map():
    maps = np.random.default_rng(12).normal(size=(3, 4, 5)).astype(np.float32)
    maps[2] = 1.5
    got = np.asarray(matching.normalize_map(maps))
    for i in range(2):
        want = (maps[i] - maps[i].min()) / (maps[i].max() - maps[i].min())
        np.testing.assert_allclose(got[i], want, atol=1e-6)
    np.testing.assert_array_equal(got[2], 0.0)
    shared = np.asarray(matching.normalize_map(maps, low=-1.0, high=1.0))
    np.testing.assert_allclose(shared, np.clip((maps + 1.0) / 2.0, 0.0, 1.0), atol=1e-6)


def test_anomaly_map_is_the_weighted_sum_of_resized_layers():
    rng = np.random.default_rng(13)
    shapes = [(8, 8, 4), (4, 4, 6), (2, 2, 5)]
    queries = [rng.normal(size=(2,) + s).astype(np.float32) for s in shapes]
    templates = [rng.normal(size=(3,) + s).astype(np.float32) for s in shapes]
    fps, bps, alphas, weights = [5, (3, 1), 3], [3, 1, 5], [0.8, 0.6, 0.5], [1.0, 0.5, 2.0]

    got = matching.anomaly_map(
        queries, templates, fps, bps, alphas, weights, out_size=(16, 12)
    )
    assert got.shape == (2, 16, 12)
    for b in range(2):
        want = 0.0
        for q, t, fp, bp, a, w in zip(queries, templates, fps, bps, alphas, weights, strict=True):
            layer = a * naive_forward(q[b], t, *_pair(fp))
            layer += (1 - a) * naive_backward(q[b], t, *_pair(bp))
            want = want + w * naive_bilinear(layer, 16, 12)
        np.testing.assert_allclose(got[b], want, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch=4), "odd"),
        (dict(patch=(3, 2)), "odd"),
        (dict(patch="3"), "odd int"),
        (dict(query=np.zeros((2, 5, 5, 4))), "differ"),
        (dict(query=np.zeros((5, 4))), "(H, W, C)"),
        (dict(templates=np.zeros((0, 5, 6, 4))), "0 sheets"),
        (dict(max_chunk_bytes=0), "max_chunk_bytes"),
    ],
)
def test_bad_arguments_raise_input_error(kwargs, message):
    args = dict(
        query=np.ones((5, 6, 4), np.float32), templates=np.ones((2, 5, 6, 4), np.float32),
        patch=3,
    )
    args.update(kwargs)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        matching.forward_hetm(**args)
