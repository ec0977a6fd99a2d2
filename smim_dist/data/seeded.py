"""Every random choice of pre-training augmentation, as a pure function of (seed, epoch, sample index).

A counter-based generator (SplitMix64's mixer over a per-sample key and a draw counter) replaces stateful RNGs, so
the crop, flip, colour jitter and patch mask of a sample come out the same in FFCV's compiled pipeline, in a torch
DataLoader worker and in a test, on any rank and after any restart. The functions are numba-compiled (nopython, no
GIL) because FFCV's decoder calls them per sample inside its parallel loop; Python callers use the same functions.
Each consumer draws from its own counter range, so adding draws to one never shifts another.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53

CROP_DRAWS = 0
"""counters 0..39: up to ten crop attempts of four draws each"""
FLIP_DRAW = 40
JITTER_DRAWS = 41
"""counters 41..43: brightness, contrast, saturation"""
MASK_SALT = np.uint64(0x6D61736B)
"""masks draw from a key of their own: their number of draws is not fixed"""


@njit(cache=True, nogil=True)
def mix(x: np.uint64) -> np.uint64:
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True)
def sample_key(seed: int, epoch: int, index: int) -> np.uint64:
    key = mix(np.uint64(seed) + _GOLDEN)
    key = mix(key ^ (np.uint64(epoch) + _GOLDEN))
    return mix(key ^ (np.uint64(index) + _GOLDEN))


@njit(cache=True, nogil=True)
def uniform(key: np.uint64, counter: int) -> float:
    """Draw number ``counter`` of ``key``, uniform in [0, 1)."""
    return np.float64(mix(key + np.uint64(counter + 1) * _GOLDEN) >> np.uint64(11)) * _TO_UNIT


@njit(cache=True, nogil=True)
def crop_box(key: np.uint64, height: int, width: int, scale_lo: float, scale_hi: float, ratio_lo: float,
             ratio_hi: float) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of an Inception-style random resized crop, as torchvision's
    ``RandomResizedCrop.get_params`` draws it: ten tries at a random area and log-uniform aspect, then a centre crop
    clamped to the ratio range."""
    area = height * width
    log_lo, log_hi = math.log(ratio_lo), math.log(ratio_hi)
    for attempt in range(10):
        draw = CROP_DRAWS + 4 * attempt
        target_area = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, draw))
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform(key, draw + 1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, draw + 2) * (height - h + 1))
            left = int(uniform(key, draw + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio_lo:
        w, h = width, int(round(width / ratio_lo))
    elif in_ratio > ratio_hi:
        h, w = height, int(round(height * ratio_hi))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True, nogil=True)
def flips(key: np.uint64, probability: float) -> bool:
    return uniform(key, FLIP_DRAW) < probability


@njit(cache=True, nogil=True)
def jitter_factors(key: np.uint64, strength: float) -> tuple[float, float, float]:
    """Brightness, contrast and saturation factors, each uniform in [max(0, 1 - strength), 1 + strength]."""
    low = max(0.0, 1.0 - strength)
    span = 1.0 + strength - low
    return (low + span * uniform(key, JITTER_DRAWS), low + span * uniform(key, JITTER_DRAWS + 1),
            low + span * uniform(key, JITTER_DRAWS + 2))


@njit(cache=True, nogil=True)
def _mask_random_unmasked(key: np.uint64, counter: int, mask: np.ndarray, count: int) -> int:
    """Set ``count`` uniformly chosen unmasked entries of the flat ``mask`` (partial Fisher-Yates); returns the next
    free counter."""
    free = np.flatnonzero(~mask)
    for i in range(count):
        j = i + int(uniform(key, counter) * (free.size - i))
        counter += 1
        free[i], free[j] = free[j], free[i]
        mask[free[i]] = True
    return counter


@njit(cache=True, nogil=True)
def random_mask(key: np.uint64, num_patches: int, num_masked: int) -> np.ndarray:
    mask = np.zeros(num_patches, dtype=np.bool_)
    _mask_random_unmasked(mix(key ^ MASK_SALT), 0, mask, num_masked)
    return mask


@njit(cache=True, nogil=True)
def place_blocks(key: np.uint64, rows: int, cols: int, num_masked: int, min_block: int, max_block: int,
                 log_aspect_lo: float, log_aspect_hi: float, max_failures: int) -> tuple[np.ndarray, int, int]:
    """BEiT's block phase: the 2-D mask, how many patches it fell short of ``num_masked``, and the next counter."""
    mask = np.zeros((rows, cols), dtype=np.bool_)
    remaining, failures, counter = num_masked, 0, 0
    while remaining > 0 and failures < max_failures:
        u_area, u_aspect = uniform(key, counter), uniform(key, counter + 1)
        u_top, u_left = uniform(key, counter + 2), uniform(key, counter + 3)
        counter += 4
        hi = max(min_block, min(max_block, remaining))  # below min_block left, blocks must overlap the mask
        area = min_block + u_area * (hi - min_block)
        aspect = math.exp(log_aspect_lo + u_aspect * (log_aspect_hi - log_aspect_lo))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if h * w >= min_block and h <= rows and w <= cols:
            top = int(u_top * (rows - h + 1))
            left = int(u_left * (cols - w + 1))
            new = h * w - int(np.count_nonzero(mask[top:top + h, left:left + w]))
            if 0 < new <= remaining:
                mask[top:top + h, left:left + w] = True
                remaining -= new
                failures = 0
                continue
        failures += 1
    return mask, remaining, counter


@njit(cache=True, nogil=True)
def block_mask(key: np.uint64, rows: int, cols: int, num_masked: int, min_block: int, max_block: int,
               log_aspect_lo: float, log_aspect_hi: float, max_failures: int) -> np.ndarray:
    mask_key = mix(key ^ MASK_SALT)
    grid, missing, counter = place_blocks(mask_key, rows, cols, num_masked, min_block, max_block, log_aspect_lo,
                                          log_aspect_hi, max_failures)
    mask = grid.ravel()
    _mask_random_unmasked(mask_key, counter, mask, missing)
    return mask


@njit(cache=True, nogil=True)
def split_mask(mask: np.ndarray, out: np.ndarray) -> None:
    """Write the visible patch indices, then the masked ones, each ascending, into ``out``: the layout
    ``MaskIndices`` takes apart without a sort."""
    num_visible = mask.size - np.count_nonzero(mask)
    visible, masked = 0, num_visible
    for patch in range(mask.size):
        if mask[patch]:
            out[masked] = patch
            masked += 1
        else:
            out[visible] = patch
            visible += 1
