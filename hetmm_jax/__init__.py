"""hetmm_jax: HETMM anomaly detection (template mutual matching, PTS) in JAX / Flax.

The numerical core is a set of pure functions (:mod:`hetmm_jax.matching`, :mod:`hetmm_jax.selection`,
:mod:`hetmm_jax.postprocess`, :mod:`hetmm_jax.metrics`) that compose with ``jax.jit``,
``jax.vmap``, ``jax.grad`` and sharding; :class:`Detector` wraps them for ``fit`` / ``predict``.
"""

from hetmm_jax.detector import PRESETS, Detector, Prediction
from hetmm_jax.features import FeatureExtractor
from hetmm_jax.matching import (
    anomaly_map,
    backward_hetm,
    forward_hetm,
    hetmm,
    l2_normalize,
    shard_templates,
    smooth_backward_hetm,
    smooth_forward_hetm,
    smooth_hetmm,
)
from hetmm_jax.postprocess import gaussian_blur, image_score, normalize_map, resize_maps
from hetmm_jax.selection import compress_templates, optics_labels, pts, select_indices

__version__ = "0.1.0"

__all__ = [
    "Detector", "FeatureExtractor", "PRESETS", "Prediction", "__version__", "anomaly_map",
    "backward_hetm", "compress_templates", "forward_hetm", "gaussian_blur", "hetmm",
    "image_score", "l2_normalize", "normalize_map", "optics_labels", "pts", "resize_maps",
    "select_indices", "shard_templates", "smooth_backward_hetm", "smooth_forward_hetm",
    "smooth_hetmm",
]
