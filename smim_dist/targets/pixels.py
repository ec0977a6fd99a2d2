"""Normalised-pixel target (MAE's ``norm_pix_loss``): the cheapest real target, used by the CPU demo."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class PixelTarget(nn.Module):
    """Each patch's pixels, standardised by that patch's own mean and variance, so the loss rewards structure rather
    than a patch's mean colour."""

    def __init__(self, patch_size: int = 16, eps: float = 1e-6):
        super().__init__()
        self.patch_size = patch_size
        self.eps = eps
        self.out_dim = 3 * patch_size * patch_size

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch size {self.patch_size}")
        patches = rearrange(images.float(), "b c (h p) (w q) -> b (h w) (p q c)", p=self.patch_size, q=self.patch_size)
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        return (patches - mean) / (var + self.eps).sqrt()
