"""Shared fixtures: small synthetic images and the location of the real data sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or a skip when this checkout has no such data."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (it ships beside the project in CI only)")
    return path


def textured(rng: np.random.Generator, size: int = 64, defect: bool = False) -> np.ndarray:
    """A uint8 (size, size, 3) image of noisy diagonal stripes; ``defect`` adds a bright blob.

    Good images differ by the stripes' phase and the noise, so they are alike but not equal.
    """
    yy, xx = np.mgrid[:size, :size]
    phase = rng.uniform(0, 2 * np.pi)
    base = 0.5 + 0.35 * np.sin((xx + yy) * 0.5 + phase)
    image = base[..., None] * np.array([0.9, 0.7, 0.5]) + rng.normal(0, 0.03, (size, size, 3))
    if defect:
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        r = size // 8
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[blob] = [0.1, 0.9, 0.95]
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
