"""TensorFlow Datasets builder for anomaly-detection data in the MVTec AD layout.

The data is never downloaded: the user points the builder at a copy they already have, through
TFDS's manual-directory mechanism (``manual_dir``)::

    <manual_dir>/<category>/train/good/*                        defect-free training images
    <manual_dir>/<category>/test/good/*                         defect-free test images
    <manual_dir>/<category>/test/<defect>/*                     defective test images
    <manual_dir>/<category>/ground_truth/<defect>/<stem>_mask.png

``manual_dir`` may also be the category folder itself. Every category is a builder config of
:class:`MVTecLayout` (registered with TFDS as ``"hetmm_mvtec"``): the MVTec AD categories,
``magnetic_tile`` and ``cookie`` are predefined, and any other name is turned into a config when
asked for, so ``tfds.builder("hetmm_mvtec/my_part", ...)`` works for a category folder called
``my_part``.

Splits: ``train`` (``train/good``) and ``test`` (every ``test/<defect>`` folder). Features of each
example:

- ``image``: uint8 (H, W, 3) RGB, at the stored size (sizes may differ from image to image);
  stored losslessly as PNG whatever the source format, so greyscale sources come back as three
  equal channels.
- ``mask``: uint8 (H, W, 1) with values **0 and 1** (1 = defective pixel), the image's size;
  all zeros for good images. Masks are binarised on reading (above half of their range, see
  :func:`hetmm_jax.data.read_mask`), so 0 / 255 masks on disk become 0 / 1.
- ``label``: ClassLabel ``good`` (0) / ``defective`` (1).
- ``defect_type``: text, ``"good"`` or the name of the defect folder.
- ``file_name``: text, the image's path relative to the category folder, e.g.
  ``"test/crack/000.jpg"``.

Files are indexed and read by :mod:`hetmm_jax.data` (:func:`~hetmm_jax.data.load_category`,
:func:`~hetmm_jax.data.read_image`, :func:`~hetmm_jax.data.read_mask`), so a broken layout, an
unreadable image or a mask of the wrong size raises :class:`~hetmm_jax.errors.DataError` naming
the file, during ``download_and_prepare``. Examples keep the order of
:func:`~hetmm_jax.data.load_category` (train sorted by name; test: good first, then defects by
name), so example ``i`` of ``test`` is ``load_category(root).test[i]``.

This module imports ``tensorflow_datasets`` (``pip install "hetmm-jax[tfds]"``); ``hetmm_jax``
itself never imports it. Neither preparing a data set nor reading it back with ``as_data_source``
needs TensorFlow: data sets are written as ArrayRecord by default, with PNGs encoded by Pillow.
The ``tf.data`` route (``as_dataset``, ``tfds.load``) needs TensorFlow and a data set prepared
with ``file_format="tfrecord"``; TFDS refuses ``as_dataset`` on ArrayRecord files.

Configs are chosen by name (``config="my_part"``); a :class:`MVTecConfig` object built by the
caller is refused by TFDS unless it is the one :meth:`MVTecLayout.get_builder_config` returns.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from hetmm_jax.data import MVTecCategory, Sample, load_category, read_image, read_mask
from hetmm_jax.errors import DataError, InputError

try:
    import tensorflow_datasets as tfds
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "hetmm_jax.tfds_mvtec needs tensorflow-datasets: pip install 'hetmm-jax[tfds]'"
    ) from exc

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")

__all__ = [
    "DATASET_NAME",
    "KNOWN_CATEGORIES",
    "MVTecConfig",
    "MVTecLayout",
    "builder",
    "find_categories",
    "iter_batches",
]

DATASET_NAME = "hetmm_mvtec"
"""Name under which :class:`MVTecLayout` is registered with TFDS."""

KNOWN_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",  # MVTec AD
    "magnetic_tile",  # MTD, as laid out in shared/data/mtd
    "cookie",  # Amazon Lookout for Vision cookies, as laid out in shared/data/cookies
)
"""Categories with a predefined builder config; any other category name works too."""

LABEL_NAMES: tuple[str, str] = ("good", "defective")

# TFDS writes its default, TFRecord, only through TensorFlow; ArrayRecord needs no TensorFlow
# and is the format random-access reading (as_data_source) requires.
_DEFAULT_FILE_FORMAT = "array_record"

# A config name becomes a folder name inside data_dir, and TFDS splits "name/config:version" on
# "/" and ":", so only these characters are safe.
_CATEGORY_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

_MANUAL_INSTRUCTIONS = """\
Point `manual_dir` at a folder in the MVTec AD layout, holding one sub-folder per category:
<manual_dir>/<category>/train/good/*, <manual_dir>/<category>/test/<good|defect>/*,
<manual_dir>/<category>/ground_truth/<defect>/<stem>_mask.png (or at the category folder itself).
"""


class MVTecConfig(tfds.core.BuilderConfig):
    """Builder config for one category; its ``name`` is the category folder's name."""

    def __init__(self, *, name: str, **kwargs: Any) -> None:
        """Args:
            name: the category, e.g. "magnetic_tile"; letters, digits, "_", "." and "-".
            **kwargs: passed to ``tfds.core.BuilderConfig`` (version, description, ...).
        """
        _check_category(name)
        kwargs.setdefault("description", f"Category '{name}' in the MVTec AD layout.")
        super().__init__(name=name, **kwargs)


def _check_category(name: str) -> None:
    if not isinstance(name, str) or not _CATEGORY_PATTERN.fullmatch(name):
        raise InputError(
            f"category name {name!r} is not usable as a TFDS config name; expected letters, "
            "digits, '_', '.' and '-' (not starting with '.' or '-')"
        )


# Configs made on request for categories outside KNOWN_CATEGORIES, one object per name: TFDS
# checks that the config it is given is the very object get_builder_config returns.
_EXTRA_CONFIGS: dict[str, MVTecConfig] = {}


class MVTecLayout(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for one category of a data set in the MVTec AD layout (see the module doc).

    Construct it through :func:`builder`, or through TFDS by name::

        tfds.builder("hetmm_mvtec/magnetic_tile", data_dir=...)
    """

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = [MVTecConfig(name=category) for category in KNOWN_CATEGORIES]

    def __init__(
        self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs: Any
    ) -> None:
        """Args:
            file_format: "array_record" (the default for a data set not yet prepared, so that
                writing and ``as_data_source`` need no TensorFlow) or "tfrecord"; None keeps
                the format of an already prepared data set.
            **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (config, data_dir, ...).
        """
        super().__init__(file_format=file_format, **kwargs)
        if file_format is None and not (self.data_path / "dataset_info.json").exists():
            self.info.set_file_format(_DEFAULT_FILE_FORMAT, override=True)

    @classmethod
    def get_builder_config(
        cls, name: str, version: str | tfds.core.Version | None = None
    ) -> tfds.core.BuilderConfig | None:
        """Returns the predefined config ``name``, or makes one for any other category name."""
        config = super().get_builder_config(name, version)
        if config is not None:
            return config
        # A version suffix ("name:1.0.0") has already been split off by TFDS.
        if name not in _EXTRA_CONFIGS:
            _EXTRA_CONFIGS[name] = MVTecConfig(name=name)
        return _EXTRA_CONFIGS[name]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(None, None, 3), dtype=np.uint8, encoding_format="png"
                    ),
                    "mask": tfds.features.Image(
                        shape=(None, None, 1), dtype=np.uint8, encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
                    "defect_type": tfds.features.Text(),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep load_category's order so that example i is hetmm_jax.data's sample i;
            # shuffle at read time instead (random indices into the data source).
            disable_shuffling=True,
            description=(
                "Defect-free training images and labelled test images with pixel masks, read "
                "from a folder in the MVTec AD layout."
            ),
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager
    ) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        root = _category_root(Path(dl_manager.manual_dir), self.builder_config.name)
        category = load_category(root)
        log.info(
            "preparing %s/%s from %s: %d train, %d test images",
            self.name, self.builder_config.name, root, len(category.train), len(category.test),
        )
        return {
            "train": self._generate_examples(category, "train"),
            "test": self._generate_examples(category, "test"),
        }

    def _generate_examples(
        self, category: MVTecCategory, split: str
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        if split == "train":
            items = [(path, None) for path in category.train]
        else:
            items = [(sample.path, sample) for sample in category.test]
        yield from _ordered_map(
            lambda item: _encode_example(category.root, *item), items, _ENCODE_WORKERS
        )


_ENCODE_WORKERS = 4
"""Threads that read and PNG-encode images while TFDS writes (Pillow releases the GIL)."""

_PNG_COMPRESS_LEVEL = 3
"""zlib level: 2 to 3 times faster than Pillow's default 6 on the real sets, files no larger."""


def _encode_example(
    root: Path, path: Path, sample: Sample | None
) -> tuple[str, dict[str, Any]]:
    """Reads one image (and its mask) and returns its TFDS key and example.

    Args:
        root: the category folder.
        path: the image.
        sample: its test sample, or None for a training image.

    Raises:
        DataError: from :mod:`hetmm_jax.data`, naming the file.
    """
    image = read_image(path)
    height, width = image.shape[:2]
    if sample is None or sample.label == 0:
        mask = np.zeros((height, width), dtype=np.uint8)
        label, defect = 0, "good"
    else:
        # load_category has already refused defective images without a mask.
        mask = read_mask(sample.mask_path, (height, width), image_path=path).astype(np.uint8)
        label, defect = 1, sample.defect
    file_name = path.relative_to(root).as_posix()
    # Encoded here with Pillow, because TFDS encodes NumPy arrays through TensorFlow.
    return file_name, {
        "image": _png_bytes(image),
        "mask": _png_bytes(mask),
        "label": label,
        "defect_type": defect,
        "file_name": file_name,
    }


def _ordered_map(
    function: Callable[[_T], _R], items: Iterable[_T], workers: int
) -> Iterator[_R]:
    """``map`` in a thread pool, results in input order, at most ``2 * workers`` in flight.

    An exception is raised when its item's turn comes; pending work is cancelled.
    """
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="hetmm-tfds"
    )
    pending: collections.deque[concurrent.futures.Future[_R]] = collections.deque()
    try:
        for item in items:
            pending.append(executor.submit(function, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of a uint8 (H, W) or (H, W, 3) array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _is_category(folder: Path) -> bool:
    return (folder / "train" / "good").is_dir()


def find_categories(manual_dir: str | Path) -> list[str]:
    """Names of the categories in ``manual_dir`` (sub-folders holding ``train/good``), sorted.

    When ``manual_dir`` is itself a category folder, its own name is the only one returned.

    Raises:
        DataError: ``manual_dir`` is missing or not a folder.
    """
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir():
        raise DataError(f"manual_dir {manual_dir} is not a folder")
    if _is_category(manual_dir):
        return [manual_dir.name]
    return sorted(p.name for p in manual_dir.iterdir() if p.is_dir() and _is_category(p))


def _category_root(manual_dir: Path, category: str) -> Path:
    """The folder of ``category`` under ``manual_dir``, or ``manual_dir`` when it is that folder.

    Raises:
        DataError: no such category, naming the ones that are there.
    """
    if (manual_dir / category).is_dir():
        return manual_dir / category
    if _is_category(manual_dir) and manual_dir.name == category:
        return manual_dir
    found = find_categories(manual_dir)
    raise DataError(
        f"manual_dir {manual_dir} has no category folder {category!r} (expected "
        f"{manual_dir / category}/train/good); categories found: "
        f"{', '.join(found) if found else 'none'}"
    )


def builder(
    category: str,
    data_dir: str | Path | None = None,
    **kwargs: Any,
) -> MVTecLayout:
    """The TFDS builder of one category.

    Preparing it reads ``<manual_dir>/<category>``::

        b = builder("magnetic_tile", data_dir="~/tensorflow_datasets")
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir="../shared/data/mtd"))

    Args:
        category: the category folder's name (any name; see :data:`KNOWN_CATEGORIES`).
        data_dir: where TFDS writes and reads the prepared data (TFDS's default when None).
        **kwargs: passed to :class:`MVTecLayout` (e.g. ``file_format="tfrecord"``).

    Returns:
        The builder, not yet prepared.
    """
    _check_category(category)
    return MVTecLayout(
        config=category, data_dir=None if data_dir is None else str(data_dir), **kwargs
    )


def iter_batches(
    examples: Iterable[Mapping[str, Any]], batch_size: int
) -> Iterator[dict[str, list[Any]]]:
    """Groups examples into batches of lists, for images of different sizes.

    ``np.stack`` would need one size per batch; the detector takes lists of (H_i, W_i, 3)
    arrays, so each feature is collected into a list instead.

    Args:
        examples: mappings feature name -> value, e.g. a TFDS data source or
            ``tfds.as_numpy(dataset)``.
        batch_size: examples per batch; the last batch may be smaller.

    Yields:
        dict feature name -> list of ``batch_size`` values (text features decoded to ``str``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size}")
    batch: dict[str, list[Any]] = {}
    count = 0
    for example in examples:
        for key, value in example.items():
            batch.setdefault(key, []).append(
                value.decode("utf-8") if isinstance(value, bytes) else value
            )
        count += 1
        if count == batch_size:
            yield batch
            batch, count = {}, 0
    if count:
        yield batch
