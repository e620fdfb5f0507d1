"""The fast examples run end to end as a user runs them: subprocess, exit code, printed table.

Each runs on data it makes itself (``--synthetic``), with the small EfficientNet-Lite0 backbone
at 64 pixels, so no shared data is needed. The checks are on what the scripts print: the rows
of their tables, and facts the examples exist to demonstrate (a defect scores above a good
image; ``update`` equals a refit; the held-out new kind passes more often after the update).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--batch-size", "4"]


def run_example(name: str, *args: str, cwd: Path) -> str:
    """Runs ``examples/<name>`` with ``args`` in ``cwd``; returns stdout, fails on exit != 0."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env,
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def table_row(output: str, label: str) -> list[str]:
    """The cells (split on 2+ spaces) of the first printed table row starting with ``label``."""
    for line in output.splitlines():
        if line.startswith(label):
            return re.split(r"\s{2,}", line.strip())
    raise AssertionError(f"no row {label!r} in the output:\n{output}")


def test_quickstart_synthetic(tmp_path):
    out = run_example("quickstart.py", "--synthetic", *FAST, "--out", str(tmp_path / "out"),
                      cwd=tmp_path)
    assert "Test images" in out and "Summary" in out
    scores = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 4 and cells[0].endswith(".png") and cells[1] in ("good", "scratch"):
            scores.setdefault(cells[1], []).append(float(cells[2]))
    assert len(scores.get("good", [])) == 4 and len(scores.get("scratch", [])) == 4
    # A dark scratch across a regular texture is an easy anomaly: every one outscores every
    # good image.
    assert min(scores["scratch"]) > max(scores["good"])
    assert table_row(out, "defective test images flagged")[1] == "4 / 4"
    assert float(table_row(out, "image AUROC")[1]) == 1.0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len([n for n in written if n.endswith("_overlay.png")]) == 8
    assert len([n for n in written if n.endswith("_mask.png")]) == 8


def test_hot_update_synthetic(tmp_path):
    out = run_example("hot_update.py", "--synthetic", *FAST, "--n-fit", "8", "--n-calib", "6",
                      "--n-update", "6", "--n-heldout", "4", "--n-defect", "3", cwd=tmp_path)
    held = table_row(out, "new good, held out")
    flagged_before, flagged_after = (int(held[i].split("/")[0]) for i in (4, 6))
    assert held[1] == "4" and flagged_after < flagged_before
    for group in ("defective, old setting", "defective, new setting"):
        assert table_row(out, group)[6] == "3/3"
    assert table_row(out, "templates identical")[2] == "yes"
    assert "update() versus refit" in out


def test_few_shot_synthetic(tmp_path):
    out = run_example("few_shot.py", "--synthetic", *FAST, "--sizes", "1,3", "--draws", "2",
                      "--plot", str(tmp_path / "few.png"), cwd=tmp_path)
    for n in ("1", "3"):
        row = table_row(out, n + " ")
        assert row[1] == "2"
        auroc, aupro = float(row[2]), float(row[4])
        assert 0.0 <= auroc <= 1.0 and 0.0 <= aupro <= 1.0
    assert (tmp_path / "few.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["quickstart.py", "hot_update.py", "few_shot.py",
                                  "template_selection.py"])
def test_missing_data_fails_clearly(tmp_path, name):
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "no MVTec-layout data set at" in done.stderr and str(tmp_path) in done.stderr
