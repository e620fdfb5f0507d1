"""Turning per-layer distance maps into image-size anomaly maps and image scores (Eqs. 10-11).

Pure JAX functions on (B, H, W) maps; the matching itself lives in :mod:`hetmm_jax.matching`.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from hetmm_jax.errors import InputError

log = logging.getLogger(__name__)

GAUSSIAN_TRUNCATE = 4.0
"""The Gaussian kernel is cut at ``int(GAUSSIAN_TRUNCATE * sigma + 0.5)`` pixels, as in
``scipy.ndimage.gaussian_filter``'s default."""


@functools.lru_cache(maxsize=64)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) matrix applying a 1-D Gaussian blur with mirror ("reflect") borders.

    The border mode is scipy.ndimage's ``"reflect"`` (half-sample symmetric: ``d c b a | a b c d
    | d c b a``), repeated as often as needed when the kernel is wider than the signal. Folding
    the borders into a matrix keeps the blur exact for any radius and makes it two small matrix
    products per map.
    """
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    matrix = np.zeros((size, size), np.float64)
    period = 2 * size
    for i in range(size):
        source = np.mod(i + offsets, period)
        source = np.where(source >= size, period - 1 - source, source)
        np.add.at(matrix[i], source, weights)
    return matrix.astype(np.float32)


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
    """Gaussian blur of the last two axes, equal to ``scipy.ndimage.gaussian_filter``'s default.

    Args:
        maps: (..., H, W) maps.
        sigma: standard deviation in pixels; 0 returns the maps unchanged.

    Returns:
        (..., H, W) float32, blurred with a kernel of radius ``int(4 * sigma + 0.5)`` and mirror
        ("reflect", half-sample symmetric) borders.
    """
    maps = jnp.asarray(maps, jnp.float32)
    sigma = float(sigma)
    if sigma < 0 or not math.isfinite(sigma):
        raise InputError(f"sigma={sigma}: expected a finite number >= 0")
    if maps.ndim < 2:
        raise InputError(f"maps shape {maps.shape}: expected (..., H, W)")
    if sigma == 0:
        return maps
    rows = jnp.asarray(_blur_matrix(maps.shape[-2], sigma))
    cols = jnp.asarray(_blur_matrix(maps.shape[-1], sigma))
    highest = jax.lax.Precision.HIGHEST
    out = jnp.einsum("ij,...jk->...ik", rows, maps, precision=highest)
    return jnp.einsum("...ik,lk->...il", out, cols, precision=highest)


def image_score(maps: jax.Array, sigma: float) -> jax.Array:
    """Image-level anomaly score (Eq. 11): the maximum of the Gaussian-blurred map.

    Args:
        maps: (B, H, W) or (H, W) anomaly maps.
        sigma: blur standard deviation in pixels of the map (the paper uses 6.8 at 256 x 256;
            0 disables the blur). Kernel radius ``int(4 * sigma + 0.5)``, mirror borders, as
            ``scipy.ndimage.gaussian_filter``.

    Returns:
        (B,) or () float32 scores.
    """
    blurred = gaussian_blur(maps, sigma)
    return jnp.max(blurred, axis=(-2, -1))


def normalize_map(maps: jax.Array, low=None, high=None) -> jax.Array:
    """Rescales maps to [0, 1] for display.

    Args:
        maps: (..., H, W) maps.
        low, high: the values sent to 0 and 1, e.g. bounds shared by a whole test set so that
            images can be compared; by default each map's own minimum and maximum.

    Returns:
        (..., H, W) float32 in [0, 1] (values outside [low, high] are clipped); a constant map
        becomes all zeros.
    """
    maps = jnp.asarray(maps, jnp.float32)
    if maps.ndim < 2:
        raise InputError(f"maps shape {maps.shape}: expected (..., H, W)")
    low = jnp.min(maps, axis=(-2, -1), keepdims=True) if low is None else jnp.asarray(low)
    high = jnp.max(maps, axis=(-2, -1), keepdims=True) if high is None else jnp.asarray(high)
    span = high - low
    safe = jnp.where(span > 0, span, 1.0)
    return jnp.where(span > 0, jnp.clip((maps - low) / safe, 0.0, 1.0), 0.0)


def resize_maps(maps: jax.Array, out_size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of (..., h, w) maps to (..., H, W), half-pixel centres.

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` when enlarging (the usual case: feature maps to image size); when
    shrinking, ``jax.image.resize`` low-pass filters first (antialiasing).
    """
    maps = jnp.asarray(maps, jnp.float32)
    if (
        len(out_size) != 2
        or not all(isinstance(s, (int, np.integer)) and s > 0 for s in out_size)
    ):
        raise InputError(f"out_size={out_size!r}: expected a (height, width) pair of positive ints")
    shape = maps.shape[:-2] + tuple(int(s) for s in out_size)
    if shape == maps.shape:
        return maps
    return jax.image.resize(maps, shape, method="bilinear")
