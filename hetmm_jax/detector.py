"""The detector a user fits and runs: HETMM on the features of a frozen ImageNet backbone.

:class:`Detector` follows scikit-learn's contract: ``__init__`` only stores its parameters,
``fit`` returns ``self``, fitted state lives in attributes ending in ``_``, and every other method
refuses to run before ``fit``. The numerical work is done by the pure functions of
:mod:`hetmm_jax.matching`, :mod:`hetmm_jax.selection` and :mod:`hetmm_jax.features`; this class only
keeps the template set and moves images through them in batches.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from PIL import Image

from hetmm_jax import data as data_lib
from hetmm_jax import matching, model_io, postprocess
from hetmm_jax.features import as_rgb_uint8
from hetmm_jax.errors import InputError, ModelFileError, NotFittedError

log = logging.getLogger(__name__)

#: Named configurations. "paper" is the paper's MVTec AD setting (it needs the torchvision
#: WideResNet-101-2 checkpoint, see ``hetmm weights fetch``); "default" runs offline on the
#: EfficientNet-Lite2 weights that ship with the install.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(backbone="wide_resnet101_2", image_size=256,
                  layers=("layer1", "layer2", "layer3"), forward_patches=(9, 7, 5),
                  backward_patches=(3, 3, 3), alphas=0.8, layer_weights=(1.0, 1.0, 1.0),
                  sigma=6.8),
    # Chosen on half of the MTD test set (seeded split, stratified by defect type) among ~430
    # settings, then checked on the other half: see benchmarks/study_mtd.py and the README.
    "default": dict(backbone="efficientnet_lite2", image_size=256,
                    layers=("layer2", "layer3", "layer4"), forward_patches=(7, 3, 9),
                    backward_patches=(1, 1, 1), alphas=0.7, layer_weights=(1.0, 1.0, 1.0),
                    sigma=16.0),
}

ImagesLike = Any  # a folder, a file, a sequence of files or arrays, or a (B, H, W[, 3]) array


@dataclasses.dataclass
class Prediction:
    """What :meth:`Detector.predict` returns.

    Attributes:
      scores: (B,) float32 image scores (Eq. 11), in the units of the summed cosine distances.
      maps: B arrays (H_i, W_i) float32: anomaly maps (Eq. 10) at each input image's resolution.
      model_maps: (B, S, S) float32 maps at the model resolution ``image_size``, or None unless
        asked for.
      labels: (B,) int 0 / 1 when the detector has a threshold, else None.
      masks: B bool arrays (H_i, W_i): pixels whose blurred score reaches the threshold, so an
        image is labelled defective exactly when its mask is not empty; None without threshold.
      paths: the source file of each image, or None for arrays.
    """

    scores: np.ndarray
    maps: list[np.ndarray]
    model_maps: np.ndarray | None = None
    labels: np.ndarray | None = None
    masks: list[np.ndarray] | None = None
    paths: list[str | None] | None = None


class Detector:
    """HETMM anomaly detector.

    The defaults are the "default" preset (offline EfficientNet-Lite2 weights); the paper's
    MVTec AD setting is ``Detector.from_preset("paper")``.

    Args:
      backbone: architecture or registry name of the feature extractor ("efficientnet_lite2",
        "wide_resnet101_2", ...), see ``hetmm weights list``.
      image_size: side of the square the images are resized to (no crop), pixels.
      layers: backbone layers whose features are matched.
      forward_patches: forward (Eq. 4) window per layer: odd ints or (height, width) pairs.
      backward_patches: backward (Eq. 5) window per layer.
      alphas: Eq. 6 weight of the forward direction, one float or one per layer.
      layer_weights: weight of each layer's map in the sum of Eq. 10 (default all 1).
      sigma: Gaussian blur before the image score's max (Eq. 11), pixels at ``image_size``.
      weights: a checkpoint path or registry name to use instead of the backbone's default.
      template_dtype: "float32" or "bfloat16" (halves template memory, small accuracy cost).
      batch_size: images per feature / matching batch.
      memory_budget: bytes of scratch memory the matching may use per call (None: its default).
      progress: show progress bars on long loops.
    """

    def __init__(self, backbone: str = "efficientnet_lite2", *, image_size: int = 256,
                 layers: Sequence[str] = ("layer2", "layer3", "layer4"),
                 forward_patches: Sequence[Any] = (7, 3, 9),
                 backward_patches: Sequence[Any] = (1, 1, 1),
                 alphas: float | Sequence[float] = 0.7,
                 layer_weights: Sequence[float] | None = None, sigma: float = 16.0,
                 weights: str | None = None, template_dtype: str = "float32",
                 batch_size: int = 8, memory_budget: int | None = None,
                 progress: bool = False):
        self.backbone = backbone
        self.image_size = image_size
        self.layers = layers
        self.forward_patches = forward_patches
        self.backward_patches = backward_patches
        self.alphas = alphas
        self.layer_weights = layer_weights
        self.sigma = sigma
        self.weights = weights
        self.template_dtype = template_dtype
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.progress = progress

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Detector:
        """A detector configured by a named preset (see :data:`PRESETS`), with overrides."""
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # -- configuration ---------------------------------------------------------------------

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as JSON-friendly values."""
        params = {}
        for name in ("backbone", "image_size", "layers", "forward_patches", "backward_patches",
                     "alphas", "layer_weights", "sigma", "weights", "template_dtype",
                     "batch_size", "memory_budget", "progress"):
            params[name] = _jsonable(getattr(self, name))
        return params

    def _validated(self) -> dict[str, Any]:
        """Checks the parameters and expands per-layer ones to tuples of len(layers)."""
        layers = tuple(self.layers)
        if not layers:
            raise InputError("layers is empty; give at least one backbone layer")
        n = len(layers)

        def per_layer(value: Any, name: str) -> tuple:
            if isinstance(value, (int, float)) or value is None:
                return (value,) * n
            value = tuple(value)
            if len(value) != n:
                raise InputError(f"{name} has {len(value)} entries for {n} layers {layers}")
            return value

        alphas = per_layer(self.alphas, "alphas")
        for alpha in alphas:
            if not 0.0 <= float(alpha) <= 1.0:
                raise InputError(f"alphas must lie in [0, 1], got {self.alphas!r}")
        weights = per_layer(1.0 if self.layer_weights is None else self.layer_weights,
                            "layer_weights")
        if self.template_dtype not in ("float32", "bfloat16"):
            raise InputError(f"template_dtype must be 'float32' or 'bfloat16', "
                             f"got {self.template_dtype!r}")
        if int(self.image_size) < 32:
            raise InputError(f"image_size must be at least 32 pixels, got {self.image_size}")
        if float(self.sigma) < 0:
            raise InputError(f"sigma must be >= 0, got {self.sigma}")
        if int(self.batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        return dict(layers=layers,
                    forward_patches=tuple(_patch(p) for p in per_layer(self.forward_patches,
                                                                       "forward_patches")),
                    backward_patches=tuple(_patch(p) for p in per_layer(self.backward_patches,
                                                                        "backward_patches")),
                    alphas=tuple(float(a) for a in alphas),
                    layer_weights=tuple(float(w) for w in weights))

    def feature_extractor(self):
        """The :class:`~hetmm_jax.features.FeatureExtractor` this detector uses (built once).

        Its ``features_fn(variables, images)`` is the pure, differentiable feature function that
        gradient experiments and sharded prediction compose with the matching.
        """
        extractor = getattr(self, "_extractor_cache", None)
        if extractor is None:
            from hetmm_jax.features import FeatureExtractor

            variables = None
            if self.weights is not None:
                from hetmm_jax.weights import load_variables

                _, variables = load_variables(self.weights, arch=self.backbone)
            extractor = FeatureExtractor(backbone=self.backbone, layers=tuple(self.layers),
                                         image_size=int(self.image_size), variables=variables)
            self._extractor_cache = extractor
        return extractor

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, images: ImagesLike) -> Detector:
        """Builds the template set from defect-free images.

        Args:
          images: a folder, an image file, a sequence of files or uint8 arrays (H, W[, 3]), or
            one array (B, H, W[, 3]) (uint8, or float in [0, 1]).

        Returns:
          self, with ``templates_`` (layer -> (N, h, w, C) unit-norm features),
          ``n_templates_``, ``threshold_`` (None) and ``config_`` set.
        """
        config = self._validated()
        templates = self._features(images, "fit")
        self.config_ = config
        self.templates_ = {name: self._store(value) for name, value in templates.items()}
        self.n_templates_ = _count(self.templates_)
        self.threshold_ = None
        self._device_cache = None
        log.info("fitted %d templates", self.n_templates_)
        return self

    def update(self, images: ImagesLike) -> Detector:
        """Hot update: appends new defect-free images to the template set, nothing refitted.

        The result equals fitting on the old images followed by the new ones. The threshold
        is kept; recalibrate if the new images change what is normal.
        """
        self._check_fitted()
        new = self._features(images, "update")
        self.templates_ = {
            name: np.concatenate([self.templates_[name], self._store(new[name])], axis=0)
            for name in self.templates_}
        self.n_templates_ = _count(self.templates_)
        self._device_cache = None
        log.info("updated: %d templates", self.n_templates_)
        return self

    def compress(self, k: int, strategy: str = "pts", **kwargs: Any) -> Detector:
        """Shrinks the template set to ``k`` sheets per layer (PTS by default, Algorithm 1).

        Args:
          k: sheets to keep, 1 <= k <= n_templates_.
          strategy: "pts", "random" (per pixel), "random_image" (whole images) or "kmeans"
            (see :func:`hetmm_jax.selection.pts`).
          **kwargs: passed to :func:`hetmm_jax.selection.compress_templates`.
        """
        from hetmm_jax.selection import compress_templates

        self._check_fitted()
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if k > self.n_templates_:
            raise InputError(f"k={k} is larger than the {self.n_templates_} templates of "
                             f"this model")
        if k == self.n_templates_:
            return self
        as_float = {name: np.asarray(value, np.float32) for name, value in self.templates_.items()}
        compressed = compress_templates(as_float, k, strategy=strategy, **kwargs)
        self.templates_ = {name: self._store(np.asarray(compressed[name]))
                           for name in self.templates_}
        self.n_templates_ = _count(self.templates_)
        self._device_cache = None
        return self

    # -- scoring ---------------------------------------------------------------------------

    def predict(self, images: ImagesLike, *, model_maps: bool = False) -> Prediction:
        """Scores images and localises anomalies.

        Args:
          images: as for :meth:`fit`.
          model_maps: also return the (B, S, S) maps at the model resolution.

        Returns:
          A :class:`Prediction`; labels and masks are filled when a threshold is set.
        """
        self._check_fitted()
        scores, maps, small, paths = [], [], [], []
        sources = _sources(images)
        blurred_all = []
        for batch_sources, batch in self._batches(sources, "predict"):
            batch_maps = self._maps(self._batch_features(batch))
            blurred = postprocess.gaussian_blur(batch_maps, float(self.sigma))
            scores.append(np.asarray(jnp.max(blurred, axis=(1, 2)))[:len(batch)])
            batch_maps = np.asarray(batch_maps)[:len(batch)]
            blurred = np.asarray(blurred)[:len(batch)]
            for image, map_, blur, source in zip(batch, batch_maps, blurred, batch_sources):
                size = image.shape[:2]
                maps.append(_resize_map(map_, size))
                if self.threshold_ is not None:
                    blurred_all.append(_resize_map(blur, size))
                paths.append(source if isinstance(source, str) else None)
            if model_maps:
                small.append(batch_maps)
        result = Prediction(scores=np.concatenate(scores).astype(np.float32), maps=maps,
                            model_maps=np.concatenate(small) if model_maps else None,
                            paths=paths)
        if self.threshold_ is not None:
            result.labels = (result.scores >= self.threshold_).astype(np.int64)
            result.masks = [blur >= self.threshold_ for blur in blurred_all]
        return result

    def score(self, images: ImagesLike) -> np.ndarray:
        """Image scores (B,) float32 only."""
        return self.predict(images).scores

    def calibrate(self, images: ImagesLike, labels: Sequence[int] | None = None, *,
                  max_fpr: float = 0.01) -> Detector:
        """Sets ``threshold_`` on held-out images.

        With ``labels`` that include defective images (1), the threshold maximises the image
        F1 score. Without labels, or with good images only, the images are taken as defect-free
        and the threshold is their ``1 - max_fpr`` score quantile, so that about ``max_fpr`` of
        good images are flagged.
        """
        from hetmm_jax.metrics import f1_max

        self._check_fitted()
        scores = self.predict(images).scores
        if labels is not None:
            labels = np.asarray(labels).astype(int)
            if labels.shape != scores.shape:
                raise InputError(f"calibrate: {labels.shape[0]} labels for {scores.shape[0]} "
                                 f"images")
        if labels is not None and labels.min() == 0 and labels.max() == 1:
            _, threshold = f1_max(labels, scores)
            how = "F1-max"
        else:
            if not 0.0 < max_fpr < 1.0:
                raise InputError(f"max_fpr must lie in (0, 1), got {max_fpr}")
            if labels is not None and labels.min() == 1:
                raise InputError("calibrate: all images are labelled defective; give good "
                                 "images (label 0) too")
            threshold = float(np.quantile(scores, 1.0 - max_fpr, method="higher"))
            how = f"false-positive rate {max_fpr}"
            if len(scores) < 1.0 / max_fpr:
                warnings.warn(f"calibrate: {len(scores)} good images are too few to estimate a "
                              f"false-positive rate of {max_fpr}; the threshold is their "
                              f"highest score", stacklevel=2)
        self.threshold_ = float(threshold)
        log.info("threshold %.5f (%s)", self.threshold_, how)
        return self

    @property
    def threshold(self) -> float:
        """The calibrated threshold; raises when :meth:`calibrate` has not run."""
        self._check_fitted()
        if self.threshold_ is None:
            raise NotFittedError("this detector has no threshold yet: call calibrate() first")
        return self.threshold_

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Writes configuration, templates and threshold to ``path`` atomically (no pickle)."""
        self._check_fitted()
        meta = {"params": self.get_params(), "threshold": self.threshold_,
                "n_templates": self.n_templates_}
        return model_io.save_model(path, meta, self.templates_)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Detector:
        """Reads a model written by :meth:`save`; checks its format and version."""
        meta, templates = model_io.load_model(path)
        params = meta.get("params")
        if not isinstance(params, dict):
            raise ModelFileError(f"{path}: the header has no detector parameters")
        detector = cls(**params)
        detector.config_ = detector._validated()
        if set(templates) != set(detector.config_["layers"]):
            raise ModelFileError(f"{path}: template layers {sorted(templates)} differ from the "
                                 f"configured layers {list(detector.config_['layers'])}")
        detector.templates_ = templates
        detector.n_templates_ = _count(templates)
        detector.threshold_ = meta.get("threshold")
        detector._device_cache = None
        return detector

    # -- internals -------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "templates_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit() "
                                 f"with defect-free images first")

    def _store(self, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value, np.float32)
        norm = np.linalg.norm(value, axis=-1, keepdims=True)
        value = value / np.maximum(norm, 1e-12)
        if self.template_dtype == "bfloat16":
            return value.astype(ml_dtypes.bfloat16)
        return value

    def _features(self, images: ImagesLike, what: str) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.layers}
        for _, batch in self._batches(_sources(images), what):
            feats = self._batch_features(batch)
            for name in parts:
                parts[name].append(np.asarray(feats[name][:len(batch)], np.float32))
        return {name: np.concatenate(value, axis=0) for name, value in parts.items()}

    def _batch_features(self, batch: list[np.ndarray]) -> dict[str, jax.Array]:
        """Features of a batch padded to ``batch_size`` images (the padding rows are junk).

        Every batch has the same shape, so the network and the matching compile once, and an
        image's features and scores do not depend on how many images came with it: fitting at
        once or in parts (``update``) gives the same templates bit for bit.
        """
        missing = int(self.batch_size) - len(batch)
        if missing > 0:
            size = int(self.image_size)
            batch = list(batch) + [np.zeros((size, size, 3), np.uint8)] * missing
        return self.feature_extractor()(batch)

    def _batches(self, sources: list, what: str) -> Iterable[tuple[list, list[np.ndarray]]]:
        if not sources:
            raise InputError(f"{what}: no images given")
        bar = None
        if self.progress and len(sources) > self.batch_size:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(sources), desc=what, unit="img")
        size = int(self.batch_size)
        starts = range(0, len(sources), size)

        def read(start: int) -> list[np.ndarray]:
            return [_load(source, start + i)
                    for i, source in enumerate(sources[start:start + size])]

        # Decoding the next batch in a thread overlaps file reading with the device work.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read, starts[0])
            try:
                for index, start in enumerate(starts):
                    batch = pending.result()
                    if index + 1 < len(starts):
                        pending = pool.submit(read, starts[index + 1])
                    yield sources[start:start + size], batch
                    if bar is not None:
                        bar.update(len(batch))
            finally:
                pending.cancel()
                if bar is not None:
                    bar.close()

    def _device_templates(self) -> list[jax.Array]:
        if getattr(self, "_device_cache", None) is None:
            self._device_cache = [jnp.asarray(self.templates_[name]) for name in self.layers]
        return self._device_cache

    def _maps(self, feats: dict[str, jax.Array]) -> jax.Array:
        """(B, S, S) anomaly maps at the model resolution."""
        config = self.config_
        size = int(self.image_size)
        options = {} if self.memory_budget is None else {"max_chunk_bytes": int(self.memory_budget)}
        return matching.anomaly_map(
            [feats[name] for name in config["layers"]], self._device_templates(),
            forward_patches=config["forward_patches"],
            backward_patches=config["backward_patches"], alphas=config["alphas"],
            layer_weights=config["layer_weights"], out_size=(size, size),
            templates_normalized=True, **options)


def _patch(value: Any) -> int | tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        if value < 1 or value % 2 == 0:
            raise InputError(f"window {value} must be a positive odd integer")
        return int(value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or any(v < 1 or v % 2 == 0 for v in pair):
        raise InputError(f"window {value!r} must be an odd int or a (height, width) pair of "
                         f"odd ints")
    return pair


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _count(templates: dict[str, np.ndarray]) -> int:
    counts = {value.shape[0] for value in templates.values()}
    if len(counts) != 1:
        raise InputError(f"template layers hold different numbers of sheets: {sorted(counts)}")
    return counts.pop()


def _sources(images: ImagesLike) -> list:
    """Turns the accepted image inputs into a list of paths (str) and arrays."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            return [str(p) for p in data_lib.list_images(path)]
        return [str(path)]
    if isinstance(images, np.ndarray) or isinstance(images, jax.Array):
        array = np.asarray(images)
        if array.ndim == 2:
            return [array]
        if array.ndim == 3:
            # A last axis of 1 or 3 reads as one image's channels, anything else as a batch of
            # grayscale images.
            return [array] if array.shape[-1] in (1, 3) else list(array)
        if array.ndim == 4:
            return list(array)
        raise InputError(f"images array has shape {array.shape}; expected (H, W), (H, W, 3), "
                         f"(B, H, W) or (B, H, W, 3)")
    if isinstance(images, Sequence):
        return [str(item) if isinstance(item, (str, os.PathLike)) else item for item in images]
    raise InputError(f"cannot read images from a {type(images).__name__}; give a folder, files "
                     f"or uint8 arrays")


def _load(source: Any, index: int) -> np.ndarray:
    """One image as uint8 (H, W, 3): read from a file, or a uint8 / float-in-[0, 1] array."""
    if isinstance(source, str):
        return data_lib.read_image(source)
    array = np.asarray(source)
    where = f"image {index}"
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise InputError(f"{where} is {array.dtype} with values outside [0, 1] or not "
                             f"finite; give uint8 0-255 or float 0-1")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InputError(f"{where} has dtype {array.dtype}; expected uint8 (0-255) or float "
                         f"(0-1)")
    array = as_rgb_uint8(array, index)
    if array.shape[0] < 8 or array.shape[1] < 8:
        raise InputError(f"{where} is {array.shape[0]}x{array.shape[1]} pixels, too small")
    return array


def _resize_map(map_: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (S, S) float map to (H, W)."""
    if tuple(map_.shape) == tuple(size):
        return np.asarray(map_, np.float32)
    image = Image.fromarray(np.asarray(map_, np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR), np.float32)
