"""The demo's second scene family: two-colour layouts, where what is masked depends on what the image shows.

On the shapes scenes a small model's masked-patch loss is mostly texture and grain that the class does not explain,
so pre-training for minutes on a CPU cannot show semantic features. Here every image is split into two regions of flat
random colour by one of six layouts (its class), shifted at random along each axis; no grain, so a
contrast-normalised target (HOG) is zero inside the regions and carries only the layout's edges. Filling in a masked
patch therefore needs the layout, which is exactly the label, while colour (what raw pixels are dominated by) is
random. Every layout is its own mirror image, so the horizontal flip of pre-training keeps each class.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LAYOUT_NAMES", "render_layout"]

LAYOUT_NAMES: tuple[str, ...] = ("band_h", "band_v", "centre", "quadrants", "split_h", "split_v")
"""Alphabetical, as ImageFolder numbers classes by sorted folder name."""

_BAND_HALF_WIDTH = 0.4
_SHIFT = 0.2
"""the largest shift of a layout's edges along each axis, in units of half the image"""
_MIN_CONTRAST = 90.0


def _region(name: str, u: np.ndarray, v: np.ndarray, shift_u: float, shift_v: float) -> np.ndarray:
    """The second colour's region, on pixel-centre coordinates in [-1, 1] (``u`` across, ``v`` down), its edges
    moved by (``shift_u``, ``shift_v``)."""
    u, v = u - shift_u, v - shift_v
    if name == "band_h":
        return np.abs(v) < _BAND_HALF_WIDTH
    if name == "band_v":
        return np.abs(u) < _BAND_HALF_WIDTH
    if name == "centre":
        return np.maximum(np.abs(u), np.abs(v)) < 0.5
    if name == "quadrants":
        return u * v < 0
    if name == "split_h":
        return v < 0
    return u < 0


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart that the edge between them is clear."""
    first = rng.uniform(0, 255, 3).astype(np.float32)
    for _ in range(16):
        second = rng.uniform(0, 255, 3).astype(np.float32)
        if np.linalg.norm(second - first) > _MIN_CONTRAST:
            return first, second
    return first, 255 - first


def render_layout(rng: np.random.Generator, label: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 uint8) of layout ``label`` and its mask (HxW uint8: 1 + label on the second region, else 0)."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    v, u = np.meshgrid(centres, centres, indexing="ij")
    shift_u, shift_v = rng.uniform(-_SHIFT, _SHIFT, 2)
    region = _region(LAYOUT_NAMES[label], u, v, float(shift_u), float(shift_v))
    first, second = _colours(rng)
    image = np.where(region[..., None], second, first).astype(np.uint8)
    return np.ascontiguousarray(image), (region * (label + 1)).astype(np.uint8)
