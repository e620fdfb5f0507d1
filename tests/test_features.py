"""Feature extractor: shapes, batching, resizing, normalisation, dtype and gradients."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hetmm_jax import backbones
from hetmm_jax.errors import InputError
from hetmm_jax.features import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, preprocess

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ARCH = "resnet18"


@pytest.fixture(scope="module")
def variables():
    return backbones.init_variables(ARCH, seed=3)


def _images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _reference(variables, uint8_images, mean=IMAGENET_MEAN, std=IMAGENET_STD, layers=None):
    """Independent path: NumPy normalisation, then the plain (unjitted) backbone."""
    x = (uint8_images.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    model = backbones.build(ARCH, outputs=layers or ("layer1", "layer2", "layer3"))
    return model.apply(variables, x.astype(np.float32))


def _close(a, b, rel=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * np.abs(b).max() + 1e-6


@pytest.mark.parametrize("size", [64, 96, 100])
def test_shapes_follow_strides(variables, size):
    layers = ("layer1", "layer2", "layer3", "layer4")
    extractor = FeatureExtractor(ARCH, layers=layers, image_size=size, variables=variables)
    out = extractor(_images(2, size, size))

    assert list(out) == list(layers)
    for name in layers:
        side = int(np.ceil(size / backbones.STRIDES[name]))
        expected = (2, side, side, backbones.feature_channels(ARCH)[name])
        assert out[name].shape == expected
        assert extractor.output_shapes[name] == expected[1:]
        assert out[name].dtype == jnp.float32


def test_lite_shapes_and_channels():
    arch = "efficientnet_lite2"
    extractor = FeatureExtractor(arch, layers=("layer1", "layer3"), image_size=72,
                                 variables=backbones.init_variables(arch))
    out = extractor(_images(1, 72, 72))
    assert out["layer1"].shape == (1, 18, 18, 24)
    assert out["layer3"].shape == (1, 5, 5, 120)


def test_matches_independent_normalisation(variables):
    images = _images(3, 64, 64, seed=1)
    extractor = FeatureExtractor(ARCH, image_size=64, variables=variables)
    ours = extractor(images)
    ref = _reference(variables, images)
    for name in extractor.layers:
        _close(ours[name], ref[name])


def test_custom_and_default_normalisation(variables):
    images = _images(1, 64, 64, seed=2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    extractor = FeatureExtractor(ARCH, image_size=64, variables=variables, mean=mean, std=std)
    _close(extractor(images)["layer2"], _reference(variables, images, mean, std)["layer2"])

    assert FeatureExtractor(ARCH, variables=variables).mean == IMAGENET_MEAN
    lite = FeatureExtractor("efficientnet_lite0", variables={}, image_size=64)
    np.testing.assert_allclose(lite.mean, [127 / 255] * 3)
    np.testing.assert_allclose(lite.std, [128 / 255] * 3)


def test_extract_batches_match_one_by_one(variables):
    images = _images(5, 64, 64, seed=4)
    extractor = FeatureExtractor(ARCH, image_size=64, variables=variables)

    batched = extractor.extract(images, batch_size=2, progress=True)
    from_list = extractor.extract(list(images), batch_size=4, progress=False)
    single = [extractor(images[i:i + 1]) for i in range(len(images))]

    for name in extractor.layers:
        assert isinstance(batched[name], np.ndarray) and batched[name].shape[0] == 5
        expected = np.concatenate([np.asarray(s[name]) for s in single])
        _close(batched[name], expected)
        _close(from_list[name], expected)


def test_list_of_sizes_is_resized_with_antialiased_bilinear(variables):
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=hw + (3,), dtype=np.uint8)
              for hw in [(120, 90), (64, 64), (33, 200)]]
    images.append(rng.integers(0, 256, size=(80, 70), dtype=np.uint8))
    extractor = FeatureExtractor(ARCH, image_size=64, variables=variables)

    out = extractor(images)

    def pil_resize(image):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        return np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BILINEAR))

    ref = _reference(variables, np.stack([pil_resize(im) for im in images]))
    for name in extractor.layers:
        _close(out[name], ref[name])


def test_bfloat16_option(variables):
    images = _images(2, 64, 64, seed=6)
    f32 = FeatureExtractor(ARCH, image_size=64, variables=variables)(images)
    bf16 = FeatureExtractor(ARCH, image_size=64, variables=variables, dtype=jnp.bfloat16)
    out = bf16.extract(images, batch_size=2, progress=False)
    for name in f32:
        assert out[name].dtype == jnp.bfloat16
        _close(out[name].astype(np.float32), f32[name], rel=5e-2)


def test_gradient_flows_to_the_image(variables):
    extractor = FeatureExtractor(ARCH, image_size=32, variables=variables)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.uniform(0.2, 0.8, size=(1, 32, 32, 3)), jnp.float32)
    direction = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(1, 4, 4, 128)), jnp.float32)

    def loss(images):
        return jnp.sum(extractor.features_fn(variables, images)["layer2"] * weights) / 100

    grad = jax.jit(jax.grad(loss))(x)
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad).max()) > 0

    # The network is piecewise linear (ReLU, max pool): a small step crosses few kinks.
    step = 1e-3
    loss_jit = jax.jit(loss)
    numeric = (loss_jit(x + step * direction) - loss_jit(x - step * direction)) / (2 * step)
    analytic = float(jnp.vdot(grad, direction))
    assert abs(float(numeric) - analytic) <= 0.1 * abs(analytic)

    # Chain rule through the normalisation: d/dx = (d/d normalised) / std, per channel.
    model = backbones.build(ARCH, outputs=("layer2",))
    inner = jax.jit(
        jax.grad(lambda z: jnp.sum(model.apply(variables, z)["layer2"] * weights) / 100)
    )
    normalised = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    _close(grad, inner(normalised) / jnp.asarray(IMAGENET_STD), rel=1e-4)


def test_preprocess_is_per_channel():
    x = jnp.ones((1, 2, 2, 3)) * 0.5
    out = preprocess(x)
    expected = (0.5 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)


def test_rejects_bad_inputs(variables):
    with pytest.raises(InputError, match="layer9"):
        FeatureExtractor(ARCH, layers=("layer9",), variables=variables)
    with pytest.raises(InputError, match="float64"):
        FeatureExtractor(ARCH, variables=variables, dtype=np.float64)
    extractor = FeatureExtractor(ARCH, image_size=64, variables=variables)
    with pytest.raises(InputError, match="float32"):
        extractor(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(InputError, match="shape"):
        extractor([np.zeros((64, 64, 4), np.uint8)])
    with pytest.raises(InputError, match="no images"):
        extractor.extract([], progress=False)
    with pytest.raises(InputError, match="no images"):
        extractor(np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(InputError, match="batch_size"):
        extractor.extract(_images(1, 64, 64), batch_size=0)


def test_extract_from_paths_of_real_images(variables):
    folder = DATA / "mtd" / "magnetic_tile" / "train" / "good"
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder}")
    paths = sorted(folder.glob("*.jpg"))[:3]
    extractor = FeatureExtractor(ARCH, image_size=64, variables=variables)

    from_paths = extractor.extract(paths, batch_size=2, progress=False)

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    assert len({a.shape for a in arrays}) > 1 or arrays[0].shape[:2] != (64, 64)
    from_arrays = extractor(arrays)
    for name in extractor.layers:
        _close(from_paths[name], from_arrays[name])
