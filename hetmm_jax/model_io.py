"""Saving and loading fitted detectors without pickle.

A saved model is one ``.npz`` archive (a zip of ``.npy`` files, read with ``allow_pickle=False``,
so loading it cannot run code) holding:

- ``__meta__``: UTF-8 JSON as a uint8 array: the format name and version, the detector's
  configuration, the threshold, the template layers, their shapes and dtypes;
- ``templates/<layer>``: the template set of each layer, (N, h, w, C). bfloat16 templates are
  stored as their uint16 bit patterns and viewed back on load.

Files are written atomically: to a temporary file in the destination folder, flushed to disk,
then renamed over the destination, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from hetmm_jax.errors import ModelFileError

log = logging.getLogger(__name__)

FORMAT_NAME = "hetmm-jax-model"
FORMAT_VERSION = 1

_META_KEY = "__meta__"
_TEMPLATE_PREFIX = "templates/"
_STORED_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(file_object)`` on a temporary file, then rename it to ``path``.

    Args:
      path: destination file. Its folder must exist.
      write: callable taking a binary file object open for writing.

    Returns:
      The destination path.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelFileError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_model(path: str | os.PathLike, meta: Mapping[str, Any],
               templates: Mapping[str, np.ndarray]) -> Path:
    """Write a model archive atomically.

    Args:
      path: destination, conventionally ending in ``.npz`` (kept as given).
      meta: JSON-serialisable configuration and fitted scalars.
      templates: layer name -> (N, h, w, C) array of float32, float16 or bfloat16.

    Returns:
      The destination path.
    """
    arrays: dict[str, np.ndarray] = {}
    layers = {}
    for name, value in templates.items():
        value = np.asarray(value)
        dtype = value.dtype.name
        if dtype not in _STORED_DTYPES:
            raise ModelFileError(f"{path}: templates of layer {name!r} have unsupported dtype {dtype}")
        stored = value.view(np.uint16) if dtype == "bfloat16" else value
        arrays[_TEMPLATE_PREFIX + name] = np.ascontiguousarray(stored)
        layers[name] = {"shape": list(value.shape), "dtype": dtype}
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layers": layers,
              **dict(meta)}
    arrays[_META_KEY] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    return atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_model(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a model archive written by :func:`save_model`.

    Args:
      path: the archive.

    Returns:
      ``(meta, templates)``: the JSON header as a dict and layer name -> (N, h, w, C) arrays in
      their stored dtype.

    Raises:
      ModelFileError: missing, truncated or corrupt file, another format, another format version,
        or templates that disagree with the header.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            if _META_KEY not in names:
                raise ModelFileError(f"{path}: not a hetmm-jax model (no {_META_KEY} entry)")
            meta = json.loads(bytes(archive[_META_KEY]).decode("utf-8"))
            _check_header(path, meta)
            templates = {}
            for name, info in meta["layers"].items():
                key = _TEMPLATE_PREFIX + name
                if key not in names:
                    raise ModelFileError(f"{path}: templates of layer {name!r} are missing")
                value = archive[key]
                if info["dtype"] == "bfloat16":
                    value = value.view(ml_dtypes.bfloat16)
                if list(value.shape) != info["shape"] or value.dtype.name != info["dtype"]:
                    raise ModelFileError(
                        f"{path}: templates of layer {name!r} are {value.dtype.name} "
                        f"{list(value.shape)}, the header says {info['dtype']} {info['shape']}")
                templates[name] = value
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise ModelFileError(f"{path}: corrupt or truncated model file ({err})") from err
    return meta, templates


def _check_header(path: Path, meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path}: not a hetmm-jax model (format {meta.get('format')!r})"
                             if isinstance(meta, dict) else f"{path}: not a hetmm-jax model")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version}, this hetmm-jax reads version "
            f"{FORMAT_VERSION}; refit or convert it with the matching hetmm-jax release")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ModelFileError(f"{path}: the header lists no template layers")
    for name, info in layers.items():
        if (not isinstance(info, dict) or info.get("dtype") not in _STORED_DTYPES
                or not isinstance(info.get("shape"), list) or len(info["shape"]) != 4):
            raise ModelFileError(f"{path}: bad header entry for layer {name!r}: {info!r}")
