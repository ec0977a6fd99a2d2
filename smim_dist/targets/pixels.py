"""Normalised-pixel target (MAE's ``norm_pix_loss``): the cheapest real target, used by the CPU demo."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class PixelTarget(nn.Module):
    """Each patch's pixels, standardised by that patch's own mean and variance (``per_patch``), so the loss rewards
    structure rather than a patch's mean colour; or as the normalised image has them, so that a flat patch's target
    is its colour rather than its amplified grain."""

    def __init__(self, patch_size: int = 16, eps: float = 1e-6, per_patch: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.eps = eps
        self.per_patch = per_patch
        self.out_dim = 3 * patch_size * patch_size

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch size {self.patch_size}")
        patches = rearrange(images.float(), "b c (h p) (w q) -> b (h w) (p q c)", p=self.patch_size, q=self.patch_size)
        if not self.per_patch:
            return patches
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        return (patches - mean) / (var + self.eps).sqrt()
