"""Forward FLOPs per image, from token counts: L0 visible patches, L1 prefix ([PROXY] / [CLS]) tokens, L2 [MASK] tokens.

Two models are given. ``appendix_c_block_macs`` is the paper's per-block cost model (appendix C), which gives its
"2.8% fewer in training, 3.7% more at inference" for ViT-B/16 with 8 proxies and 60% masking. ``forward_flops`` counts
every matrix multiply this package's modules actually run, and matches ``torch.utils.flop_counter``. The two differ in
the reconstruction block: the paper charges its key/value projection of [PROXY, MASK] as one D x D map, (L1 + L2) D^2,
while a cross-attention has separate key and value maps, 2 (L1 + L2) D^2. With that counted, SemanticMIM pre-training
costs slightly *more* than vanilla MIM (see the FLOPs table in docs/model.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from smim_dist.config import ModelConfig
from smim_dist.vit_sizes import vit_size


@dataclass(frozen=True)
class TokenCounts:
    visible: int
    """L0: patch tokens through the main blocks (all patches in vanilla mode and at inference)"""
    prefix: int
    """L1: [PROXY] tokens, or the single [CLS]"""
    masked: int
    """L2: [MASK] tokens through the reconstruction twins (0 in vanilla mode, where they ride in the main blocks)"""


def token_counts(cfg: ModelConfig, mask_ratio: float, training: bool) -> TokenCounts:
    num_patches = cfg.num_patches
    num_masked = round(mask_ratio * num_patches) if training and cfg.mode == "proxy" else 0
    return TokenCounts(visible=num_patches - num_masked, prefix=cfg.num_prefix, masked=num_masked)


def appendix_c_block_macs(cfg: ModelConfig, mask_ratio: float, training: bool) -> int:
    """Multiply-accumulates of one block (plus its twin) by the paper's appendix-C formulas, batch 1."""
    dim = vit_size(cfg.size).embed_dim
    t = token_counts(cfg, mask_ratio, training)
    main = t.visible + t.prefix
    cost = 12 * main * dim**2 + 2 * main**2 * dim
    if t.masked:
        cost += (11 * t.masked * dim**2 + t.prefix * dim**2 + 2 * t.prefix * t.masked * dim
                 + 2 * t.masked**2 * dim)
    return cost


def forward_flops(cfg: ModelConfig, mask_ratio: float, training: bool, target_dim: int = 0) -> int:
    """FLOPs (2 per multiply-accumulate) of one image's forward pass through the real modules.

    ``training`` runs the pre-training model (patch embedding of every patch, blocks, twins, head on the masked
    patches); otherwise the exported encoder on the whole image. Norms, softmax and GELU are not counted, as in
    ``torch.utils.flop_counter``.
    """
    size = vit_size(cfg.size)
    dim, ratio = size.embed_dim, size.mlp_ratio
    t = token_counts(cfg, mask_ratio, training)
    masked_in_head = round(mask_ratio * cfg.num_patches) if training else 0
    main = t.visible + t.prefix
    macs = cfg.num_patches * 3 * cfg.patch_size**2 * dim
    block = (4 + 2 * ratio) * main * dim**2 + 2 * main**2 * dim
    context = t.prefix + t.masked
    recon = ((2 + 2 * ratio) * t.masked * dim**2 + 2 * context * dim**2 + 2 * t.masked * context * dim
             if t.masked else 0)
    macs += size.depth * (block + recon) + masked_in_head * dim * target_dim
    return int(2 * macs)
