"""Patch-mask generators for masked image modeling (BEiT, MaskFeat, SemanticMIM).

A mask is a 1-D bool array over the patch grid in row-major order, True =
masked. Every generator masks exactly ``num_masked`` patches, so a batch of
masks is rectangular and the model can gather the visible tokens by index.

The generators validate the configuration and hold no state between calls;
the sampling itself is numba code in ``smim_dist.data.seeded``, driven by a
per-sample key from (seed, epoch, sample index), so a sample's mask does not
depend on how samples are spread over workers or ranks, and FFCV's compiled
pipeline draws exactly the masks a torch DataLoader worker would
(``draw_function`` hands it the compiled sampler).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numba import njit

from smim_dist.config_checks import MIN_BLOCK_PATCHES, masked_patch_count
from smim_dist.data.seeded import block_mask, place_blocks, random_mask, sample_key

__all__ = [
    "BlockMaskGenerator",
    "RandomMaskGenerator",
    "build_mask_generator",
]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_grid(grid) -> tuple[int, int]:
    try:
        rows, cols = grid
    except (TypeError, ValueError):
        rows = cols = None
    if not (_is_int(rows) and _is_int(cols) and rows > 0 and cols > 0):
        raise ValueError(
            f"grid={grid!r} must be two positive ints (patch rows, patch columns)"
        )
    return int(rows), int(cols)


def _check_num_masked(num_masked, grid: tuple[int, int]) -> int:
    rows, cols = grid
    n = rows * cols
    if not _is_int(num_masked) or not 1 <= num_masked <= n - 1:
        raise ValueError(
            f"num_masked={num_masked!r} for a {rows}x{cols} grid ({n} patches) must be "
            f"an int in [1, {n - 1}]: the model needs at least one masked patch to "
            "predict and the encoder at least one visible patch"
        )
    return int(num_masked)


def _num_masked_from_ratio(mask_ratio, grid: tuple[int, int]) -> int:
    rows, cols = grid
    n = rows * cols
    valid = f"use a ratio in [{1 / n:.4g}, {(n - 1) / n:.4g}]"
    if not isinstance(mask_ratio, numbers.Real) or not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio={mask_ratio!r} is not a fraction in [0, 1]; {valid}")
    num_masked = masked_patch_count(mask_ratio, n)
    if num_masked == 0:
        raise ValueError(
            f"mask_ratio={mask_ratio!r} masks none of the {n} patches of a {rows}x{cols} "
            f"grid; the model needs at least one masked patch to predict: {valid}"
        )
    if num_masked == n:
        raise ValueError(
            f"mask_ratio={mask_ratio!r} masks all {n} patches of a {rows}x{cols} grid; "
            f"the encoder needs at least one visible patch: {valid}"
        )
    return num_masked


class _MaskGenerator:
    """Shared validation and seeding; subclasses define ``__call__(key)`` and ``draw_function()``."""

    def __init__(self, grid: tuple[int, int], num_masked: int):
        self.grid = _check_grid(grid)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = _check_num_masked(num_masked, self.grid)

    def mask_for(self, seed: int, epoch: int, index: int) -> np.ndarray:
        """Mask of sample ``index`` in ``epoch``, reproducible on any worker."""
        return self(sample_key(seed, epoch, index))


class RandomMaskGenerator(_MaskGenerator):
    """Uniformly random patches (MAE / SimMIM style)."""

    def __call__(self, key: np.uint64) -> np.ndarray:
        return random_mask(np.uint64(key), self.num_patches, self.num_masked)

    def draw_function(self):
        """The sampler as a compiled ``key -> mask`` function, for calls from numba code."""
        num_patches, num_masked = self.num_patches, self.num_masked
        return njit(nogil=True)(lambda key: random_mask(key, num_patches, num_masked))

    def __repr__(self) -> str:
        return (
            f"RandomMaskGenerator(grid={self.grid}, num_masked={self.num_masked}"
            f" of {self.num_patches})"
        )


class BlockMaskGenerator(_MaskGenerator):
    """BEiT's block-wise masking: rectangles of patches, so that masked content
    cannot be recovered by interpolating from immediate neighbours.

    Blocks are placed as in BEiT's ``MaskingGenerator``: area uniform in
    [min_block_patches, min(max_block_patches, still to mask)], aspect ratio
    log-uniform in [min_aspect, max_aspect], uniform position; a block is kept
    only if it masks between 1 and the still-to-mask number of new patches.
    Every kept block spans at least ``min_block_patches`` patches (blocks that
    round below that are rejected). Placement stops after
    ``max_failed_attempts`` consecutive rejected blocks.

    Deviation from BEiT: BEiT then returns whatever it reached, which can fall
    short of the target. Here the shortfall is topped up with uniformly random
    unmasked patches so that every mask has exactly ``num_masked`` patches and
    batches stay rectangular. This touches only a few patches per mask (the
    last block rarely fits the small remainder exactly).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        num_masked: int,
        min_block_patches: int = MIN_BLOCK_PATCHES,
        max_block_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_failed_attempts: int = 100,
    ):
        super().__init__(grid, num_masked)
        if not _is_int(min_block_patches) or not 1 <= min_block_patches <= self.num_masked:
            raise ValueError(
                f"min_block_patches={min_block_patches!r} must be an int in "
                f"[1, num_masked={self.num_masked}]"
            )
        if max_block_patches is None:
            max_block_patches = self.num_masked
        if not _is_int(max_block_patches) or max_block_patches < min_block_patches:
            raise ValueError(
                f"max_block_patches={max_block_patches!r} must be an int >= "
                f"min_block_patches={min_block_patches}"
            )
        if max_aspect is None and min_aspect > 0:
            max_aspect = 1.0 / min_aspect
        if not (min_aspect > 0 and max_aspect is not None and min_aspect <= max_aspect):
            raise ValueError(
                f"aspect range [min_aspect={min_aspect!r}, max_aspect={max_aspect!r}] "
                "must satisfy 0 < min_aspect <= max_aspect"
            )
        if not _is_int(max_failed_attempts) or max_failed_attempts < 1:
            raise ValueError(
                f"max_failed_attempts={max_failed_attempts!r} must be an int >= 1"
            )
        self.min_block_patches = int(min_block_patches)
        self.max_block_patches = int(max_block_patches)
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self.max_failed_attempts = int(max_failed_attempts)

    def __call__(self, key: np.uint64) -> np.ndarray:
        return block_mask(np.uint64(key), *self._arguments())

    def draw_function(self):
        """The sampler as a compiled ``key -> mask`` function, for calls from numba code."""
        arguments = self._arguments()
        return njit(nogil=True)(lambda key: block_mask(key, *arguments))

    def place_blocks(self, key: np.uint64) -> tuple[np.ndarray, int]:
        """Block phase only; returns the 2-D mask and how many patches it fell short."""
        mask, missing, _ = place_blocks(np.uint64(key), *self._arguments())
        return mask, missing

    def _arguments(self) -> tuple:
        return (*self.grid, self.num_masked, self.min_block_patches, self.max_block_patches,
                math.log(self.min_aspect), math.log(self.max_aspect), self.max_failed_attempts)

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator(grid={self.grid}, num_masked={self.num_masked}"
            f" of {self.num_patches}, block_patches=[{self.min_block_patches}, "
            f"{self.max_block_patches}], aspect=[{self.min_aspect:.4g}, "
            f"{self.max_aspect:.4g}], max_failed_attempts={self.max_failed_attempts})"
        )


_KINDS = {"random": RandomMaskGenerator, "block": BlockMaskGenerator}


def build_mask_generator(
    kind: str, grid: tuple[int, int], mask_ratio: float, **options
) -> RandomMaskGenerator | BlockMaskGenerator:
    """Build a generator from config values; ``num_masked = ceil(mask_ratio * patches)``, as the authors count.

    ``options`` go to the generator's constructor (e.g. ``min_block_patches``
    for "block"). BEiT's 75 of 196 patches is ``mask_ratio=0.38`` on 14x14.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {sorted(_KINDS)}")
    grid = _check_grid(grid)
    return _KINDS[kind](grid, _num_masked_from_ratio(mask_ratio, grid), **options)
