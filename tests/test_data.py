"""Tests of hetmm_jax.data: image and mask formats, folders, the MVTec layout and its errors."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from hetmm_jax import data
from hetmm_jax.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def save(array, path, mode=None, **kwargs):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    image.save(path, **kwargs)
    return path


def rgb(rng, h=6, w=5):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# read_image: formats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".webp"])
def test_lossless_rgb_round_trip(tmp_path, suffix):
    array = rgb(np.random.default_rng(0))
    kwargs = {"lossless": True} if suffix == ".webp" else {}
    path = save(array, tmp_path / f"x{suffix}", **kwargs)
    out = data.read_image(path)
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, array)


def test_grayscale_and_bilevel(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (7, 4), dtype=np.uint8)
    out = data.read_image(save(gray, tmp_path / "g.png"))
    np.testing.assert_array_equal(out, np.stack([gray] * 3, axis=2))

    bits = gray > 128
    out = data.read_image(save(bits, tmp_path / "b.png"))
    np.testing.assert_array_equal(out[..., 1], np.where(bits, 255, 0))


def test_alpha_is_dropped_not_composited(tmp_path):
    array = rgb(np.random.default_rng(2))
    alpha = np.zeros((6, 5), dtype=np.uint8)  # fully transparent: compositing would give black
    rgba = np.concatenate([array, alpha[..., None]], axis=2)
    out = data.read_image(save(rgba, tmp_path / "a.png", mode="RGBA"))
    np.testing.assert_array_equal(out, array)

    la = np.stack([array[..., 0], alpha], axis=2)
    out = data.read_image(save(la, tmp_path / "la.png", mode="LA"))
    np.testing.assert_array_equal(out, np.stack([array[..., 0]] * 3, axis=2))


def test_palette(tmp_path):
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (5, 8), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(data.read_image(tmp_path / "p.png"), palette[indices])


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 30000], [40000, 65534, 65535]], dtype=np.uint16)
    path = save(values, tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I;16")
    out = data.read_image(path)
    expected = np.floor(values / 257.0 + 0.5).astype(np.uint8)  # [[0, 1, 117], [156, 255, 255]]
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out[0, 2, 0] == 117  # clipping would give 255


def png_16_bit_rgb(array: np.ndarray) -> bytes:
    """A minimal 48-bit RGB PNG (Pillow cannot write one), built chunk by chunk."""
    height, width, _ = array.shape
    rows = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16_bit_rgb_is_scaled(tmp_path):
    values = np.array([[[0, 257, 30000], [65535, 40000, 128]]], dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_16_bit_rgb(values))
    out = data.read_image(path)
    assert out.shape == (1, 2, 3)
    # Pillow keeps the high byte of each 16-bit colour sample: within 1 of v / 257.
    assert np.abs(out.astype(float) - values / 257.0).max() <= 1.0
    assert out[0, 0, 2] == 117


def test_32_bit_integer_in_16_bit_range_and_beyond(tmp_path):
    values = np.array([[0, 65535], [514, 1000]], dtype=np.int32)
    path = save(values, tmp_path / "i32.tif")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(data.read_image(path)[..., 2], [[0, 255], [2, 4]])
    too_big = save(values * 2, tmp_path / "big.tif")
    with pytest.raises(DataError, match="big.tif.*16-bit range"):
        data.read_image(too_big)


def test_float_images_are_refused(tmp_path):
    path = save(np.zeros((3, 3), dtype=np.float32), tmp_path / "f.tif")
    with pytest.raises(DataError, match="f.tif.*floating point"):
        data.read_image(path)


def test_cmyk(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 100, 200, 0]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    out = data.read_image(tmp_path / "c.tif")
    # With no black ink, RGB = 255 - CMY.
    np.testing.assert_array_equal(out[0], 255 - cmyk[0, :, :3])


def test_jpeg_matches_the_encoded_image(tmp_path):
    rng = np.random.default_rng(4)
    smooth = np.repeat(np.repeat(rgb(rng, 4, 4), 8, axis=0), 8, axis=1)
    path = save(smooth, tmp_path / "x.JPG", quality=95, subsampling=0)
    out = data.read_image(path)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - smooth).mean() < 4

    gray_path = save(smooth[..., 0], tmp_path / "g.jpeg", quality=95)
    gray = data.read_image(gray_path)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_multi_frame_gives_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((4, 4), v, dtype=np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.tif", save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(data.read_image(tmp_path / "anim.tif"), 10)


def test_exif_orientation_is_ignored_with_a_warning(tmp_path):
    array = rgb(np.random.default_rng(5), 8, 16)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "o.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=95)
    with pytest.warns(data.ExifOrientationWarning):
        out = data.read_image(path)
    assert out.shape == (8, 16, 3)


# --------------------------------------------------------------------------------------------
# read_image: bad files
# --------------------------------------------------------------------------------------------


def jpeg_bytes(rng):
    buffer = io.BytesIO()
    Image.fromarray(rgb(rng, 48, 48)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_jpeg_fails_on_read(tmp_path, keep):
    payload = jpeg_bytes(np.random.default_rng(6))
    path = tmp_path / "cut.jpg"
    path.write_bytes(payload[: int(len(payload) * keep)])
    with pytest.raises(DataError, match="cut.jpg"):
        data.read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(DataError, match="cannot read image .*text.png"):
        data.read_image(tmp_path / "text.png")
    with pytest.raises(DataError, match="empty.jpg.*0 bytes|0 bytes.*empty.jpg"):
        data.read_image(tmp_path / "empty.jpg")
    with pytest.raises(DataError, match="not found.*missing.png"):
        data.read_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match="not a file.*folder.png"):
        data.read_image(tmp_path / "folder.png")
    with pytest.raises(DataError, match="text.png"):
        data.image_size(tmp_path / "text.png")


def test_truncated_flag_set_elsewhere_is_warned(tmp_path, monkeypatch):
    path = save(rgb(np.random.default_rng(7)), tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.warns(RuntimeWarning, match="LOAD_TRUNCATED_IMAGES"):
        data.read_image(path)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def test_read_mask_thresholds_at_half_range(tmp_path):
    values = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(
        data.read_mask(save(values, tmp_path / "m.png")), [[False, False, True, True]]
    )
    values16 = np.array([[0, 32767, 32768, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(
        data.read_mask(save(values16, tmp_path / "m16.png")), [[False, False, True, True]]
    )
    bits = np.array([[True, False]])
    np.testing.assert_array_equal(data.read_mask(save(bits, tmp_path / "m1.png")), bits)
    red = np.zeros((1, 2, 3), dtype=np.uint8)
    red[0, 1, 0] = 255
    np.testing.assert_array_equal(data.read_mask(save(red, tmp_path / "red.png")), [[False, True]])


def test_all_zero_mask_is_valid(tmp_path):
    path = save(np.zeros((3, 4), dtype=np.uint8), tmp_path / "z.png")
    mask = data.read_mask(path, (3, 4))
    assert mask.dtype == np.bool_ and mask.shape == (3, 4) and not mask.any()


def test_mask_size_mismatch_names_both_files(tmp_path):
    path = save(np.zeros((3, 4), dtype=np.uint8), tmp_path / "m_mask.png")
    with pytest.raises(DataError, match=r"m_mask.png is 3 x 4.*img.png is 4 x 3"):
        data.read_mask(path, (4, 3), image_path=tmp_path / "img.png")
    with pytest.raises(DataError, match="mask file is empty"):
        (tmp_path / "e.png").write_bytes(b"")
        data.read_mask(tmp_path / "e.png")


@pytest.mark.parametrize("in_hw", [(7, 5), (16, 16), (3, 11)])
@pytest.mark.parametrize("out_hw", [(4, 4), (14, 10), (21, 9)])
def test_resize_mask_is_nearest_neighbour(in_hw, out_hw):
    rng = np.random.default_rng(sum(in_hw) + sum(out_hw))
    mask = rng.random(in_hw) > 0.5
    out = data.resize_mask(mask, out_hw)
    assert out.dtype == np.bool_ and out.shape == out_hw
    # Reference: each output pixel centre mapped back, computed with plain Python floats.
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            src_i = min(int((i + 0.5) * in_hw[0] / out_hw[0]), in_hw[0] - 1)
            src_j = min(int((j + 0.5) * in_hw[1] / out_hw[1]), in_hw[1] - 1)
            assert out[i, j] == mask[src_i, src_j]
    # Pillow's NEAREST agrees, except where a centre falls exactly on a source pixel edge.
    pil = (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(out_hw[::-1], Image.NEAREST))
        > 127
    )
    tie_rows = (2 * np.arange(out_hw[0]) + 1) * in_hw[0] % (2 * out_hw[0]) == 0
    tie_cols = (2 * np.arange(out_hw[1]) + 1) * in_hw[1] % (2 * out_hw[1]) == 0
    clear = ~tie_rows[:, None] & ~tie_cols[None, :]
    np.testing.assert_array_equal(out[clear], pil[clear])


def test_resize_mask_square_int_size():
    assert data.resize_mask(np.ones((5, 9), dtype=bool), 4).shape == (4, 4)


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def test_list_images_filters_and_sorts(tmp_path):
    rng = np.random.default_rng(8)
    for name in ("b.PNG", "a.jpg", "c.JpEg", "d.bmp", "e.tiff", "f.webp", "g.tif"):
        save(rgb(rng), tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "._a.jpg").write_bytes(b"resource fork")
    (tmp_path / "sub.png").mkdir()
    names = [p.name for p in data.list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.JpEg", "d.bmp", "e.tiff", "f.webp", "g.tif"]


def test_list_images_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*nowhere"):
        data.list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty contains no images"):
        data.list_images(tmp_path / "empty")
    (tmp_path / "textonly").mkdir()
    (tmp_path / "textonly" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        data.list_images(tmp_path / "textonly")


def test_load_folder_and_prefetch_order(tmp_path):
    rng = np.random.default_rng(9)
    arrays = [rgb(rng, 4 + i, 3) for i in range(7)]
    for i, array in enumerate(arrays):
        save(array, tmp_path / f"{i:02d}.png")
    paths, images = data.load_folder(tmp_path)
    assert [p.name for p in paths] == [f"{i:02d}.png" for i in range(7)]
    for image, array in zip(images, arrays):
        np.testing.assert_array_equal(image, array)
    for prefetch in (0, 1, 3, 20):
        again = data.read_images(paths, prefetch=prefetch)
        assert all(np.array_equal(a, b) for a, b in zip(again, arrays))


def test_prefetch_raises_at_the_bad_image(tmp_path):
    rng = np.random.default_rng(10)
    paths = [save(rgb(rng), tmp_path / f"{i}.png") for i in range(3)]
    bad = tmp_path / "3.png"
    bad.write_text("garbage")
    paths += [bad, save(rgb(rng), tmp_path / "4.png")]
    seen = []
    with pytest.raises(DataError, match="3.png"):
        for path, _ in data.iter_images(paths, prefetch=2):
            seen.append(path.name)
    assert seen == ["0.png", "1.png", "2.png"]


# --------------------------------------------------------------------------------------------
# MVTec layout
# --------------------------------------------------------------------------------------------


def make_category(root: Path, masks_as="suffix") -> Path:
    """A tiny MVTec-layout category: 3 train, 2 good test, 2 'scratch', 1 'dent' images."""
    rng = np.random.default_rng(11)
    for i in range(3):
        save(rgb(rng, 8, 6), root / "train" / "good" / f"t{i}.png")
    for i in range(2):
        save(rgb(rng, 8, 6), root / "test" / "good" / f"g{i}.png")
    for defect, count in (("scratch", 2), ("dent", 1)):
        for i in range(count):
            save(rgb(rng, 8, 6), root / "test" / defect / f"{i:03d}.png")
            mask = np.zeros((8, 6), dtype=np.uint8)
            mask[i : i + 2, 1:3] = 255
            name = f"{i:03d}_mask.png" if masks_as == "suffix" else f"{i:03d}.png"
            save(mask, root / "ground_truth" / defect / name)
    return root


def test_load_category(tmp_path):
    root = make_category(tmp_path / "cat")
    category = data.load_category(root)
    assert [p.name for p in category.train] == ["t0.png", "t1.png", "t2.png"]
    assert category.counts() == {"good": 2, "dent": 1, "scratch": 2}
    assert category.defects == ("dent", "scratch")
    assert [s.defect for s in category.test] == ["good", "good", "dent", "scratch", "scratch"]
    np.testing.assert_array_equal(category.labels, [0, 0, 1, 1, 1])
    assert category.defect_types == [s.defect for s in category.test]
    assert category.test[0].mask_path is None
    assert category.test[3].mask_path == root / "ground_truth" / "scratch" / "000_mask.png"
    assert category.has_pixel_labels

    native = data.load_masks(category.test)
    assert [m.shape for m in native] == [(8, 6)] * 5
    assert not native[0].any() and native[3][0:2, 1:3].all() and native[3].sum() == 4
    resized = data.load_masks(category.test, (16, 12))
    assert resized.shape == (5, 16, 12) and resized.dtype == np.bool_
    np.testing.assert_array_equal(resized[4], np.kron(native[4], np.ones((2, 2), dtype=bool)))


def test_masks_named_like_their_images_are_accepted(tmp_path):
    category = data.load_category(make_category(tmp_path / "cat", masks_as="stem"))
    assert category.test[2].mask_path.name == "000.png"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda r: None, "data set folder not found"),
        (lambda r: make_category(r) and _remove(r / "train" / "good"), "no train/good"),
        (lambda r: make_category(r) and _empty(r / "train" / "good"), "good contains no images"),
        (lambda r: make_category(r) and _remove(r / "test"), "no test folder"),
        (lambda r: make_category(r) and _empty(r / "test"), "has no sub-folders"),
        (lambda r: make_category(r) and _empty(r / "test" / "dent"), "dent contains no images"),
        (
            lambda r: make_category(r) and (r / "test" / "scratch" / "001.png").unlink(),
            "scratch/001_mask.png has no image",
        ),
        (
            lambda r: make_category(r) and _remove(r / "test" / "dent"),
            "dent/000_mask.png has no image",
        ),
        (
            lambda r: make_category(r) and (r / "ground_truth" / "dent" / "000_mask.png").unlink(),
            "defective image .*dent/000.png has no mask",
        ),
        (
            lambda r: (
                make_category(r)
                and save(np.zeros((8, 6), np.uint8), r / "ground_truth" / "dent" / "000.png")
            ),
            "has two masks",
        ),
    ],
)
def test_layout_errors(tmp_path, breakage, message):
    root = tmp_path / "cat"
    breakage(root)
    with pytest.raises(DataError, match=message):
        data.load_category(root)


def _remove(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


def _empty(path: Path) -> None:
    _remove(path)
    path.mkdir()


def test_allow_missing_masks(tmp_path):
    root = make_category(tmp_path / "cat")
    (root / "ground_truth" / "dent" / "000_mask.png").unlink()
    category = data.load_category(root, allow_missing_masks=True)
    dent = [s for s in category.test if s.defect == "dent"][0]
    assert dent.label == 1 and dent.mask_path is None and not dent.has_pixel_labels
    assert not category.has_pixel_labels
    assert dent not in category.with_pixel_labels() and len(category.with_pixel_labels()) == 4
    with pytest.raises(DataError, match="000.png has no mask"):
        data.load_masks(category.test, 8)
    assert data.load_masks(category.with_pixel_labels(), 8).shape == (4, 8, 8)


def test_mask_size_mismatch_found_when_loading(tmp_path):
    root = make_category(tmp_path / "cat")
    save(np.zeros((5, 6), np.uint8), root / "ground_truth" / "scratch" / "001_mask.png")
    category = data.load_category(root)  # indexing reads no pixels
    with pytest.raises(DataError, match=r"001_mask.png is 5 x 6.*scratch/001.png is 8 x 6"):
        data.load_masks(category.test, 8)


def test_corrupt_image_in_category_found_when_reading(tmp_path):
    root = make_category(tmp_path / "cat")
    (root / "train" / "good" / "t1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    category = data.load_category(root)
    with pytest.raises(DataError, match="t1.png"):
        data.read_images(category.train)


# --------------------------------------------------------------------------------------------
# Real data sets (../shared/data)
# --------------------------------------------------------------------------------------------

# Counts from shared/data/README.md.
REAL_SETS = {
    "mtd/magnetic_tile": (
        762,
        {"good": 190, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103},
    ),
    "cookies/cookie": (31, {"good": 14, "crack": 32}),
}


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_real_data_sets(name):
    root = SHARED_DATA / name
    if not root.is_dir():
        pytest.skip(f"real data set not found at {root}")
    n_train, counts = REAL_SETS[name]
    category = data.load_category(root)
    assert len(category.train) == n_train
    assert category.counts() == counts
    assert category.has_pixel_labels
    masks = data.load_masks(category.test)  # checks every mask's size against its image
    empty_defective = sum(1 for s, m in zip(category.test, masks) if s.label == 1 and not m.any())
    assert empty_defective == (4 if name.startswith("mtd") else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = data.read_image(category.test[-1].path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    if name.startswith("mtd"):
        np.testing.assert_array_equal(image[..., 0], image[..., 1])  # greyscale source
