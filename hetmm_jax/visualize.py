"""Heat-map overlays, masks and report figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from hetmm_jax import model_io  # noqa: E402


def overlay(image: np.ndarray, heat: np.ndarray, *, vmin: float, vmax: float,
            mask: np.ndarray | None = None, opacity: float = 0.5) -> np.ndarray:
    """Blends a heat map over an image.

    Args:
      image: uint8 (H, W, 3).
      heat: float (H, W) anomaly map at the image's resolution.
      vmin, vmax: map values drawn as the coldest and hottest colours, so that overlays of
        several images share one scale.
      mask: optional bool (H, W) predicted or true defect region, drawn as a white outline.
      opacity: weight of the heat colours, 0-1.

    Returns:
      uint8 (H, W, 3).
    """
    scaled = np.clip((np.asarray(heat, np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colours = plt.get_cmap("jet")(scaled)[..., :3] * 255.0
    blended = (1 - opacity) * image.astype(np.float32) + opacity * colours
    if mask is not None:
        blended[_outline(mask)] = 255.0
    return np.clip(blended, 0, 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, bool)
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Writes a uint8 (H, W[, 3]) array as PNG, atomically."""
    image = Image.fromarray(np.asarray(array))
    return model_io.atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def save_mask(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Writes a bool (H, W) mask as a 0 / 255 PNG."""
    return save_png(path, np.asarray(mask, np.uint8) * 255)


def plot_curves(path: str | os.PathLike, curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
                *, xlabel: str, ylabel: str, title: str, xmax: float | None = None,
                diagonal: bool = False) -> Path:
    """Line plot of (label, x, y) curves to a PNG file."""
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for label, x, y in curves:
        ax.plot(x, y, label=label)
    if diagonal:
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    if xmax is not None:
        ax.set_xlim(0, xmax)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        return model_io.atomic_write(path, lambda handle: fig.savefig(handle, format="png"))
    finally:
        plt.close(fig)


def grid(path: str | os.PathLike, tiles: Sequence[tuple[str, np.ndarray]], *,
         columns: int = 4, tile: int = 192) -> Path:
    """A grid of captioned uint8 (H, W, 3) images, each fitted into a ``tile`` square."""
    rows = max(1, -(-len(tiles) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * tile / 80, rows * tile / 72),
                             dpi=80, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (caption, image) in zip(axes.flat, tiles):
        ax.imshow(image)
        ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    try:
        return model_io.atomic_write(path, lambda handle: fig.savefig(handle, format="png"))
    finally:
        plt.close(fig)
