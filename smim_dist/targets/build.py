"""The reconstruction target a config asks for, as one callable the engine runs under ``no_grad``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smim_dist.config import Config
from smim_dist.targets.dalle import DalleTokenizer
from smim_dist.targets.hog import HOGTarget
from smim_dist.targets.pixels import PixelTarget


class MIMTarget(nn.Module):
    """Per-patch targets ``[B, N, dim]`` (HOG, pixels) or ``[B, N]`` codes (BEiT) for a batch.

    ``images`` are the normalised crops the model sees; ``tokenizer_images`` is BEiT's second, half-size view of the
    same crop in [0, 1], which only the DALL-E tokenizer reads.
    """

    def __init__(self, kind: str, generator: nn.Module, out_dim: int):
        super().__init__()
        self.kind = kind
        self.generator = generator.requires_grad_(False)
        self.out_dim = out_dim

    @property
    def needs_tokenizer_view(self) -> bool:
        return self.kind == "beit"

    @torch.no_grad()
    def forward(self, images: Tensor, tokenizer_images: Tensor | None = None) -> Tensor:
        if not self.needs_tokenizer_view:
            return self.generator(images)
        if tokenizer_images is None:
            raise ValueError("the BEiT target needs the loader's half-size tokenizer view of each crop")
        return self.generator(tokenizer_images)

    def train(self, mode: bool = True) -> "MIMTarget":
        """Targets are fixed functions of the image: the tokenizer stays in eval mode."""
        return super().train(False)


def build_target(cfg: Config) -> MIMTarget:
    kind = cfg.target.kind
    if kind == "maskfeat":
        hog = HOGTarget(patch_size=cfg.model.patch_size)
        return MIMTarget(kind, hog, hog.out_dim)
    if kind == "pixels":
        pixels = PixelTarget(patch_size=cfg.model.patch_size, per_patch=cfg.target.norm_pix)
        return MIMTarget(kind, pixels, pixels.out_dim)
    tokenizer = DalleTokenizer.from_file(cfg.target.tokenizer_path, trust_pickle=cfg.target.trust_pickle,
                                         fp16_on_gpu=cfg.target.tokenizer_fp16)
    return MIMTarget(kind, tokenizer, tokenizer.num_codes)
