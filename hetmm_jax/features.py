"""Batched, jitted feature extraction with a frozen ImageNet backbone.

Images are resized on the host to a square ``image_size`` (Pillow bilinear, which antialiases
when shrinking; no crop, so the aspect ratio is not kept), normalised with a mean and std, and
passed through a backbone from :mod:`hetmm_jax.backbones`; the requested stage outputs come back
as (B, h, w, C) arrays, h = ceil(image_size / stride).

Two layers of API:

- pure functions for use inside ``jax.jit`` / ``jax.grad``: :func:`preprocess` and
  :meth:`FeatureExtractor.features_fn` (float images in [0, 1], no host work);
- :class:`FeatureExtractor` for real images: ``extractor(images)`` for one batch and
  ``extractor.extract(images, batch_size)`` for any number of images, with a progress bar.

Example:
    >>> from hetmm_jax.backbones import init_variables
    >>> extractor = FeatureExtractor("resnet18", image_size=64,
    ...                              variables=init_variables("resnet18"))
    >>> feats = extractor(np.zeros((2, 64, 64, 3), np.uint8))
    >>> feats["layer3"].shape
    (2, 4, 4, 256)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from hetmm_jax import backbones
from hetmm_jax.errors import InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "FeatureExtractor", "preprocess", "resize_image"]


def preprocess(
    images: jax.Array,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> jax.Array:
    """Normalises images per channel: (x - mean) / std.

    Args:
        images: (B, H, W, 3) float, values in [0, 1].
        mean: per-channel mean, on the [0, 1] scale.
        std: per-channel standard deviation, on the [0, 1] scale.

    Returns:
        (B, H, W, 3) array of the input's float dtype.
    """
    dtype = jnp.result_type(images, jnp.float32)
    mean = jnp.asarray(mean, dtype)
    std = jnp.asarray(std, dtype)
    return (jnp.asarray(images, dtype) - mean) / std


def as_rgb_uint8(image: Any, index: int) -> np.ndarray:
    """One uint8 image as (H, W, 3): grayscale (H, W) or (H, W, 1) is repeated over 3 channels.

    Args:
        image: uint8 array (H, W), (H, W, 1) or (H, W, 3).
        index: the image's position in its batch, named in errors.

    Raises:
        InputError: another shape, channel count or dtype.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        channels = f" -- {array.shape[-1]} channels are not supported" if array.ndim == 3 else ""
        raise InputError(
            f"image {index} has shape {array.shape}; expected (H, W, 3), (H, W, 1) or (H, W)"
            f"{channels}"
        )
    if array.dtype != np.uint8:
        raise InputError(f"image {index} has dtype {array.dtype}; expected uint8 (0-255)")
    return array


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes one image to (size, size) with Pillow's antialiased bilinear filter.

    Args:
        image: uint8 (H, W, 3).
        size: output side in pixels.

    Returns:
        uint8 (size, size, 3); the input itself when it already has that size.
    """
    if image.shape[:2] == (size, size):
        return image
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


class FeatureExtractor:
    """Frozen-backbone feature extractor.

    Args:
        backbone: an architecture of :data:`hetmm_jax.backbones.ARCHITECTURES`, or (when
            ``variables`` is None) anything :func:`hetmm_jax.weights.load_variables` accepts:
            a registry name or a ``.pth`` path.
        layers: stage outputs to return, a non-empty subset of "layer1".."layer4"; later stages
            are not computed.
        image_size: side of the square the images are resized to, pixels.
        dtype: computation and output dtype: jnp.float32, or jnp.bfloat16 (half the memory for
            templates; parameters stay float32).
        variables: Flax variables for ``backbone``; None loads its ImageNet weights.
        mean: per-channel input mean on [0, 1]; None takes the one the backbone's checkpoints
            were trained with (:data:`hetmm_jax.backbones.INPUT_NORMALIZATION`: the ImageNet
            mean :data:`IMAGENET_MEAN` for the ResNet family, 127/255 for EfficientNet-Lite).
        std: per-channel input std on [0, 1]; None as for ``mean`` (:data:`IMAGENET_STD`, or
            128/255 for EfficientNet-Lite).

    Attributes:
        arch: the architecture.
        variables: the Flax variables in use.
        output_shapes: dict layer -> (h, w, C) at ``image_size``.

    Note:
        The jitted network compiles once per batch size: :meth:`__call__` pads a batch to the
        next power of two, :meth:`extract` pads its last batch to ``batch_size``. bfloat16
        features keep about 3 significant digits (relative error around 1e-2 against float32).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        image_size: int = 256,
        dtype: Any = jnp.float32,
        variables: dict | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        layers = tuple(layers)
        if not layers or any(name not in backbones.LAYERS for name in layers):
            raise InputError(
                f"layers {list(layers)!r} invalid; expected a non-empty subset of "
                f"{', '.join(backbones.LAYERS)}"
            )
        if int(image_size) < 32:
            raise InputError(f"image_size must be at least 32 pixels, got {image_size}")
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise InputError(f"dtype must be float32 or bfloat16, got {dtype}")

        if variables is None:
            from hetmm_jax.weights import load_variables

            arch, variables = load_variables(backbone)
        else:
            arch = backbones.check_arch(backbone)
        default_mean, default_std = backbones.INPUT_NORMALIZATION[arch]
        self.mean = tuple(float(v) for v in (default_mean if mean is None else mean))
        self.std = tuple(float(v) for v in (default_std if std is None else std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError(
                f"mean {self.mean} / std {self.std} must have 3 values each, std positive"
            )
        if dtype == jnp.dtype(jnp.bfloat16):
            log.info("bfloat16 features: about 3 significant digits, relative error ~1e-2")

        self.arch = arch
        self.layers = layers
        self.image_size = int(image_size)
        self.dtype = dtype
        self.variables = variables
        self._model = backbones.build(arch, outputs=layers, dtype=dtype)
        self._apply_uint8 = jax.jit(self._features_from_uint8)
        channels = backbones.feature_channels(arch)
        self.output_shapes = {
            name: (-(-self.image_size // backbones.STRIDES[name]),) * 2 + (channels[name],)
            for name in layers
        }

    def features_fn(self, variables: dict, images: jax.Array) -> dict[str, jax.Array]:
        """Pure feature function, for use under ``jax.jit``, ``jax.grad`` or ``jax.vmap``.

        Args:
            variables: Flax variables of the backbone.
            images: (B, H, W, 3) float in [0, 1], any H, W (no resizing here).

        Returns:
            dict layer -> (B, ceil(H / stride), ceil(W / stride), C), in ``self.dtype``.
        """
        x = preprocess(images, self.mean, self.std)
        out = self._model.apply(variables, x)
        return {name: out[name].astype(self.dtype) for name in self.layers}

    def _features_from_uint8(self, variables, images):
        return self.features_fn(variables, images.astype(jnp.float32) / 255.0)

    def _batch_array(self, images: Any) -> np.ndarray:
        """Turns the accepted inputs into one uint8 (B, S, S, 3) host array."""
        size = self.image_size
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.shape[0] == 0:
                raise InputError("no images given")
            if images.dtype != np.uint8:
                raise InputError(f"images have dtype {images.dtype}; expected uint8 (0-255)")
            if images.shape[1:] == (size, size, 3):
                return images
            images = list(images)
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            raise InputError(
                f"images must be a uint8 array (B, H, W, 3) or a list of uint8 arrays, got "
                f"{type(images).__name__}"
            )
        if len(images) == 0:
            raise InputError("no images given")
        return np.stack(
            [resize_image(as_rgb_uint8(image, i), size) for i, image in enumerate(images)]
        )

    def _run(self, batch: np.ndarray, padded_size: int) -> dict[str, jax.Array]:
        count = batch.shape[0]
        if padded_size > count:
            pad = np.zeros((padded_size - count, *batch.shape[1:]), np.uint8)
            batch = np.concatenate([batch, pad])
        out = self._apply_uint8(self.variables, batch)
        if padded_size > count:
            out = {name: value[:count] for name, value in out.items()}
        return out

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, jax.Array]:
        """Features of one batch.

        Args:
            images: uint8 (B, H, W, 3), or a list of uint8 (H_i, W_i, 3) (or grayscale
                (H_i, W_i)) arrays of any size; anything not already image_size x image_size is
                resized on the host.

        Returns:
            dict layer -> (B, h, w, C) jax array in ``dtype`` (float32 by default).
        """
        batch = self._batch_array(images)
        return self._run(batch, _next_power_of_two(batch.shape[0]))

    def extract(
        self,
        images: np.ndarray | Iterable[np.ndarray | str | Path],
        batch_size: int = 16,
        progress: bool = True,
    ) -> dict[str, np.ndarray]:
        """Features of any number of images, in batches.

        Args:
            images: uint8 (N, H, W, 3), or an iterable of uint8 arrays (any size) or image
                paths (read with :func:`hetmm_jax.data.read_image`, in a background thread).
            batch_size: images per network call; the last batch is padded to it so the network
                compiles only once (fewer images than that are padded to the next power of two).
            progress: show a tqdm progress bar when there is more than one batch.

        Returns:
            dict layer -> (N, h, w, C) NumPy array in ``dtype``.
        """
        if int(batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        batch_size = int(batch_size)
        total = len(images) if hasattr(images, "__len__") else None
        if total == 0:
            raise InputError("no images given")

        bar = None
        if progress and (total is None or total > batch_size):
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"features ({self.arch})", unit="img")

        if total is not None:
            # A short run need not be padded up to a full batch.
            batch_size = min(batch_size, _next_power_of_two(total))
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.layers}
        pending = None
        try:
            for batch in self._host_batches(images, batch_size):
                # Dispatch is asynchronous: the host prepares the next batch while this runs.
                out = self._run(batch, batch_size)
                if pending is not None:
                    self._collect(pending, chunks, bar)
                pending = out
            if pending is None:
                raise InputError("no images given")
            self._collect(pending, chunks, bar)
        finally:
            if bar is not None:
                bar.close()
        return {name: np.concatenate(parts) for name, parts in chunks.items()}

    @staticmethod
    def _collect(out, chunks, bar):
        for name, value in out.items():
            chunks[name].append(np.asarray(value))
        if bar is not None:
            bar.update(len(next(iter(out.values()))))

    def _host_batches(self, images, batch_size: int) -> Iterator[np.ndarray]:
        if isinstance(images, np.ndarray) and images.ndim == 4:
            for start in range(0, images.shape[0], batch_size):
                yield self._batch_array(images[start:start + batch_size])
            return
        if isinstance(images, (str, Path)):
            raise InputError(f"images must be an iterable of images or paths, got {images!r}")
        buffer: list[np.ndarray] = []
        for index, image in enumerate(self._iter_arrays(images)):
            buffer.append(resize_image(as_rgb_uint8(image, index), self.image_size))
            if len(buffer) == batch_size:
                yield np.stack(buffer)
                buffer = []
        if buffer:
            yield np.stack(buffer)

    @staticmethod
    def _iter_arrays(images) -> Iterator[np.ndarray]:
        if isinstance(images, Sequence) and images and all(
            isinstance(item, (str, Path)) for item in images
        ):
            from hetmm_jax.data import iter_images

            for _, image in iter_images(images):
                yield image
            return
        for item in images:
            if isinstance(item, (str, Path)):
                from hetmm_jax.data import read_image

                item = read_image(item)
            yield item
