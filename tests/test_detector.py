"""The Detector: scikit-learn contract, fit / predict / update / compress / calibrate / save."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import textured
from hetmm_jax import PRESETS, Detector
from hetmm_jax.errors import DataError, InputError, ModelFileError, NotFittedError

# Small and fast: EfficientNet-Lite0 with its real weights at 64 x 64 pixels.
FAST = dict(backbone="efficientnet_lite0", image_size=64, layers=("layer1", "layer2", "layer3"),
            forward_patches=(3, 3, 3),
            backward_patches=(1, 1, 1), sigma=1.0, batch_size=4)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    train = [textured(rng, 64) for _ in range(8)]
    good = [textured(rng, 64) for _ in range(4)]
    bad = [textured(rng, 64, defect=True) for _ in range(4)]
    return train, good, bad


@pytest.fixture(scope="module")
def fitted(images):
    train, _, _ = images
    return Detector(**FAST).fit(train)


def test_constructor_defaults_are_the_default_preset():
    plain, preset = Detector(), Detector.from_preset("default")
    assert plain._validated() == preset._validated()
    for name in ("backbone", "image_size", "sigma"):
        assert getattr(plain, name) == PRESETS["default"][name]


def test_init_only_stores_parameters():
    detector = Detector(**FAST, alphas=(0.1, 0.2))
    assert detector.alphas == (0.1, 0.2)
    assert not hasattr(detector, "templates_")
    assert detector.get_params()["backbone"] == "efficientnet_lite0"


def test_methods_refuse_before_fit(tmp_path, images):
    detector = Detector(**FAST)
    for call in (lambda: detector.predict(images[1]), lambda: detector.update(images[0]),
                 lambda: detector.compress(2), lambda: detector.save(tmp_path / "m.npz"),
                 lambda: detector.threshold):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()


def test_fit_builds_unit_norm_templates(fitted):
    assert fitted.n_templates_ == 8
    assert set(fitted.templates_) == {"layer1", "layer2", "layer3"}
    for name, stride in (("layer1", 4), ("layer2", 8), ("layer3", 16)):
        value = fitted.templates_[name]
        assert value.shape[:3] == (8, 64 // stride, 64 // stride)
        np.testing.assert_allclose(np.linalg.norm(value, axis=-1), 1.0, atol=1e-5)


def test_predict_shapes_and_own_resolution(fitted, images):
    _, good, _ = images
    odd = np.asarray(Image.fromarray(good[0]).resize((80, 50)))
    prediction = fitted.predict([good[1], odd], model_maps=True)
    assert prediction.scores.shape == (2,) and prediction.scores.dtype == np.float32
    assert prediction.maps[0].shape == (64, 64) and prediction.maps[1].shape == (50, 80)
    assert prediction.model_maps.shape == (2, 64, 64)
    assert prediction.labels is None and prediction.masks is None
    # The map at the image's resolution is the model map resized: same range.
    assert prediction.maps[1].max() <= prediction.model_maps[1].max() + 1e-5


def test_defects_score_higher_than_good(fitted, images):
    _, good, bad = images
    scores = fitted.predict(good + bad).scores
    assert scores[4:].min() > scores[:4].max(), scores


def test_batch_size_does_not_change_scores(fitted, images):
    _, good, bad = images
    reference = fitted.predict(good + bad).scores
    other = Detector(**{**FAST, "batch_size": 3})
    other.fit(images[0])
    np.testing.assert_allclose(other.predict(good + bad).scores, reference, rtol=1e-5)


def test_save_load_update_equals_fit_on_all(tmp_path, images):
    train, good, bad = images
    first, second = train[:5], train[5:]
    everything = Detector(**FAST).fit(first + second)

    partial = Detector(**FAST).fit(first)
    path = partial.save(tmp_path / "model.npz")
    loaded = Detector.load(path)
    np.testing.assert_array_equal(loaded.predict(good).scores, partial.predict(good).scores)
    loaded.update(second)
    assert loaded.n_templates_ == everything.n_templates_ == 8
    np.testing.assert_array_equal(loaded.predict(good + bad).scores,
                                  everything.predict(good + bad).scores)


def test_calibrate_f1_and_fpr(fitted, images):
    _, good, bad = images
    detector = Detector(**FAST).fit(images[0])
    with pytest.raises(NotFittedError, match="calibrate"):
        detector.threshold
    detector.calibrate(good + bad, [0] * 4 + [1] * 4)
    prediction = detector.predict(good + bad)
    assert list(prediction.labels) == [0] * 4 + [1] * 4
    for label, mask in zip(prediction.labels, prediction.masks):
        assert mask.shape == (64, 64) and bool(mask.any()) == bool(label)

    with pytest.warns(UserWarning, match="too few"):
        detector.calibrate(good, max_fpr=0.05)
    assert detector.threshold == pytest.approx(detector.predict(good).scores.max())


def test_compress_and_k_errors(fitted, images):
    detector = Detector(**FAST).fit(images[0])
    with pytest.raises(InputError, match="larger than the 8 templates"):
        detector.compress(9)
    with pytest.raises(InputError, match="positive integer"):
        detector.compress(0)
    detector.compress(3, strategy="random")
    assert detector.n_templates_ == 3
    assert all(v.shape[0] == 3 for v in detector.templates_.values())


def test_bfloat16_templates_close_to_float32(tmp_path, fitted, images):
    _, good, bad = images
    half = Detector(**{**FAST, "template_dtype": "bfloat16"}).fit(images[0])
    assert half.templates_["layer1"].dtype.name == "bfloat16"
    np.testing.assert_allclose(half.predict(good + bad).scores,
                               fitted.predict(good + bad).scores, rtol=2e-2, atol=2e-3)
    loaded = Detector.load(half.save(tmp_path / "half.npz"))
    assert loaded.templates_["layer1"].dtype.name == "bfloat16"


@pytest.mark.parametrize("bad, match", [
    (np.zeros((64, 64, 4), np.uint8), "4 channels"),
    (np.zeros((64, 64, 3), np.int32), "dtype int32"),
    (np.full((64, 64, 3), 2.0, np.float32), "outside"),
    (np.zeros((4, 4, 3), np.uint8), "too small"),
])
def test_bad_arrays_are_named(fitted, bad, match):
    with pytest.raises(InputError, match=match):
        fitted.predict([bad])


def test_bad_files_and_folders(tmp_path, fitted):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        fitted.predict([str(broken)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        fitted.predict(str(empty))
    with pytest.raises(InputError, match="no images"):
        fitted.predict([])


def test_bad_configuration():
    with pytest.raises(InputError, match="odd"):
        Detector(**{**FAST, "forward_patches": (4, 3, 3)}).fit(np.zeros((2, 64, 64, 3),
                                                                         np.uint8))
    with pytest.raises(InputError, match="alphas"):
        Detector(**{**FAST, "alphas": 1.5}).fit(np.zeros((2, 64, 64, 3), np.uint8))


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelFileError, match="model.npz"):
        Detector.load(path)
