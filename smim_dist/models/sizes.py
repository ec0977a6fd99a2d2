"""ViT widths and depths by name (the standard DeiT / ViT table, plus ``micro`` for tests and the CPU demo)."""

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
