"""The ViT encoder that survives pre-training: patch embedding, prefix tokens, absolute positions, blocks, final norm.

It is laid out exactly like timm's ``VisionTransformer(class_token=True, reg_tokens=P-1, no_embed_class=True)``: the
first prefix token is the class token, the others are register tokens, and none of them has a position embedding (the
paper's [PROXY] tokens carry no spatial prior). A vanilla MIM encoder is the same with P = 1.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from smim_dist.models.layers import Block
from smim_dist.vit_sizes import ViTSize, image_grid


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth grows linearly with depth, as in DeiT / BEiT."""
    return [drop_path * i / max(depth - 1, 1) for i in range(depth)]


class ViTEncoder(nn.Module):
    def __init__(self, size: ViTSize, img_size: int | tuple[int, int], patch_size: int, num_prefix: int,
                 qkv_bias: bool, layer_scale_init: float | None, drop_path: float, grad_checkpointing: bool = False):
        super().__init__()
        if num_prefix < 1:
            raise ValueError(f"num_prefix={num_prefix}: the encoder needs at least the [CLS] token")
        self.grid = image_grid(img_size, patch_size)
        self.num_prefix = num_prefix
        self.embed_dim = size.embed_dim
        self.grad_checkpointing = grad_checkpointing
        self.img_size = (self.grid[0] * patch_size, self.grid[1] * patch_size)
        self.patch_embed = PatchEmbed(img_size=self.img_size, patch_size=patch_size, embed_dim=size.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, num_prefix - 1, size.embed_dim)) if num_prefix > 1 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], size.embed_dim))
        self.blocks = nn.ModuleList(
            Block(size.embed_dim, size.num_heads, size.mlp_ratio, qkv_bias, layer_scale_init, rate)
            for rate in drop_path_rates(drop_path, size.depth))
        self.norm = nn.LayerNorm(size.embed_dim, eps=1e-6)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def check_images(self, images: Tensor) -> None:
        expected = (3, *self.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [batch, {expected[0]}, {expected[1]}, {expected[2]}] for this model, "
                             f"got {tuple(images.shape)}; resize or set model.img_size")

    def embed_patches(self, images: Tensor) -> Tensor:
        """Patch embeddings ``[B, N, D]`` without positions (vanilla MIM swaps in [MASK] before adding them)."""
        self.check_images(images)
        return self.patch_embed(images)

    def prefix_tokens(self, batch: int) -> Tensor:
        tokens = self.cls_token if self.reg_token is None else torch.cat([self.cls_token, self.reg_token], dim=1)
        return tokens.expand(batch, -1, -1)

    def run_block(self, index: int, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        block = self.blocks[index]
        if self.grad_checkpointing and self.training and not return_attention:
            return checkpoint(block, x, use_reentrant=False)
        return block(x, return_attention)

    def forward(self, images: Tensor) -> Tensor:
        """Final-normed tokens ``[B, P + N, D]`` of whole images (no mask): what the exported timm model must
        reproduce (tests/test_export.py)."""
        x = torch.cat([self.prefix_tokens(images.shape[0]), self.embed_patches(images) + self.pos_embed], dim=1)
        for index in range(len(self.blocks)):
            x, _ = self.run_block(index, x)
        return self.norm(x)
