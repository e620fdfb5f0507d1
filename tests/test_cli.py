"""The ``hetmm`` command line on a small synthetic data set in the MVTec AD layout."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import textured
from hetmm_jax.cli import main

FAST = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--forward-patches", "3,3,3",
        "--backward-patches", "1,1,1", "--sigma", "1", "-q"]


def _blob_mask(image_good: np.ndarray, image_bad: np.ndarray) -> np.ndarray:
    return (np.abs(image_bad.astype(int) - image_good.astype(int)).sum(-1) > 200)


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    """category/train/good (6), test/good (3), test/blob (3) with masks."""
    root = tmp_path_factory.mktemp("data") / "widget"
    rng = np.random.default_rng(5)
    for folder in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / folder).mkdir(parents=True)
    for i in range(6):
        Image.fromarray(textured(rng)).save(root / "train/good" / f"{i:03d}.png")
    for i in range(3):
        Image.fromarray(textured(rng)).save(root / "test/good" / f"{i:03d}.png")
    for i in range(3):
        state = rng.bit_generator.state
        good = textured(rng)
        rng.bit_generator.state = state
        bad = textured(rng, defect=True)
        Image.fromarray(bad).save(root / "test/blob" / f"{i:03d}.png")
        mask = _blob_mask(good, bad)
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            root / "ground_truth/blob" / f"{i:03d}_mask.png")
    return root


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "hetmm_jax.cli", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("fit", "predict", "update", "compress", "evaluate", "demo", "weights"):
        assert command in result.stdout


def test_evaluate_writes_metrics_and_report(category, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(category), "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "per_defect", "fit_seconds",
                "images_per_second", "n_templates", "config"):
        assert key in metrics, key
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["image_auroc"] == 1.0  # the blobs are obvious
    assert metrics["n_templates"] == 6 and metrics["per_defect"]["blob"]["n"] == 3
    assert metrics["config"]["backbone"] == "efficientnet_lite0"
    for name in ("report.md", "roc.png", "pro.png", "examples.png"):
        assert (out / name).stat().st_size > 0, name
    assert "image AUROC" in capsys.readouterr().out


def test_fit_predict_update_compress_calibrate(category, tmp_path, capsys):
    model = tmp_path / "model.npz"
    assert main(["fit", str(category), "--out", str(model), *FAST]) == 0
    out = tmp_path / "pred"
    test_images = [str(category / "test/good"), str(category / "test/blob")]
    assert main(["predict", str(model), *test_images, "--out", str(out), "-q"]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 6 and all(row["label"] == "" for row in rows)
    assert len(list((out / "overlays").glob("*.png"))) == 6

    assert main(["calibrate", str(model), "--good", str(category / "test/good"),
                 "--defective", str(category / "test/blob"), "-q"]) == 0
    assert main(["predict", str(model), *test_images, "--out", str(out), "-q"]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [row["label"] for row in rows] == ["0"] * 3 + ["1"] * 3
    assert len(list((out / "masks").glob("*.png"))) == 6

    assert main(["update", str(model), str(category / "test/good"), "-q"]) == 0
    assert "6 -> 9 templates" in capsys.readouterr().out
    assert main(["compress", str(model), "-k", "4", "--strategy", "random", "-q"]) == 0
    assert "9 -> 4 templates" in capsys.readouterr().out


def test_errors_are_one_line_and_name_the_file(category, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.npz"), str(category), "--out",
                 str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "missing.npz" in err and len(err.splitlines()) == 1

    model = tmp_path / "model.npz"
    assert main(["fit", str(category), "--out", str(model), *FAST]) == 0
    assert main(["compress", str(model), "-k", "50", "-q"]) == 1
    assert "larger than the 6 templates" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", str(empty), "--out", str(tmp_path / "e"), *FAST]) == 1
    assert "train" in capsys.readouterr().err
    # Nothing already done is lost: the model is still readable after the failed calls.
    assert main(["predict", str(model), str(category / "test/good"), "--out",
                 str(tmp_path / "p"), "-q"]) == 0
