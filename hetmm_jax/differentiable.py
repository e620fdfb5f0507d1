"""Differentiable-score experiments: optimise an input perturbation with optax.

The exact HETMM score (hard minima and maxima) has a gradient almost everywhere, but it reaches
only the single best-matching template pixel and the single highest pixel of the map. These
experiments use the smooth matching of :func:`hetmm_jax.matching.smooth_hetmm` instead: every
minimum over sheets and window offsets becomes a soft-minimum at ``temperature`` (cosine units),
and the global maximum of the blurred map becomes an optional soft-maximum at
``pool_temperature`` (score units). Gradients flow from that score through the matching, the
bilinear resize, the Gaussian blur and the Flax backbone down to the image pixels.

Two experiments, both scored at the end with the EXACT matching (what a detector reports):

* :func:`repair` -- the perturbation within a norm budget (L-inf or L2 ``epsilon``) that lowers
  the score of a (defective) image most: projected Adam steps on the smooth score.
* :func:`adversarial` -- a small perturbation that lifts a (good) image's exact score above a
  threshold: Adam on ``||delta|| + penalty * relu(target - smooth score)``, then a bisection
  along the found direction for the smallest scale whose exact score still passes.

Example:
    >>> model = ScoreModel.from_detector(detector)         # a fitted Detector
    >>> result = repair(model, image, epsilon=8 / 255, norm="linf", steps=50)
    >>> result.exact_before, result.exact_after
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hetmm_jax import matching, postprocess
from hetmm_jax.errors import InputError, NotFittedError

log = logging.getLogger(__name__)

NORMS = ("linf", "l2")
"""Perturbation norms: the largest absolute pixel change, or the Euclidean length of delta
(pixel values on the [0, 1] scale, summed over all H * W * 3 entries)."""

__all__ = [
    "NORMS", "PerturbationResult", "ScoreModel", "adversarial", "perturbation_norm", "project",
    "repair",
]


class ScoreModel:
    """The image score as a pure, differentiable function of a float image.

    Args:
        features_fn: ``features_fn(variables, images)`` with images (B, S, S, 3) float in [0, 1]
            returning dict layer -> (B, h, w, C), e.g.
            :meth:`hetmm_jax.features.FeatureExtractor.features_fn`.
        variables: the backbone's Flax variables.
        templates: per layer, (N, h, w, C) template sheets with unit L2 norm.
        layers: names of the layers, in the order of ``templates``.
        forward_patches, backward_patches: per layer, odd int or (height, width) windows.
        alphas: per layer, forward weight of Eq. 6.
        layer_weights: per layer, weight of the sum of Eq. 10.
        sigma: Gaussian blur of the map before pooling, pixels at ``image_size``.
        image_size: side S of the square model resolution, pixels.
        temperature: softness of the smooth matching, cosine units (0.01 - 0.05 keeps the
            smooth map within a few hundredths of the exact one on typical features).
        pool_temperature: softness of the soft-maximum over the blurred map, score units;
            None takes the plain maximum (its gradient reaches one pixel only).

    Note:
        The smooth score differs from the exact one in both directions: the soft-minima lie
        below the exact minima (by at most ``temperature * log(candidates)``), the soft-maximum
        lies above the maximum (by at most ``pool_temperature * log(S * S)``). Only differences
        of the smooth score are meaningful; :func:`repair` and :func:`adversarial` judge their
        results by the exact score.
    """

    def __init__(
        self, features_fn: Callable, variables: Any, templates: Sequence, layers: Sequence[str],
        forward_patches: Sequence, backward_patches: Sequence, alphas: Sequence[float],
        layer_weights: Sequence[float], sigma: float, image_size: int, *,
        temperature: float = 0.02, pool_temperature: float | None = 0.01,
    ) -> None:
        self.layers = tuple(layers)
        n = len(self.layers)
        per_layer = {
            "templates": templates, "forward_patches": forward_patches,
            "backward_patches": backward_patches, "alphas": alphas,
            "layer_weights": layer_weights,
        }
        for name, value in per_layer.items():
            if len(value) != n:
                raise InputError(f"{name} has {len(value)} entries: expected {n} (one per layer)")
        if not float(temperature) > 0:
            raise InputError(f"temperature={temperature}: expected a positive number")
        if pool_temperature is not None and not float(pool_temperature) > 0:
            raise InputError(f"pool_temperature={pool_temperature}: expected > 0 or None")
        self.features_fn = features_fn
        self.variables = variables
        self.templates = tuple(jnp.asarray(t, jnp.float32) for t in templates)
        self.forward_patches = tuple(forward_patches)
        self.backward_patches = tuple(backward_patches)
        self.alphas = tuple(float(a) for a in alphas)
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.sigma = float(sigma)
        self.image_size = int(image_size)
        self.temperature = float(temperature)
        self.pool_temperature = None if pool_temperature is None else float(pool_temperature)
        # Variables and templates are arguments, not closed-over constants, so that large
        # template sets are not embedded in the compiled programs.
        self._smooth = jax.jit(functools.partial(self._scores, smooth=True))
        self._exact = jax.jit(functools.partial(self._scores, smooth=False))
        # The experiments evaluate one image at a time through these two functions only, so a
        # run compiles twice (exact score, smooth score with gradient) whatever it does.
        self._value_and_grad = jax.jit(jax.value_and_grad(
            lambda image, variables, templates: self._scores(
                variables, templates, image[None], smooth=True)[0]
        ))

    @classmethod
    def from_detector(
        cls, detector, *, temperature: float = 0.02, pool_temperature: float | None = 0.01,
    ) -> ScoreModel:
        """The score of a fitted :class:`hetmm_jax.Detector` (its backbone, templates, windows).

        Args:
            detector: a fitted detector.
            temperature, pool_temperature: see the class.
        """
        if not hasattr(detector, "templates_"):
            raise NotFittedError("detector is not fitted yet: call fit() before ScoreModel")
        config = detector.config_
        extractor = detector.feature_extractor()
        return cls(
            extractor.features_fn, extractor.variables,
            [np.asarray(detector.templates_[name], np.float32) for name in config["layers"]],
            config["layers"], config["forward_patches"], config["backward_patches"],
            config["alphas"], config["layer_weights"], detector.sigma, detector.image_size,
            temperature=temperature, pool_temperature=pool_temperature,
        )

    def anomaly_maps(self, images: jax.Array, *, smooth: bool) -> jax.Array:
        """(B, S, S) anomaly maps (Eq. 10) of float images (B, S, S, 3) in [0, 1]."""
        return self._maps(self.variables, self.templates, self._check_images(images), smooth)

    def _maps(self, variables, templates, images, smooth: bool) -> jax.Array:
        feats = self.features_fn(variables, images)
        size = self.image_size
        return matching.anomaly_map(
            [feats[name].astype(jnp.float32) for name in self.layers], list(templates),
            self.forward_patches, self.backward_patches, self.alphas, self.layer_weights,
            out_size=(size, size), temperature=self.temperature if smooth else None,
            templates_normalized=True,
        )

    def _scores(self, variables, templates, images: jax.Array, *, smooth: bool) -> jax.Array:
        maps = self._maps(variables, templates, images, smooth)
        blurred = postprocess.gaussian_blur(maps, self.sigma)
        if smooth and self.pool_temperature is not None:
            t = self.pool_temperature
            return t * jax.nn.logsumexp(blurred / t, axis=(-2, -1))
        return jnp.max(blurred, axis=(-2, -1))

    def smooth_score(self, images) -> jax.Array:
        """Smooth scores (B,) of float images (B, S, S, 3) in [0, 1]; differentiable."""
        return self._smooth(self.variables, self.templates, self._check_images(images))

    def exact_score(self, images) -> jax.Array:
        """Exact scores (B,) (hard matching, max of the blurred map), as a detector's."""
        return self._exact(self.variables, self.templates, self._check_images(images))

    def value_and_grad(self, image) -> tuple[jax.Array, jax.Array]:
        """Smooth score () of one image (S, S, 3) and its gradient (S, S, 3)."""
        image = self._check_images(jnp.asarray(image)[None])[0]
        return self._value_and_grad(image, self.variables, self.templates)

    def _exact_one(self, image: jax.Array) -> float:
        return float(self._exact(self.variables, self.templates, image[None])[0])

    def _smooth_one(self, image: jax.Array) -> float:
        return float(self._value_and_grad(image, self.variables, self.templates)[0])

    def _check_images(self, images) -> jax.Array:
        images = jnp.asarray(images)
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise InputError(
                f"images shape {images.shape}: expected (B, {size}, {size}, 3) at the model "
                "resolution (resize first, e.g. hetmm_jax.features.resize_image)"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise InputError(f"images dtype {images.dtype}: expected float values in [0, 1]")
        return images.astype(jnp.float32)


@dataclasses.dataclass
class PerturbationResult:
    """What :func:`repair` and :func:`adversarial` return.

    Attributes:
        mode: "repair" or "adversarial".
        delta: (S, S, 3) float32 perturbation; ``image + delta`` lies in [0, 1].
        perturbed: (S, S, 3) float32, ``image + delta``.
        norm: "linf" or "l2", the norm ``delta_norm`` and ``epsilon`` are measured in.
        delta_norm: the norm of ``delta``.
        epsilon: the budget (repair) or None (adversarial).
        steps: optimiser steps taken.
        smooth_scores: (steps + 1,) the smooth score before each step and after the last.
        smooth_before, smooth_after: smooth score of the image and of the returned perturbed
            image.
        exact_before, exact_after: the same with the exact matching.
        threshold: the score to pass (adversarial), else None.
        success: adversarial: ``exact_after > threshold``; repair: ``exact_after <
            exact_before``.
    """

    mode: str
    delta: np.ndarray
    perturbed: np.ndarray
    norm: str
    delta_norm: float
    epsilon: float | None
    steps: int
    smooth_scores: np.ndarray
    smooth_before: float
    smooth_after: float
    exact_before: float
    exact_after: float
    threshold: float | None = None
    success: bool = False


def perturbation_norm(delta, norm: str) -> jax.Array:
    """L-inf (largest absolute entry) or L2 (Euclidean) norm of a perturbation (any shape)."""
    _check_norm(norm)
    delta = jnp.asarray(delta, jnp.float32)
    if norm == "linf":
        return jnp.max(jnp.abs(delta))
    return jnp.sqrt(jnp.sum(jnp.square(delta)))


def project(delta: jax.Array, image: jax.Array, epsilon: float | None, norm: str) -> jax.Array:
    """Projects a perturbation onto the norm ball of radius ``epsilon`` and the [0, 1] box.

    The ball comes first, then the box: clipping ``image + delta`` to [0, 1] only moves entries
    toward ``image`` (which lies in the box), so it never makes ``delta`` longer in either norm
    and the result satisfies both constraints. For L-inf this is the exact Euclidean projection
    onto the intersection; for L2 it is a feasible point close to it.

    Args:
        delta: (S, S, 3) perturbation.
        image: (S, S, 3) image in [0, 1].
        epsilon: the radius, or None for the box alone.
        norm: "linf" or "l2".

    Returns:
        (S, S, 3) perturbation with ``||delta|| <= epsilon`` and ``image + delta`` in [0, 1].
    """
    if epsilon is not None:
        if norm == "linf":
            delta = jnp.clip(delta, -epsilon, epsilon)
        else:
            length = jnp.sqrt(jnp.sum(jnp.square(delta)))
            delta = delta * jnp.minimum(1.0, epsilon / jnp.maximum(length, 1e-12))
    return jnp.clip(image + delta, 0.0, 1.0) - image


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise InputError(f"norm={norm!r}: expected one of {NORMS}")


def _check_image(model: ScoreModel, image) -> jax.Array:
    image = jnp.asarray(image)
    if image.dtype == jnp.uint8:
        image = image.astype(jnp.float32) / 255.0
    image = model._check_images(image[None])[0]
    low, high = float(jnp.min(image)), float(jnp.max(image))
    if not (math.isfinite(low) and math.isfinite(high) and low >= 0.0 and high <= 1.0):
        raise InputError(f"image values span [{low}, {high}]: expected float values in [0, 1]")
    return image


def repair(
    model: ScoreModel, image, *, epsilon: float = 8 / 255, norm: str = "linf",
    steps: int = 50, learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> PerturbationResult:
    """Lowers an image's anomaly score with a perturbation inside a norm budget.

    Projected gradient descent on the smooth score: after every optimiser step the perturbation
    is projected onto ``||delta|| <= epsilon`` and ``image + delta`` onto [0, 1]
    (:func:`project`). The perturbation with the lowest smooth score seen is returned.

    Args:
        model: the score (:class:`ScoreModel`).
        image: (S, S, 3) float in [0, 1] (or uint8), at the model resolution.
        epsilon: the budget in ``norm``, on the [0, 1] pixel scale (8 / 255 by default).
        norm: "linf" or "l2".
        steps: optimiser steps.
        learning_rate: Adam's step size; default ``epsilon / 4`` for L-inf and
            ``epsilon / (4 * sqrt(S * S * 3))`` for L2 (Adam moves every entry by about the
            step size, so this is a quarter of the budget per step).
        optimizer: any optax transformation to use instead of Adam.

    Returns:
        A :class:`PerturbationResult` (``epsilon`` and ``norm`` as given).
    """
    _check_norm(norm)
    if not float(epsilon) > 0:
        raise InputError(f"epsilon={epsilon}: expected a positive budget")
    if int(steps) < 1:
        raise InputError(f"steps={steps}: expected at least 1")
    image = _check_image(model, image)
    epsilon = float(epsilon)
    if optimizer is None:
        if learning_rate is None:
            scale = 1.0 if norm == "linf" else math.sqrt(image.size)
            learning_rate = epsilon / (4.0 * scale)
        optimizer = optax.adam(float(learning_rate))

    @jax.jit
    def update(delta, grad, state):
        updates, state = optimizer.update(grad, state, delta)
        return project(optax.apply_updates(delta, updates), image, epsilon, norm), state

    delta = jnp.zeros_like(image)
    state = optimizer.init(delta)
    trajectory = []
    best_value, best_delta = math.inf, delta
    for _ in range(int(steps)):
        value, grad = model._value_and_grad(image + delta, model.variables, model.templates)
        value = float(value)
        trajectory.append(value)
        if value < best_value:
            best_value, best_delta = value, delta
        delta, state = update(delta, grad, state)
    final = model._smooth_one(image + delta)
    trajectory.append(final)
    if final < best_value:
        best_value, best_delta = final, delta

    exact = [model._exact_one(image), model._exact_one(image + best_delta)]
    result = _result(
        "repair", image, best_delta, norm, epsilon, int(steps), trajectory, best_value,
        exact, threshold=None,
    )
    result.success = result.exact_after < result.exact_before
    log.info(
        "repair (%s, eps %.4g): exact score %.4f -> %.4f", norm, epsilon,
        result.exact_before, result.exact_after,
    )
    return result


def adversarial(
    model: ScoreModel, image, threshold: float, *, norm: str = "l2", steps: int = 100,
    learning_rate: float = 5e-3, penalty: float = 50.0, margin: float = 0.0,
    overshoot: float = 0.02, shrink_steps: int = 10,
    optimizer: optax.GradientTransformation | None = None,
) -> PerturbationResult:
    """A small perturbation that lifts an image's exact score above ``threshold``.

    Method (a penalty, then a line search; chosen over a bisection on a norm budget because it
    needs one optimisation run instead of one per budget):

    1. Adam on ``||delta|| + penalty * relu(target - smooth_score(image + delta))``, with the
       image kept in [0, 1]. ``target = threshold + margin + overshoot + gap``, where ``gap``
       is the smooth score minus the exact score of the unperturbed image: the smooth score is
       offset from the exact one, and this moves the target onto the smooth scale.
    2. Along the direction found, a bisection on ``s`` in [0, 1] for the smallest scale whose
       perturbation ``s * delta`` has an exact score above ``threshold + margin``
       (``shrink_steps`` halvings). The exact score need not rise monotonically with ``s``;
       the bisection keeps an ``s`` that passes, so the result is valid but may not be the
       smallest on the ray.

    Args:
        model: the score (:class:`ScoreModel`).
        image: (S, S, 3) float in [0, 1] (or uint8), at the model resolution.
        threshold: the exact score to exceed (e.g. a calibrated detector's ``threshold_``).
        norm: "l2" or "linf", the norm being minimised.
        steps: optimiser steps.
        learning_rate: Adam's step size (pixel units on the [0, 1] scale).
        penalty: weight of the hinge; larger reaches the target sooner at a larger norm.
        margin: how far past ``threshold`` the exact score of the result must lie, score
            units (the goal of the line search and of ``success``).
        overshoot: how much further the smooth target lies, score units: the smooth and the
            exact score do not move in step, so aiming a little beyond makes the exact score
            pass more often.
        shrink_steps: bisection halvings in step 2 (0 skips the line search).
        optimizer: any optax transformation to use instead of Adam.

    Returns:
        A :class:`PerturbationResult` with ``success`` = exact score above ``threshold +
        margin``; when the optimisation never passes it, the last perturbation is returned
        unshrunk.

    Warning:
        The result holds for the float image. The line search stops just past the threshold,
        so rounding the perturbed image to 8 bits can undo a perturbation of a pixel level or
        two; a warning is logged when ``max |delta|`` is below 2 / 255. Pass a ``margin`` (or
        re-check after quantising) when the image must survive being saved.
    """
    _check_norm(norm)
    if int(steps) < 1:
        raise InputError(f"steps={steps}: expected at least 1")
    image = _check_image(model, image)
    threshold = float(threshold)
    before = model._exact_one(image)
    smooth_start = model._smooth_one(image)
    goal = threshold + float(margin)
    target = goal + float(overshoot) + (smooth_start - before)
    if optimizer is None:
        optimizer = optax.adam(float(learning_rate))

    def length(delta):
        # The L2 norm's gradient is undefined at zero; this differs from it by at most 1e-6.
        if norm == "l2":
            return jnp.sqrt(jnp.sum(jnp.square(delta)) + 1e-12)
        return jnp.max(jnp.abs(delta))

    @jax.jit
    def update(delta, score, score_grad, state):
        size, size_grad = jax.value_and_grad(length)(delta)
        short = target - score
        grad = size_grad + penalty * jnp.where(short > 0, -score_grad, 0.0)
        updates, state = optimizer.update(grad, state, delta)
        new = project(optax.apply_updates(delta, updates), image, None, norm)
        return new, state, size + penalty * jnp.maximum(short, 0.0)

    delta = jnp.zeros_like(image)
    state = optimizer.init(delta)
    trajectory = []
    for _ in range(int(steps)):
        score, score_grad = model._value_and_grad(image + delta, model.variables,
                                                  model.templates)
        trajectory.append(float(score))
        delta, state, _ = update(delta, score, score_grad, state)
    trajectory.append(model._smooth_one(image + delta))

    passes = model._exact_one(image + delta) > goal
    if passes and shrink_steps > 0:
        low, high = 0.0, 1.0
        for _ in range(int(shrink_steps)):
            mid = 0.5 * (low + high)
            candidate = project(mid * delta, image, None, norm)
            if model._exact_one(image + candidate) > goal:
                high = mid
            else:
                low = mid
        delta = project(high * delta, image, None, norm)
    elif not passes:
        log.warning(
            "adversarial: %d steps did not lift the exact score above %.4f; raise steps, "
            "learning_rate or penalty", steps, goal,
        )

    smooth_after = model._smooth_one(image + delta)
    exact = [before, model._exact_one(image + delta)]
    result = _result(
        "adversarial", image, delta, norm, None, int(steps), trajectory, smooth_after, exact,
        threshold=threshold,
    )
    result.smooth_before = smooth_start
    result.success = result.exact_after > goal
    if result.success and float(np.abs(result.delta).max()) < 2 / 255:
        log.warning(
            "adversarial: max |delta| = %.2f / 255: rounding the image to 8 bits may undo it",
            255 * float(np.abs(result.delta).max()),
        )
    log.info(
        "adversarial (%s): exact score %.4f -> %.4f (threshold %.4f), ||delta|| = %.4g",
        norm, result.exact_before, result.exact_after, threshold, result.delta_norm,
    )
    return result


def _result(mode, image, delta, norm, epsilon, steps, trajectory, smooth_after, exact,
            threshold) -> PerturbationResult:
    exact = np.asarray(exact, np.float64)
    return PerturbationResult(
        mode=mode, delta=np.asarray(delta, np.float32),
        perturbed=np.asarray(image + delta, np.float32), norm=norm,
        delta_norm=float(perturbation_norm(delta, norm)), epsilon=epsilon, steps=steps,
        smooth_scores=np.asarray(trajectory, np.float64), smooth_before=float(trajectory[0]),
        smooth_after=float(smooth_after), exact_before=float(exact[0]),
        exact_after=float(exact[1]), threshold=threshold,
    )
