"""Reading images, masks and data sets in the MVTec AD layout.

Everything here returns NumPy arrays on the host; nothing depends on JAX. Images come back as
``uint8`` RGB arrays ``(H, W, 3)`` at their stored size (sizes may differ from image to image),
masks as ``bool`` arrays ``(H, W)``. Every problem with a file raises
:class:`~hetmm_jax.errors.DataError` with a one-line message that names the file.

Conventions, chosen once for the whole package:

- **Sizes** are ``(height, width)`` tuples, as in NumPy, never Pillow's ``(width, height)``.
- **EXIF orientation is ignored**: pixels are returned as stored. Masks are matched to images
  pixel for pixel, mask PNGs carry no orientation tag, and industrial cameras write none, so
  rotating only the image would misalign it with its mask. An image with a rotating orientation
  tag triggers a :class:`ExifOrientationWarning`.
- **Alpha is dropped**, not composited: the stored colour of every pixel is kept, whatever its
  transparency.
- **Hidden files** (names starting with ``"."``, e.g. macOS ``._name.png`` resource forks) are
  never listed as images.

The MVTec AD layout (see :func:`load_category`)::

    <root>/train/good/*.png                         defect-free training images
    <root>/test/good/*.png                          defect-free test images
    <root>/test/<defect>/*.png                      defective test images
    <root>/ground_truth/<defect>/<stem>_mask.png    one mask per defective test image

(``<stem>.<ext>`` is accepted as a mask name too, with any image extension.)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from hetmm_jax.errors import DataError, InputError

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ExifOrientationWarning",
    "MVTecCategory",
    "Sample",
    "image_size",
    "iter_images",
    "list_images",
    "load_category",
    "load_folder",
    "load_mask",
    "load_masks",
    "read_image",
    "read_images",
    "read_mask",
    "resize_mask",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""File extensions (lower case) that :func:`list_images` treats as images."""

_EXIF_ORIENTATION_TAG = 0x0112
_MASK_SUFFIX = "_mask"
_GOOD = "good"


class ExifOrientationWarning(UserWarning):
    """An image carries an EXIF orientation tag that this package does not apply."""


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _decoded(path: Path, what: str) -> Iterator[Image.Image]:
    """Opens ``path`` with Pillow and decodes every pixel, so that damage is found here.

    Used as a context manager so that the file is closed even for multi-frame formats, where
    Pillow keeps it open after decoding.

    Args:
        path: the file.
        what: "image" or "mask", for the error messages.

    Yields:
        The fully loaded Pillow image (first frame of a multi-frame file).

    Raises:
        DataError: the file is missing, empty, not an image Pillow reads, or truncated.
    """
    if not path.exists():
        raise DataError(f"{what} file not found: {path}")
    if not path.is_file():
        raise DataError(f"{what} path is not a file: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{what} file is empty (0 bytes): {path}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Another library switched this Pillow-wide flag on; truncated files then decode
        # silently with grey filler and we can no longer reject them.
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set outside hetmm_jax): truncated "
            "image files will not be detected",
            RuntimeWarning,
            stacklevel=4,
        )
    try:
        image = Image.open(path)
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises many types for damaged files; all mean "unreadable".
        raise DataError(_unreadable(what, path, exc)) from exc
    with image:
        try:
            image.load()
        except MemoryError:
            raise
        except Exception as exc:
            raise DataError(_unreadable(what, path, exc)) from exc
        if image.width == 0 or image.height == 0:
            raise DataError(f"{what} {path} has zero size ({image.width} x {image.height} pixels)")
        yield image


def _unreadable(what: str, path: Path, exc: BaseException) -> str:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return f"cannot read {what} {path}: {type(exc).__name__}" + (f": {detail}" if detail else "")


def _warn_if_oriented(image: Image.Image, path: Path) -> None:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # A malformed EXIF block must not make a readable image unreadable.
        log.debug("could not parse EXIF of %s", path)
        return
    if orientation not in (None, 1):
        warnings.warn(
            "an image has an EXIF orientation tag; hetmm_jax ignores it and uses the pixels as "
            "stored (see hetmm_jax.data)",
            ExifOrientationWarning,
            stacklevel=3,
        )
        log.debug("EXIF orientation %s ignored in %s", orientation, path)


def _to_uint8(array: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """Maps a 16-bit or 32-bit integer greyscale array to 8 bits, scaling rather than clipping."""
    if mode.startswith("I;16"):
        # 65535 / 257 == 255 exactly, so the full 16-bit range maps onto the full 8-bit range.
        return np.rint(array.astype(np.float32) / 257.0).astype(np.uint8)
    if mode == "I":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise DataError(
                f"image {path} is 32-bit integer with values in [{low}, {high}]; expected "
                "a 16-bit range [0, 65535]"
            )
        return np.rint(array.astype(np.float32) / 257.0).astype(np.uint8)
    raise DataError(f"image {path} has pixel mode {mode!r}, which hetmm_jax cannot read")


def read_image(path: str | Path) -> np.ndarray:
    """Reads an image file as 8-bit RGB.

    Any format Pillow decodes is accepted. Conversions:

    - greyscale (``L``, ``1``) is repeated over three channels;
    - palette (``P``) is expanded through its palette;
    - ``RGBA`` / ``LA`` / ``PA``: the alpha channel is dropped (not composited), the stored
      colours are kept;
    - 16-bit greyscale (``I;16*``, and ``I`` with values in [0, 65535]) is scaled by 255 / 65535
      and rounded, so the full 16-bit range maps onto [0, 255]; 16-bit colour PNGs are reduced
      by Pillow itself, which keeps the high byte of each sample (within 1 of the same scaling);
    - ``CMYK`` and ``YCbCr`` go through Pillow's conversion to RGB (no colour management);
    - multi-frame files (GIF, TIFF) give their first frame.

    Floating-point images (mode ``F``) are refused: their range is not defined.

    Args:
        path: the image file.

    Returns:
        uint8 array (H, W, 3), C-contiguous.

    Raises:
        DataError: the file is missing, empty, unreadable, truncated or of an unsupported pixel
            mode. Truncated files fail here because every pixel is decoded.
    """
    path = Path(path)
    with _decoded(path, "image") as image:
        _warn_if_oriented(image, path)
        array = _rgb_array(image, path)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array, dtype=np.uint8)


def _rgb_array(image: Image.Image, path: Path) -> np.ndarray:
    """The pixels of a loaded image as uint8 (H, W) greyscale or (H, W, 3) RGB."""
    mode = image.mode
    if mode == "RGB":
        array = np.asarray(image)
    elif mode in ("L", "1"):
        array = np.asarray(image.convert("L"))
    elif mode == "LA":
        array = np.asarray(image)[..., 0]
    elif mode.startswith("I;16") or mode == "I":
        array = _to_uint8(np.asarray(image), mode, path)
    elif mode == "F":
        raise DataError(
            f"image {path} is 32-bit floating point (mode 'F'); convert it to 8 or 16 bit"
        )
    else:
        # RGBA, RGBX, P, PA, CMYK, YCbCr, LAB, HSV ... all have a defined RGB conversion; RGBA's
        # and PA's alpha is discarded by it.
        try:
            array = np.asarray(image.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise DataError(
                f"image {path} has pixel mode {mode!r}, not convertible to RGB"
            ) from exc
    return array


def read_mask(
    path: str | Path,
    expected_hw: tuple[int, int] | None = None,
    *,
    image_path: str | Path | None = None,
) -> np.ndarray:
    """Reads a ground-truth mask as booleans (True = defective pixel).

    A pixel is defective when its value is above half of the format's range: ``> 127`` for
    8-bit masks, ``> 32767`` for 16-bit ones, any set pixel of a 1-bit mask. For colour or
    palette masks the largest of the R, G, B values is thresholded (so a pure red annotation
    counts); alpha is ignored. An all-zero mask (e.g. the empty MTD "uneven" masks) is valid and
    gives an all-False array; a 0-byte file is not an image and raises.

    Args:
        path: the mask file.
        expected_hw: (H, W) the mask must have, normally its image's size; None skips the check.
        image_path: the image the mask belongs to, named in the size-mismatch error.

    Returns:
        bool array (H, W).

    Raises:
        DataError: unreadable file, floating-point mask, or a size other than ``expected_hw``.
    """
    path = Path(path)
    with _decoded(path, "mask") as image:
        mask = _binary_array(image, path)

    if expected_hw is not None:
        expected = (int(expected_hw[0]), int(expected_hw[1]))
        if mask.shape != expected:
            owner = f"its image {image_path}" if image_path is not None else "the expected size"
            raise DataError(
                f"mask {path} is {mask.shape[0]} x {mask.shape[1]} (H x W) but "
                f"{owner} is {expected[0]} x {expected[1]}"
            )
    return np.ascontiguousarray(mask)


def _binary_array(image: Image.Image, path: Path) -> np.ndarray:
    """A loaded mask image thresholded at half its range, as bool (H, W)."""
    mode = image.mode
    if mode == "1":
        mask = np.asarray(image.convert("L")) > 0
    elif mode == "L":
        mask = np.asarray(image) > 127
    elif mode == "LA":
        mask = np.asarray(image)[..., 0] > 127
    elif mode.startswith("I;16") or mode == "I":
        mask = np.asarray(image) > 32767
    elif mode == "F":
        raise DataError(f"mask {path} is floating point (mode 'F'); save it as 8-bit 0 / 255")
    else:
        try:
            mask = np.asarray(image.convert("RGB")).max(axis=2) > 127
        except (ValueError, OSError) as exc:
            raise DataError(f"mask {path} has pixel mode {mode!r}, which cannot be read") from exc
    return mask


def image_size(path: str | Path) -> tuple[int, int]:
    """Returns an image file's (H, W) from its header, without decoding the pixels.

    Raises:
        DataError: the file is missing, empty or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except MemoryError:
        raise
    except Exception as exc:
        raise DataError(_unreadable("image", path, exc)) from exc
    return height, width


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        hw = (int(size), int(size))
    else:
        if len(size) != 2:
            raise InputError(f"size must be an int or (height, width), got {size!r}")
        hw = (int(size[0]), int(size[1]))
    if hw[0] < 1 or hw[1] < 1:
        raise InputError(f"size must be positive, got {size!r}")
    return hw


def resize_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resizes a boolean mask with nearest-neighbour sampling (no new values, no blur).

    Output row i takes input row ``floor((i + 0.5) * H_in / H_out)`` (the input pixel that
    contains the output pixel's centre), and likewise for columns: the convention of Pillow's
    ``NEAREST``, except that a centre falling exactly on an edge between two input pixels
    always takes the second one (Pillow's fixed-point arithmetic may take either).

    Args:
        mask: bool array (H, W) (other dtypes are cast with ``!= 0``).
        size: output (H, W), or an int for a square output.

    Returns:
        bool array (H_out, W_out).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    out_h, out_w = _as_hw(size)
    in_h, in_w = mask.shape
    if in_h == 0 or in_w == 0:
        raise InputError(f"cannot resize an empty mask of shape {mask.shape}")
    # Integer arithmetic keeps exact ties (a centre on a source pixel edge) deterministic.
    rows = (2 * np.arange(out_h, dtype=np.int64) + 1) * in_h // (2 * out_h)
    cols = (2 * np.arange(out_w, dtype=np.int64) + 1) * in_w // (2 * out_w)
    return np.ascontiguousarray(mask[rows[:, None], cols[None, :]] != 0)


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: str | Path) -> list[Path]:
    """Lists the image files directly inside ``folder`` (not recursive), sorted by name.

    Images are recognised by extension (``IMAGE_EXTENSIONS``, any letter case); hidden files are
    skipped.

    Args:
        folder: the directory.

    Returns:
        Sorted list of paths, never empty.

    Raises:
        DataError: the folder is missing, not a directory, or holds no image.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and _is_image_name(p))
    if not paths:
        raise DataError(
            f"folder {folder} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


def iter_images(
    paths: Iterable[str | Path], prefetch: int = 4
) -> Iterator[tuple[Path, np.ndarray]]:
    """Reads images in background threads, yielding them in the order given.

    Pillow releases the GIL while decoding, so up to ``prefetch`` files are decoded while the
    caller works on the previous ones. An error is raised when its image's turn comes.

    Args:
        paths: image files.
        prefetch: number of images read ahead (0 reads in the calling thread).

    Yields:
        (path, uint8 array (H, W, 3)) pairs.
    """
    paths = [Path(p) for p in paths]
    if prefetch <= 0:
        for path in paths:
            yield path, read_image(path)
        return
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=min(prefetch, 4), thread_name_prefix="hetmm-read"
    )
    pending: list[concurrent.futures.Future[np.ndarray]] = []
    try:
        next_index = 0
        for index, path in enumerate(paths):
            while next_index < len(paths) and next_index <= index + prefetch:
                pending.append(executor.submit(read_image, paths[next_index]))
                next_index += 1
            yield path, pending.pop(0).result()
    finally:
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def read_images(paths: Iterable[str | Path], prefetch: int = 4) -> list[np.ndarray]:
    """Reads several images (see :func:`read_image`), in order, with background prefetching.

    Returns:
        list of uint8 arrays (H_i, W_i, 3).
    """
    return [image for _, image in iter_images(paths, prefetch=prefetch)]


def load_folder(folder: str | Path) -> tuple[list[Path], list[np.ndarray]]:
    """Reads every image of a plain folder (see :func:`list_images`).

    Returns:
        (paths, images): sorted paths and the uint8 (H_i, W_i, 3) arrays in the same order.
    """
    paths = list_images(folder)
    return paths, read_images(paths)


# --------------------------------------------------------------------------------------------
# MVTec AD layout
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """One test image of an MVTec-layout data set.

    Attributes:
        path: the image file.
        label: 0 for a defect-free ("good") image, 1 for a defective one.
        defect: "good" or the name of the defect folder under ``test/``.
        mask_path: the ground-truth mask, or None for good images (and for defective images
            without a mask when the category was loaded with ``allow_missing_masks=True``).
    """

    path: Path
    label: int
    defect: str
    mask_path: Path | None = None

    @property
    def has_pixel_labels(self) -> bool:
        """True when the sample's pixel ground truth is known (good, or defective with a mask)."""
        return self.label == 0 or self.mask_path is not None


@dataclasses.dataclass(frozen=True)
class MVTecCategory:
    """One category of an MVTec-layout data set, as returned by :func:`load_category`.

    Attributes:
        root: the category folder.
        train: defect-free training images (``train/good``), sorted.
        test: test samples, "good" first, then defects in name order, files sorted by name.
    """

    root: Path
    train: tuple[Path, ...]
    test: tuple[Sample, ...]

    @property
    def defects(self) -> tuple[str, ...]:
        """Names of the defect types (test folders other than "good"), sorted."""
        return tuple(sorted({s.defect for s in self.test if s.label == 1}))

    @property
    def labels(self) -> np.ndarray:
        """int64 (n_test,): 0 good, 1 defective."""
        return np.array([s.label for s in self.test], dtype=np.int64)

    @property
    def defect_types(self) -> list[str]:
        """Defect name of every test sample ("good" for defect-free ones)."""
        return [s.defect for s in self.test]

    @property
    def test_paths(self) -> list[Path]:
        return [s.path for s in self.test]

    @property
    def has_pixel_labels(self) -> bool:
        """True when every test sample has known pixel ground truth."""
        return all(s.has_pixel_labels for s in self.test)

    def counts(self) -> dict[str, int]:
        """Number of test images per defect type, "good" included."""
        return dict(Counter(s.defect for s in self.test))

    def with_pixel_labels(self) -> list[Sample]:
        """The test samples usable for pixel metrics (good, or defective with a mask)."""
        return [s for s in self.test if s.has_pixel_labels]


def _mask_image_stem(mask: Path, image_stems: set[str]) -> str | None:
    """The stem of the image a mask file belongs to, or None when there is no such image.

    ``<stem>_mask.<ext>`` is preferred; ``<stem>.<ext>`` is accepted too, so that an image
    whose own name ends in "_mask" still finds its mask.
    """
    stem = mask.stem
    if stem.endswith(_MASK_SUFFIX) and stem[: -len(_MASK_SUFFIX)] in image_stems:
        return stem[: -len(_MASK_SUFFIX)]
    if stem in image_stems:
        return stem
    return None


def _match_masks(
    defect: str, images: list[Path], gt_folder: Path, allow_missing_masks: bool
) -> list[Path | None]:
    """Pairs each defective image with its mask file; see :func:`load_category` for the rules."""
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise DataError(
                f"images {by_stem[image.stem]} and {image} share the stem {image.stem!r}; "
                "masks could not be told apart"
            )
        by_stem[image.stem] = image

    masks: dict[str, Path] = {}
    if gt_folder.is_dir():
        for mask in sorted(p for p in gt_folder.iterdir() if p.is_file() and _is_image_name(p)):
            stem = _mask_image_stem(mask, set(by_stem))
            if stem is None:
                raise DataError(
                    f"mask {mask} has no image: expected {gt_folder.parent.parent}/test/{defect}/"
                    f"{mask.stem.removesuffix(_MASK_SUFFIX)}.<ext>"
                )
            if stem in masks:
                raise DataError(f"image {by_stem[stem]} has two masks: {masks[stem]} and {mask}")
            masks[stem] = mask

    missing = [image for image in images if image.stem not in masks]
    if missing:
        if not allow_missing_masks:
            raise DataError(
                f"defective image {missing[0]} has no mask (expected "
                f"{gt_folder / (missing[0].stem + _MASK_SUFFIX)}.png); {len(missing)} of "
                f"{len(images)} '{defect}' images lack one; pass allow_missing_masks=True to "
                "use them for image-level metrics only"
            )
        log.warning(
            "%d of %d '%s' images have no mask; they count for image-level metrics only",
            len(missing),
            len(images),
            defect,
        )
    return [masks.get(image.stem) for image in images]


def load_category(root: str | Path, *, allow_missing_masks: bool = False) -> MVTecCategory:
    """Indexes one category in the MVTec AD layout (no pixel is read).

    Rules:

    - ``train/good`` must exist and hold images; other folders under ``train/`` are ignored
      with a warning.
    - ``test/`` must hold at least one non-empty sub-folder; each sub-folder is a defect type,
      "good" meaning defect-free. An empty sub-folder is an error. Image files lying directly in
      ``test/`` are ignored with a warning.
    - Each defective image ``test/<defect>/<stem>.<ext>`` has its mask in
      ``ground_truth/<defect>/``, named ``<stem>_mask.<ext>`` or ``<stem>.<ext>`` with any image
      extension. A mask file without such an image, or a ground-truth folder whose defect has no
      test folder, is an error; so are two masks for one image.
    - A defective image without a mask is an error, unless ``allow_missing_masks=True``: then
      its ``mask_path`` is None, meaning "pixel ground truth unknown"; it counts for image-level
      metrics and :meth:`MVTecCategory.with_pixel_labels` leaves it out of pixel metrics.
    - Good images have no mask; ``ground_truth/good`` is ignored with a warning.
    - Mask sizes are checked against their images when masks are read (:func:`load_masks`).

    Args:
        root: the category folder, e.g. ``.../mtd/magnetic_tile``.
        allow_missing_masks: accept defective images without a mask (see above).

    Returns:
        The category index.

    Raises:
        DataError: with the path and the rule broken.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data set folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data set path is not a folder: {root}")

    train_dir = root / "train" / _GOOD
    if not train_dir.is_dir():
        raise DataError(f"data set {root} has no train/good folder (expected {train_dir})")
    train = tuple(list_images(train_dir))
    for extra in sorted(p for p in (root / "train").iterdir() if p.is_dir() and p.name != _GOOD):
        log.warning("ignoring %s: only train/good is used for training", extra)

    test_dir = root / "test"
    if not test_dir.is_dir():
        raise DataError(f"data set {root} has no test folder (expected {test_dir})")
    defect_dirs = sorted(
        (p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: (p.name != _GOOD, p.name),
    )
    if not defect_dirs:
        raise DataError(f"test folder {test_dir} has no sub-folders (expected test/good, ...)")
    loose = [p for p in test_dir.iterdir() if p.is_file() and _is_image_name(p)]
    if loose:
        log.warning(
            "ignoring %d images directly in %s: test images go in test/<defect>/",
            len(loose),
            test_dir,
        )

    gt_root = root / "ground_truth"
    samples: list[Sample] = []
    for folder in defect_dirs:
        images = list_images(folder)
        if folder.name == _GOOD:
            samples.extend(Sample(path, 0, _GOOD, None) for path in images)
            continue
        mask_paths = _match_masks(folder.name, images, gt_root / folder.name, allow_missing_masks)
        samples.extend(Sample(path, 1, folder.name, mask) for path, mask in zip(images, mask_paths))

    if gt_root.is_dir():
        known = {p.name for p in defect_dirs}
        for gt_folder in sorted(p for p in gt_root.iterdir() if p.is_dir()):
            if gt_folder.name == _GOOD:
                log.warning("ignoring %s: good images have no masks", gt_folder)
            elif gt_folder.name not in known:
                masks = [p for p in gt_folder.iterdir() if p.is_file() and _is_image_name(p)]
                if masks:
                    raise DataError(
                        f"mask {sorted(masks)[0]} has no image: there is no test folder "
                        f"{test_dir / gt_folder.name}"
                    )

    if not any(s.label == 0 for s in samples):
        log.warning("data set %s has no test/good images: image AUROC cannot be computed", root)
    log.info(
        "%s: %d training images, %d test images (%s)",
        root,
        len(train),
        len(samples),
        ", ".join(f"{k} {v}" for k, v in Counter(s.defect for s in samples).items()),
    )
    return MVTecCategory(root=root, train=train, test=tuple(samples))


def load_mask(sample: Sample) -> np.ndarray:
    """Reads a sample's mask at its image's size, checking that the sizes agree.

    Good samples give an all-False mask.

    Returns:
        bool array (H, W) of the image's size.

    Raises:
        DataError: unreadable files, a size mismatch (naming both files), or a defective sample
            without a mask.
    """
    hw = image_size(sample.path)
    if sample.label == 0:
        return np.zeros(hw, dtype=bool)
    if sample.mask_path is None:
        raise DataError(
            f"defective image {sample.path} has no mask; keep only samples with "
            "has_pixel_labels for pixel metrics"
        )
    return read_mask(sample.mask_path, hw, image_path=sample.path)


def load_masks(
    samples: Sequence[Sample], size: int | Sequence[int] | None = None
) -> np.ndarray | list[np.ndarray]:
    """Reads the masks of test samples, optionally resized (nearest neighbour) to one size.

    Args:
        samples: test samples (e.g. ``category.test``).
        size: target (H, W) or int; None keeps each image's own size.

    Returns:
        bool array (n, H, W) when ``size`` is given, else a list of bool (H_i, W_i) arrays.

    Raises:
        DataError: see :func:`load_mask`.
    """
    masks = [load_mask(sample) for sample in samples]
    if size is None:
        return masks
    hw = _as_hw(size)
    out = np.zeros((len(masks), *hw), dtype=bool)
    for index, mask in enumerate(masks):
        out[index] = resize_mask(mask, hw)
    return out
