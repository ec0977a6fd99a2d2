"""MaskFeat's HOG target, numerically matching the reference (MMPretrain's ``HOGGenerator``).

Pre-trained checkpoints are only comparable when the target is the same function, so every quirk of the reference is
kept on purpose: Sobel as cross-correlation, ``atan2(gx, gy)`` (gx first), a Gaussian window tiled per 16 px rather
than centred on the image, and L2 normalization per colour channel and cell (no block normalization).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _gaussian_window(size: int) -> Tensor:
    std = size // 2
    n = torch.arange(size, dtype=torch.float32)
    w = torch.exp(-0.5 * ((n - n.mean()) / std) ** 2)
    kernel = w[:, None] * w[None, :]
    return kernel / kernel.sum()


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class HOGTarget(nn.Module):
    """Per-patch HOG features ``[B, N, out_dim]`` for images normalized with the ImageNet mean/std.

    The reference computes on normalized images, so the target scale depends on that normalization; pass the same
    tensor the encoder sees.
    """

    sobel_x: Tensor
    sobel_y: Tensor
    window: Tensor

    def __init__(self, patch_size: int = 16, nbins: int = 9, cell_size: int = 8, gaussian_window: int = 16) -> None:
        super().__init__()
        for name, value in (
            ("patch_size", patch_size),
            ("nbins", nbins),
            ("cell_size", cell_size),
            ("gaussian_window", gaussian_window),
        ):
            _check_positive_int(name, value)
        if gaussian_window < 2:
            # std = window // 2 would be 0.
            raise ValueError(f"gaussian_window must be >= 2, got {gaussian_window}")
        if patch_size % cell_size:
            raise ValueError(f"patch_size {patch_size} must be divisible by cell_size {cell_size}")
        self.patch_size = patch_size
        self.nbins = nbins
        self.cell_size = cell_size
        self.gaussian_window = gaussian_window
        self.cells_per_side = patch_size // cell_size

        sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        # Non-persistent: fixed by the arguments, so they follow .to(device) but stay out of checkpoints.
        self.register_buffer("sobel_x", sobel_x.expand(3, 1, 3, 3).contiguous(), persistent=False)
        self.register_buffer("sobel_y", sobel_x.t().expand(3, 1, 3, 3).contiguous(), persistent=False)
        self.register_buffer("window", _gaussian_window(gaussian_window), persistent=False)

    @property
    def out_dim(self) -> int:
        return 3 * self.nbins * self.cells_per_side**2

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, nbins={self.nbins}, cell_size={self.cell_size}, "
            f"gaussian_window={self.gaussian_window}"
        )

    def _check_input(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"HOGTarget expects RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"HOGTarget expects normalized float images, got dtype {images.dtype}")
        step = math.lcm(self.patch_size, self.gaussian_window)
        h, w = images.shape[-2:]
        if h < step or w < step or h % step or w % step:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of {step} (patch_size={self.patch_size}, "
                f"gaussian_window={self.gaussian_window}); resize or crop the images to a multiple of {step}"
            )

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        self._check_input(images)
        x = images.float()
        device = x.device
        b, _, h, w = x.shape

        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        gx = F.conv2d(x, self.sobel_x.to(device), groups=3)
        gy = F.conv2d(x, self.sobel_y.to(device), groups=3)
        magnitude = torch.hypot(gx, gy)
        magnitude = magnitude * self.window.to(device).repeat(h // self.gaussian_window, w // self.gaussian_window)
        # Divide by pi, then scale, as the reference does: atan2 returns exactly pi for edges with gx == 0, gy < 0,
        # and only this order maps them to nbins (bin 0) instead of just below it (bin nbins - 1).
        phase = torch.atan2(gx, gy) / math.pi * self.nbins
        bins = phase.floor().long().remainder(self.nbins)  # unsigned orientation: opposite directions share a bin

        hist = torch.zeros(b, 3, self.nbins, h, w, dtype=torch.float32, device=device)
        hist.scatter_add_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))

        c = self.cell_size
        hist = hist.view(b, 3, self.nbins, h // c, c, w // c, c).sum(dim=(4, 6))
        hist = F.normalize(hist, p=2, dim=2)

        k = self.cells_per_side
        hp, wp = h // self.patch_size, w // self.patch_size
        hist = hist.view(b, 3, self.nbins, hp, k, wp, k).permute(0, 3, 5, 1, 2, 4, 6)
        return hist.reshape(b, hp * wp, self.out_dim)
