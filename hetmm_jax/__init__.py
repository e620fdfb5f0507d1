"""hetmm_jax: HETMM anomaly detection (template mutual matching, PTS) in JAX / Flax."""

from hetmm_jax.detector import PRESETS, Detector, Prediction

__version__ = "0.1.0"

__all__ = ["Detector", "PRESETS", "Prediction", "__version__"]
