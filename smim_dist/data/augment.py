"""Pre-training augmentation of one sample, driven entirely by a numpy generator seeded from (seed, epoch, index).

The crop, flip, colour jitter and the patch mask of a sample are therefore reproducible wherever and whenever it is
loaded, which is what exact resume relies on. Output stays uint8: normalisation happens on the device, after the
(4x smaller) transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from smim_dist.config import Config
from smim_dist.masking import build_mask_generator, sample_rng
from smim_dist.models.encoder import image_grid
from smim_dist.models.mask_index import MaskIndices


def sample_crop(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of an Inception-style random resized crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class PretrainSample:
    image: Tensor
    """uint8 [3, H, W] crop the model sees"""
    tokenizer_view: Tensor | None
    """uint8 [3, H/2, W/2] view of the same crop for the DALL-E tokenizer (BEiT target only)"""
    mask: np.ndarray
    """bool [num_patches], True = masked"""
    corrupt_skipped: int = 0
    """undecodable files passed over to produce this sample"""


class PretrainTransform:
    def __init__(self, cfg: Config):
        self.size = cfg.model.img_size
        self.data = cfg.data
        self.seed = cfg.seed
        self.tokenizer_view = cfg.target.kind == "beit"
        self.masks = build_mask_generator(cfg.mask.kind, image_grid(cfg.model.img_size, cfg.model.patch_size),
                                          cfg.mask.ratio)

    def __call__(self, image: Tensor, epoch: int, index: int) -> PretrainSample:
        rng = sample_rng(self.seed, epoch, index)
        top, left, h, w = sample_crop(rng, image.shape[-2], image.shape[-1], self.data.crop_scale, self.data.crop_ratio)
        crop = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        if rng.uniform() < self.data.hflip:
            crop = TF.horizontal_flip(crop)
        if self.data.color_jitter > 0:
            low, high = max(0.0, 1 - self.data.color_jitter), 1 + self.data.color_jitter
            crop = TF.adjust_brightness(crop, float(rng.uniform(low, high)))
            crop = TF.adjust_contrast(crop, float(rng.uniform(low, high)))
            crop = TF.adjust_saturation(crop, float(rng.uniform(low, high)))
        view = TF.resize(crop, [self.size // 2, self.size // 2], antialias=True) if self.tokenizer_view else None
        return PretrainSample(crop, view, self.masks(rng))


def stack_samples(samples: list[PretrainSample]) -> dict[str, Tensor]:
    """Collate in the worker: uint8 images, optional tokenizer views, and the masks already split into indices."""
    mask = MaskIndices.from_bool(np.stack([s.mask for s in samples]))
    batch = {"images": torch.stack([s.image for s in samples]), "visible": mask.visible, "masked": mask.masked,
             "corrupt_skipped": torch.tensor(sum(s.corrupt_skipped for s in samples))}
    if samples[0].tokenizer_view is not None:
        batch["tokenizer_views"] = torch.stack([s.tokenizer_view for s in samples])
    return batch
