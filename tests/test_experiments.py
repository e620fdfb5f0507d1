"""Differentiable-score experiments: repair and adversarial perturbations through the backbone.

One small model (EfficientNet-Lite0 with its real weights, 64 x 64 pixels, layers 1 and 2, four
synthetic templates) is shared by all tests, so its two functions compile once.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import textured

from hetmm_jax import Detector
from hetmm_jax import differentiable as diff
from hetmm_jax.errors import InputError, NotFittedError

SMALL = {
    "backbone": "efficientnet_lite0", "image_size": 64, "layers": ("layer1", "layer2"),
    "forward_patches": (3, 3), "backward_patches": (1, 3), "alphas": 0.8, "sigma": 1.0,
    "batch_size": 4,
}


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(7)
    train = [textured(rng, 64) for _ in range(4)]
    good = textured(rng, 64)
    bad = textured(rng, 64, defect=True)
    detector = Detector(**SMALL).fit(train)
    model = diff.ScoreModel.from_detector(detector, temperature=0.02, pool_temperature=0.01)
    return detector, model, good, bad


def _float(image):
    return np.asarray(image, np.float32) / 255.0


def test_exact_score_is_the_detectors_score(setup):
    # The detector reads uint8 images on its own host path; the model reads floats.
    detector, model, good, bad = setup
    want = detector.predict([good, bad]).scores
    got = [model._exact_one(jnp.asarray(_float(image))) for image in (good, bad)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert want[1] > want[0]


def test_gradient_matches_finite_differences(setup):
    _, model, good, _ = setup
    image = jnp.asarray(_float(good) * 0.9 + 0.05)  # away from the [0, 1] edges
    _, grad = model.value_and_grad(image)
    grad = np.asarray(grad, np.float64)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)

    rng = np.random.default_rng(0)
    directions = [grad / np.linalg.norm(grad)]
    directions += [rng.normal(size=grad.shape) for _ in range(2)]
    h = 2e-3
    for v in directions:
        v = v / np.linalg.norm(v)
        step = jnp.asarray(h * v, jnp.float32)
        numeric = (model._smooth_one(image + step) - model._smooth_one(image - step)) / (2 * h)
        analytic = float(np.sum(grad * v))
        assert abs(numeric - analytic) <= 0.02 * abs(analytic) + 5e-4, (numeric, analytic)


@pytest.mark.parametrize("norm, epsilon", [("linf", 8 / 255), ("l2", 1.0)])
def test_repair_lowers_the_exact_score_within_budget(setup, norm, epsilon):
    _, model, _, bad = setup
    image = _float(bad)
    result = diff.repair(model, image, epsilon=epsilon, norm=norm, steps=8)

    assert result.exact_after < 0.95 * result.exact_before, (result.exact_before,
                                                            result.exact_after)
    assert result.success
    assert result.smooth_scores.shape == (9,)
    assert result.smooth_after <= result.smooth_scores[0]
    # Budget and box, measured here with NumPy rather than the module's own norm.
    delta = result.perturbed - image
    size = np.abs(delta).max() if norm == "linf" else np.sqrt(np.sum(delta.astype(np.float64)
                                                                     ** 2))
    assert size <= epsilon * (1 + 1e-5)
    assert result.perturbed.min() >= 0.0 and result.perturbed.max() <= 1.0
    # The reported exact score is that of the returned image.
    assert model._exact_one(jnp.asarray(result.perturbed)) == pytest.approx(result.exact_after,
                                                                            abs=1e-5)


def test_adversarial_lifts_a_good_image_past_the_threshold(setup):
    _, model, good, bad = setup
    good_score = model._exact_one(jnp.asarray(_float(good)))
    bad_score = model._exact_one(jnp.asarray(_float(bad)))
    threshold = good_score + 0.3 * (bad_score - good_score)
    result = diff.adversarial(model, _float(good), threshold, norm="l2", steps=25,
                              learning_rate=1e-2, shrink_steps=6)

    assert result.success and result.exact_before < threshold < result.exact_after
    assert model._exact_one(jnp.asarray(result.perturbed)) > threshold
    assert result.perturbed.min() >= 0.0 and result.perturbed.max() <= 1.0
    norm = np.sqrt(np.sum((result.perturbed - _float(good)).astype(np.float64) ** 2))
    assert result.delta_norm == pytest.approx(norm, rel=1e-4)
    # The line search only shrinks the perturbation the optimiser found.
    assert 0 < result.delta_norm


def test_project_holds_ball_and_box():
    rng = np.random.default_rng(3)
    image = rng.uniform(size=(4, 4, 3)).astype(np.float32)
    delta = rng.normal(scale=0.5, size=(4, 4, 3)).astype(np.float32)
    linf = np.asarray(diff.project(jnp.asarray(delta), jnp.asarray(image), 0.1, "linf"))
    # L-inf ball and box are both boxes: the projection is an elementwise clip.
    want = np.clip(image + np.clip(delta, -0.1, 0.1), 0, 1) - image
    np.testing.assert_allclose(linf, want, atol=1e-6)
    l2 = np.asarray(diff.project(jnp.asarray(delta), jnp.asarray(image), 0.5, "l2"))
    assert np.linalg.norm(l2) <= 0.5 + 1e-5
    assert (image + l2).min() >= 0 and (image + l2).max() <= 1 + 1e-6


def test_inputs_are_checked(setup):
    _, model, good, _ = setup
    with pytest.raises(InputError, match="norm="):
        diff.repair(model, _float(good), norm="l1")
    with pytest.raises(InputError, match="expected"):
        diff.repair(model, np.zeros((32, 32, 3), np.float32))
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        diff.repair(model, _float(good) * 2.0)
    with pytest.raises(NotFittedError):
        diff.ScoreModel.from_detector(Detector(**SMALL))
