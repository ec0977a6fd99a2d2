"""UperNet on a plain ViT, as BEiT and MAE fine-tune it for ADE20K (the paper's Table 4 protocol).

A ViT has one resolution, so BEiT's neck makes a pyramid out of the residual stream after four blocks (by default the
1-based blocks depth/3, depth/2, 2*depth/3 and depth: 4, 6, 8, 12 of ViT-B, BEiT's and MAE's ``out_indices``): the
first is upsampled x4 (two stride-2 transposed convolutions around BatchNorm + GELU), the second x2, the third is kept
and the fourth max-pooled x2, giving strides patch/4, patch/2, patch and 2 * patch (4, 8, 16, 32 for patch 16). The
UperNet head (Xiao et al. 2018, mmsegmentation's ``UPerHead``) runs a pyramid pooling module (scales 1, 2, 3, 6) on the
coarsest level, adds each level top-down into the next finer one through 1x1 laterals (FPN), refines each with a 3x3
convolution, and classifies the concatenation of all four at the finest level. The decoder is as wide as the encoder
(BEiT: 768 channels for ViT-B, 1024 for ViT-L). An FCN head on the stride-``patch`` level adds an auxiliary loss during
training (mmsegmentation's ``FCNHead``, 256 channels, one 3x3 convolution); it costs almost nothing and is dropped at
inference. Convolutions of the decoder are conv (no bias) + BatchNorm + ReLU, as mmsegmentation's ``ConvModule``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

POOL_SCALES = (1, 2, 3, 6)
AUX_CHANNELS = 256


def pyramid_blocks(depth: int) -> tuple[int, int, int, int]:
    """The 1-based blocks whose outputs form the pyramid: BEiT's (4, 6, 8, 12) for depth 12, (8, 12, 16, 24) for 24."""
    return max(1, round(depth / 3)), max(1, depth // 2), round(2 * depth / 3), depth


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _upsample(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _classifier(channels: int, num_classes: int) -> nn.Sequential:
    """Dropout 0.1 and a 1x1 convolution initialised N(0, 0.01), as mmsegmentation's decode heads."""
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(0.1), conv)


class ViTPyramid(nn.Module):
    """Four ``[B, D, h, w]`` block outputs -> maps at 4x, 2x, 1x and 1/2x their resolution (BEiT's fpn1..fpn4)."""

    def __init__(self, dim: int):
        super().__init__()
        self.rescales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                          nn.ConvTranspose2d(dim, dim, 2, stride=2)),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, stride=2),
        ])

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        return [rescale(x) for rescale, x in zip(self.rescales, maps)]


class UperHead(nn.Module):
    """Pyramid pooling on the coarsest level, FPN top-down fusion, and a classifier on the fused finest level."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, levels: int = 4):
        super().__init__()
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_bn_relu(in_channels, channels, 1))
                                  for scale in POOL_SCALES])
        self.ppm_bottleneck = conv_bn_relu(in_channels + len(POOL_SCALES) * channels, channels, 3)
        self.laterals = nn.ModuleList([conv_bn_relu(in_channels, channels, 1) for _ in range(levels - 1)])
        self.fpn_convs = nn.ModuleList([conv_bn_relu(channels, channels, 3) for _ in range(levels - 1)])
        self.fpn_bottleneck = conv_bn_relu(levels * channels, channels, 3)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        top = levels[-1]
        pooled = [_upsample(branch(top), top) for branch in self.ppm]
        laterals = [lateral(x) for lateral, x in zip(self.laterals, levels)]
        laterals.append(self.ppm_bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _upsample(laterals[i], laterals[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        fused = torch.cat([outs[0], *(_upsample(x, outs[0]) for x in outs[1:])], dim=1)
        return self.classifier(self.fpn_bottleneck(fused))


class UperNet(nn.Module):
    """A timm ViT (fine-tuned with the decoder) + ``ViTPyramid`` + ``UperHead`` (+ the auxiliary FCN head in training).

    ``forward`` gives class logits at stride patch/4 and, in training mode, the auxiliary logits at stride patch (None
    in eval mode); the caller upsamples them to the label size."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, blocks: Sequence[int] | None = None):
        super().__init__()
        depth, dim = len(encoder.blocks), encoder.embed_dim
        self.blocks = [block - 1 for block in (blocks or pyramid_blocks(depth))]
        encoder.prune_intermediate_layers(self.blocks, prune_norm=True, prune_head=True)
        self.encoder = encoder
        self.neck = ViTPyramid(dim)
        self.decode_head = UperHead(dim, dim, num_classes)
        self.aux_head = nn.Sequential(conv_bn_relu(dim, AUX_CHANNELS, 3), _classifier(AUX_CHANNELS, num_classes))

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        maps = self.encoder.forward_intermediates(pixels, indices=self.blocks, output_fmt="NCHW",
                                                  intermediates_only=True)
        levels = self.neck(maps)
        return self.decode_head(levels), self.aux_head(levels[2]) if self.training else None

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping of the encoder (embeddings, then one group per block) with the decoder last, so
        ``timm.optim.param_groups_layer_decay`` gives BEiT's layer-wise decay: the decoder at the full learning rate,
        the last block at ``decay``, ..., the embeddings at ``decay ** (depth + 1)``. (timm puts parameters no pattern
        matches, the decoder's, in a group after all others.)"""
        return {"stem": r"^encoder\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
                "blocks": r"^encoder\.blocks\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}
