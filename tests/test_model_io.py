"""Saved models: round trip, atomic writes, and every way a file can be bad."""

import json
import zipfile

import ml_dtypes
import numpy as np
import pytest

from hetmm_jax import model_io
from hetmm_jax.errors import ModelFileError


def _templates(dtype=np.float32):
    rng = np.random.default_rng(0)
    return {"layer1": rng.normal(size=(3, 4, 4, 5)).astype(dtype),
            "layer2": rng.normal(size=(3, 2, 2, 7)).astype(dtype)}


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_round_trip_keeps_values_and_dtype(tmp_path, dtype):
    templates = _templates(dtype)
    path = model_io.save_model(tmp_path / "m.npz", {"threshold": 0.5, "params": {"a": 1}},
                               templates)
    meta, loaded = model_io.load_model(path)
    assert meta["threshold"] == 0.5 and meta["params"] == {"a": 1}
    for name, value in templates.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name].astype(np.float32), value.astype(np.float32))


def test_load_never_unpickles(tmp_path):
    # An object array needs pickle to load; the reader must refuse it rather than run it.
    path = tmp_path / "evil.npz"
    np.savez(path, __meta__=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ModelFileError):
        model_io.load_model(path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "m.npz"
    model_io.save_model(path, {"threshold": 1.0}, _templates())
    before = path.read_bytes()

    def explode(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        model_io.atomic_write(path, explode)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]


def test_truncated_file(tmp_path):
    path = model_io.save_model(tmp_path / "m.npz", {}, _templates())
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 5):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=bad.name):
            model_io.load_model(bad)


def test_missing_file_and_not_a_model(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        model_io.load_model(tmp_path / "nope.npz")
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ModelFileError, match="not a hetmm-jax model"):
        model_io.load_model(other)


def _rewrite_meta(path, change):
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    change(meta)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)


def test_other_format_version_is_refused(tmp_path):
    path = model_io.save_model(tmp_path / "m.npz", {}, _templates())
    _rewrite_meta(path, lambda meta: meta.update(format_version=99))
    with pytest.raises(ModelFileError, match="format version 99"):
        model_io.load_model(path)


def test_header_disagreeing_with_arrays(tmp_path):
    path = model_io.save_model(tmp_path / "m.npz", {}, _templates())
    _rewrite_meta(path, lambda meta: meta["layers"]["layer1"].update(shape=[9, 4, 4, 5]))
    with pytest.raises(ModelFileError, match="layer1"):
        model_io.load_model(path)


def test_garbage_zip_member(tmp_path):
    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__meta__.npy", b"not an npy file")
    with pytest.raises(ModelFileError):
        model_io.load_model(path)
