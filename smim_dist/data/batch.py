"""A loader batch on the device, normalised there: the host only ever moves uint8 pixels and int64 indices.

BEiT's tokenizer reads a half-size view of the same crop; it is resized here from the uint8 crop, on the device,
rather than produced and shipped by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from smim_dist.models.mask_index import MaskIndices

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class DeviceBatch:
    images: Tensor
    """float32 [B, 3, H, W], ImageNet-normalised"""
    mask: MaskIndices
    tokenizer_views: Tensor | None = None
    """float32 [B, 3, H/2, W/2] in [0, 1]"""

    @property
    def size(self) -> int:
        return self.images.shape[0]


class DeviceNormalizer:
    """Holds mean and std on the device once, instead of re-creating them every step."""

    def __init__(self, device: torch.device, tokenizer_view: bool = False):
        self.device, self.tokenizer_view = device, tokenizer_view
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, raw: dict[str, Tensor]) -> DeviceBatch:
        pixels = raw["images"].to(self.device, non_blocking=True).float()
        views = None
        if self.tokenizer_view:
            half = [pixels.shape[-2] // 2, pixels.shape[-1] // 2]
            views = F.interpolate(pixels / 255.0, size=half, mode="bicubic", antialias=True).clamp_(0.0, 1.0)
        return DeviceBatch(images=(pixels - self.mean) / self.std,
                           mask=MaskIndices(raw["visible"], raw["masked"]).to(self.device), tokenizer_views=views)
