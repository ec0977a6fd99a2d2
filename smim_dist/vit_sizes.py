"""ViT widths and depths by name (the standard DeiT / ViT table, plus ``micro`` for tests and the CPU demo), and the
patch grid of an image size. No torch here: config validation and the SLURM launcher use it on login nodes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


VIT_SIZES: dict[str, ViTSize] = {
    "micro": ViTSize(embed_dim=96, depth=4, num_heads=3),
    "tiny": ViTSize(embed_dim=192, depth=12, num_heads=3),
    "small": ViTSize(embed_dim=384, depth=12, num_heads=6),
    "base": ViTSize(embed_dim=768, depth=12, num_heads=12),
    "large": ViTSize(embed_dim=1024, depth=24, num_heads=16),
}


def vit_size(name: str) -> ViTSize:
    if name not in VIT_SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(VIT_SIZES)}")
    return VIT_SIZES[name]


def image_grid(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid of an image size; refuses sizes the patch size does not divide."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    if patch_size < 1 or height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width}, patch size {patch_size}: both must be at least 1")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by patch size {patch_size}; "
            f"use a multiple of {patch_size} (e.g. {max(patch_size, height // patch_size * patch_size)})")
    return height // patch_size, width // patch_size
