"""Pre-training augmentation of one decoded image in a torch DataLoader worker (image files, webdataset shards).

Its random choices come from ``smim_dist.data.seeded``, keyed by (seed, epoch, index): the same crop box, flip,
jitter factors and mask that FFCV's compiled pipeline draws for that sample. Output stays uint8: normalisation, and
the tokenizer's half-size view, happen on the device after the (4x smaller) transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from smim_dist.config import Config
from smim_dist.data.seeded import crop_box, flips, jitter_factors, sample_key
from smim_dist.data.masking import build_mask_generator
from smim_dist.models.mask_index import MaskIndices
from smim_dist.vit_sizes import image_grid


@dataclass
class PretrainSample:
    image: Tensor
    """uint8 [3, H, W] crop the model sees"""
    mask: np.ndarray
    """bool [num_patches], True = masked"""
    index: int
    """the index that keyed the augmentation"""
    corrupt_skipped: int = 0
    """undecodable files passed over to produce this sample"""


class PretrainTransform:
    def __init__(self, cfg: Config):
        self.size = cfg.model.img_size
        self.data = cfg.data
        self.seed = cfg.seed
        self.masks = build_mask_generator(cfg.mask.kind, image_grid(cfg.model.img_size, cfg.model.patch_size),
                                          cfg.mask.ratio)

    def __call__(self, image: Tensor, epoch: int, index: int) -> PretrainSample:
        key = np.uint64(sample_key(self.seed, epoch, index))
        top, left, h, w = crop_box(key, image.shape[-2], image.shape[-1], *self.data.crop_scale, *self.data.crop_ratio)
        crop = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        if flips(key, self.data.hflip):
            crop = TF.horizontal_flip(crop)
        if self.data.color_jitter > 0:
            brightness, contrast, saturation = jitter_factors(key, self.data.color_jitter)
            crop = TF.adjust_brightness(crop, brightness)
            crop = TF.adjust_contrast(crop, contrast)
            crop = TF.adjust_saturation(crop, saturation)
        return PretrainSample(crop, self.masks(key), index)


def stack_samples(samples: list[PretrainSample]) -> dict[str, Tensor]:
    """Collate in the worker: uint8 images and the masks already split into indices."""
    mask = MaskIndices.from_bool(np.stack([s.mask for s in samples]))
    return {"images": torch.stack([s.image for s in samples]), "index": torch.tensor([s.index for s in samples]),
            "visible": mask.visible, "masked": mask.masked,
            "corrupt_skipped": torch.tensor(sum(s.corrupt_skipped for s in samples))}
