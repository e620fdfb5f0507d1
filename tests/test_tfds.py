"""Tests of the TFDS builder (hetmm_jax.tfds_mvtec) on small data sets written here.

Expected pixels come from Pillow directly and masks from the arrays written, not from
hetmm_jax.data, so a reading mistake shared by both modules would still fail here.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hetmm_jax.errors import DataError, InputError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NO_TFDS = "tensorflow-datasets is not installed (pip install 'hetmm-jax[tfds]')"


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets", reason=NO_TFDS)


@pytest.fixture(scope="module")
def tm(tfds):
    from hetmm_jax import tfds_mvtec

    return tfds_mvtec


@dataclasses.dataclass
class Written:
    """What the test wrote for one image: its expected decoded pixels and 0/1 mask."""

    file_name: str
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # uint8 (H, W) of 0 / 1
    label: int
    defect: str


def _write_image(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Saves pixels (uint8 (H, W) or (H, W, 3)); returns what Pillow decodes, as RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _write_mask(path: Path, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Saves a random 0 / 255 mask of size hw; returns it as 0 / 1."""
    mask = (rng.random(hw) < 0.3).astype(np.uint8)
    mask[0, 0] = 1  # never all zero, so a mask swapped for zeros is noticed
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask * 255).save(path)
    return mask


def make_category(root: Path, seed: int = 0) -> tuple[list[Written], list[Written]]:
    """Writes a tiny MVTec-layout category with images of two sizes.

    Returns:
        (train, test) in the order the builder must keep: file names sorted, test "good" first,
        then defect folders in name order.
    """
    rng = np.random.default_rng(seed)
    sizes = [(9, 13), (12, 7)]

    def rgb(hw: tuple[int, int]) -> np.ndarray:
        return rng.integers(0, 256, (*hw, 3), dtype=np.uint8)

    train = []
    for index in range(3):
        name = f"train/good/{index:03d}.png"
        image = _write_image(root / name, rgb(sizes[index % 2]))
        train.append(Written(name, image, np.zeros(image.shape[:2], np.uint8), 0, "good"))
    # A greyscale image must come back as three equal channels.
    grey = rng.integers(0, 256, sizes[1], dtype=np.uint8)
    image = _write_image(root / "train/good/003.png", grey)
    assert np.array_equal(image, np.repeat(grey[:, :, None], 3, axis=2))
    train.append(Written("train/good/003.png", image, np.zeros(sizes[1], np.uint8), 0, "good"))

    test = []
    for index in range(2):
        name = f"test/good/{index:03d}.png"
        image = _write_image(root / name, rgb(sizes[index]))
        test.append(Written(name, image, np.zeros(image.shape[:2], np.uint8), 0, "good"))
    for defect, count, extension in (("crack", 2, ".png"), ("scratch", 1, ".jpg")):
        for index in range(count):
            stem = f"{index:03d}"
            name = f"test/{defect}/{stem}{extension}"
            image = _write_image(root / name, rgb(sizes[(index + 1) % 2]))
            mask_path = root / "ground_truth" / defect / f"{stem}_mask.png"
            test.append(Written(name, image, _write_mask(mask_path, image.shape[:2], rng), 1,
                                defect))
    return train, test


def _check_examples(examples: list[dict], written: list[Written]) -> None:
    assert len(examples) == len(written)
    for example, expected in zip(examples, written, strict=True):
        name = example["file_name"].decode()
        assert name == expected.file_name
        assert example["image"].dtype == np.uint8, name
        np.testing.assert_array_equal(example["image"], expected.image, err_msg=name)
        assert example["mask"].dtype == np.uint8, name
        np.testing.assert_array_equal(example["mask"], expected.mask[:, :, None], err_msg=name)
        assert int(example["label"]) == expected.label, name
        assert example["defect_type"].decode() == expected.defect, name


@pytest.fixture(scope="module")
def prepared(tfds, tm, tmp_path_factory):
    """A category "widget" written, prepared with the builder (ArrayRecord), and its files."""
    base = tmp_path_factory.mktemp("tfds")
    manual_dir = base / "manual"
    train, test = make_category(manual_dir / "widget")
    data_dir = base / "data"
    builder = tm.builder("widget", data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder, train, test, manual_dir, data_dir


def _read_all(source) -> list[dict]:
    return [source[index] for index in range(len(source))]


def test_import_hetmm_jax_does_not_import_tensorflow():
    code = (
        "import sys, hetmm_jax, hetmm_jax.data; "
        "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_splits_and_features_roundtrip(prepared):
    builder, train, test, _, _ = prepared
    assert builder.info.splits["train"].num_examples == len(train)
    assert builder.info.splits["test"].num_examples == len(test)
    assert builder.info.features["label"].names == ["good", "defective"]
    assert builder.info.features["image"].shape == (None, None, 3)
    assert builder.info.features["mask"].shape == (None, None, 1)
    _check_examples(_read_all(builder.as_data_source(split="train")), train)
    _check_examples(_read_all(builder.as_data_source(split="test")), test)


def test_builds_and_reads_without_tensorflow(tfds, tmp_path):
    # The tfds extra does not install TensorFlow: building and as_data_source must not need it,
    # even where it is installed: the child process's import finders act as if it were not.
    make_category(tmp_path / "manual" / "widget")
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def __init__(self, finder): self.finder = finder\n"
        "    def __getattr__(self, name): return getattr(self.finder, name)\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'tensorflow': return None\n"
        "        return self.finder.find_spec(name, path, target)\n"
        "sys.meta_path[:] = [Hide(f) for f in sys.meta_path]\n"
        "import tensorflow_datasets as tfds\n"
        "from hetmm_jax import tfds_mvtec\n"
        f"b = tfds_mvtec.builder('widget', data_dir={str(tmp_path / 'data')!r})\n"
        "b.download_and_prepare(download_config=tfds.download.DownloadConfig(\n"
        f"    manual_dir={str(tmp_path / 'manual')!r}))\n"
        "print(len(b.as_data_source(split='test')), b.as_data_source(split='test')[0]['label'])\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["5", "0"]


def test_read_back_by_name(prepared, tfds):
    _, _, test, _, data_dir = prepared
    source = tfds.data_source("hetmm_mvtec/widget", split="test", data_dir=str(data_dir))
    _check_examples(_read_all(source), test)


def test_manual_dir_may_be_the_category_folder(tfds, tm, tmp_path):
    train, test = make_category(tmp_path / "manual" / "part-B.v2", seed=1)
    builder = tm.builder("part-B.v2", data_dir=tmp_path / "data")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual" /
                                                                    "part-B.v2"))
    )
    _check_examples(_read_all(builder.as_data_source(split="test")), test)
    _check_examples(_read_all(builder.as_data_source(split="train")), train)


def test_configs(tm, tfds, tmp_path):
    assert {"magnetic_tile", "cookie", "bottle"} <= set(tm.MVTecLayout.builder_configs)
    builder = tfds.builder("hetmm_mvtec/some_new_part", data_dir=str(tmp_path))
    assert isinstance(builder, tm.MVTecLayout)
    assert builder.builder_config.name == "some_new_part"
    # Same object each time: TFDS refuses a config that differs from the class's.
    assert tm.MVTecLayout.get_builder_config("some_new_part") is builder.builder_config
    with pytest.raises(InputError, match="not usable as a TFDS config name"):
        tm.builder("a/b")


def test_find_categories(tm, tmp_path):
    for name in ("zeta", "alpha"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    assert tm.find_categories(tmp_path) == ["alpha", "zeta"]
    assert tm.find_categories(tmp_path / "zeta") == ["zeta"]
    with pytest.raises(DataError, match="is not a folder"):
        tm.find_categories(tmp_path / "missing")


def _prepare(tfds, tm, manual_dir: Path, category: str, data_dir: Path):
    builder = tm.builder(category, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def test_missing_category_names_the_ones_found(tfds, tm, tmp_path):
    make_category(tmp_path / "manual" / "widget")
    with pytest.raises(DataError, match=r"no category folder 'gadget'.*categories found: widget"):
        _prepare(tfds, tm, tmp_path / "manual", "gadget", tmp_path / "data")


def test_truncated_image_is_a_data_error(tfds, tm, tmp_path):
    root = tmp_path / "manual" / "widget"
    make_category(root)
    broken = root / "test" / "crack" / "001.png"
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(DataError, match=r"001\.png"):
        _prepare(tfds, tm, tmp_path / "manual", "widget", tmp_path / "data")


def test_mask_of_wrong_size_is_a_data_error(tfds, tm, tmp_path):
    root = tmp_path / "manual" / "widget"
    make_category(root)
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(root / "ground_truth/crack/000_mask.png")
    with pytest.raises(DataError, match=r"000_mask\.png is 3 x 4"):
        _prepare(tfds, tm, tmp_path / "manual", "widget", tmp_path / "data")


def test_missing_mask_is_a_data_error(tfds, tm, tmp_path):
    root = tmp_path / "manual" / "widget"
    make_category(root)
    (root / "ground_truth/scratch/000_mask.png").unlink()
    with pytest.raises(DataError, match=r"scratch/000\.jpg has no mask"):
        _prepare(tfds, tm, tmp_path / "manual", "widget", tmp_path / "data")


def test_iter_batches_keeps_variable_sizes(prepared, tm):
    builder, _, test, _, _ = prepared
    source = builder.as_data_source(split="test")
    batches = list(tm.iter_batches(source, batch_size=2))
    assert [len(b["image"]) for b in batches] == [2, 2, 1]
    images = [image for batch in batches for image in batch["image"]]
    assert [image.shape for image in images] == [w.image.shape for w in test]
    assert [name for b in batches for name in b["file_name"]] == [w.file_name for w in test]
    assert [d for b in batches for d in b["defect_type"]] == [w.defect for w in test]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="batch_size"):
            list(tm.iter_batches(source, batch_size=bad))


def test_tf_data_pipeline(tfds, tm, tmp_path):
    pytest.importorskip("tensorflow", reason="tensorflow is not installed (tf.data path)")
    train, test = make_category(tmp_path / "manual" / "widget", seed=2)
    builder = tm.builder("widget", data_dir=tmp_path / "data", file_format="tfrecord")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual"))
    )
    _check_examples(list(tfds.as_numpy(builder.as_dataset(split="train"))), train)
    _check_examples(list(tfds.as_numpy(builder.as_dataset(split="test"))), test)


@pytest.mark.data
def test_real_cookie_category(tfds, tm, tmp_path):
    manual_dir = SHARED_DATA / "cookies"
    if not (manual_dir / "cookie").is_dir():
        pytest.skip(f"real data not found at {manual_dir}/cookie")
    from hetmm_jax.data import load_category

    category = load_category(manual_dir / "cookie")
    builder = _prepare(tfds, tm, manual_dir, "cookie", tmp_path / "data")
    assert builder.info.splits["train"].num_examples == len(category.train)
    assert builder.info.splits["test"].num_examples == len(category.test)
    source = builder.as_data_source(split="test")
    # Spot checks against Pillow: the last good image and the last defective one.
    for index in (category.labels.tolist().index(1) - 1, len(category.test) - 1):
        sample = category.test[index]
        example = source[index]
        assert example["file_name"].decode() == sample.path.relative_to(category.root).as_posix()
        with Image.open(sample.path) as image:
            np.testing.assert_array_equal(example["image"], np.asarray(image.convert("RGB")))
        if sample.mask_path is None:
            assert not example["mask"].any()
        else:
            with Image.open(sample.mask_path) as mask:
                expected = (np.asarray(mask.convert("L")) > 127).astype(np.uint8)
            np.testing.assert_array_equal(example["mask"][:, :, 0], expected)
        assert int(example["label"]) == sample.label
        assert example["defect_type"].decode() == sample.defect
