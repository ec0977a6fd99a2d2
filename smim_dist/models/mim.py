"""Pre-training models: vanilla MIM (Eq. 2) and SemanticMIM with [PROXY] tokens (Eq. 3-4).

Both return predictions for the masked patches only; targets and the loss live outside the model so the engine can
compute targets under ``no_grad`` and the model stays a plain ``nn.Module`` for DeepSpeed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from smim_dist.config import ModelConfig
from smim_dist.models.encoder import ViTEncoder, drop_path_rates
from smim_dist.models.layers import ReconBlock
from smim_dist.models.mask_index import MaskIndices
from smim_dist.vit_sizes import vit_size



def _gather(tokens: Tensor, index: Tensor) -> Tensor:
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class MIMModel(nn.Module):
    """Encoder + [MASK] embedding + (proxy mode) reconstruction twins + linear head to the target."""

    def __init__(self, cfg: ModelConfig, target_dim: int):
        super().__init__()
        if cfg.mode == "proxy" and cfg.num_proxy < 1:
            raise ValueError(f"model.num_proxy={cfg.num_proxy}: proxy mode needs at least one [PROXY] token")
        size = vit_size(cfg.size)
        self.mode = cfg.mode
        self.encoder = ViTEncoder(size, cfg.img_size, cfg.patch_size, cfg.num_prefix, cfg.qkv_bias,
                                  cfg.layer_scale_init, cfg.drop_path, cfg.grad_checkpointing)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, size.embed_dim))
        self.recon_blocks = nn.ModuleList(
            ReconBlock(size.embed_dim, size.num_heads, size.mlp_ratio, cfg.qkv_bias, cfg.layer_scale_init, rate)
            for rate in drop_path_rates(cfg.drop_path, size.depth)) if cfg.mode == "proxy" else None
        self.head = nn.Linear(size.embed_dim, target_dim)
        self._init_weights(cfg.mlp_init, cfg.rescale_init)

    def _init_weights(self, mlp_init: str, rescale: bool) -> None:
        """Truncated normal 0.02 (the MLPs xavier-uniform with ``mlp_init="xavier"``), then, with ``rescale``, each
        residual branch's output projection scaled down by sqrt(2 * layer) so deep stacks start near identity (BEiT);
        the twins get the same treatment as the blocks."""
        for param in (self.encoder.cls_token, self.encoder.reg_token, self.encoder.pos_embed, self.mask_token):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        stacks = [self.encoder.blocks, *([self.recon_blocks] if self.recon_blocks is not None else [])]
        for stack in stacks:
            for layer, block in enumerate(stack, start=1):
                if mlp_init == "xavier":
                    for linear in (block.mlp.fc1, block.mlp.fc2):
                        nn.init.xavier_uniform_(linear.weight)
                        nn.init.normal_(linear.bias, std=1e-6)
                if rescale:
                    block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
                    block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer))

    def no_weight_decay(self) -> set[str]:
        """Tokens and position embeddings are exempt from weight decay (norms and biases are found by shape)."""
        return {name for name, _ in self.named_parameters()
                if name.endswith(("cls_token", "reg_token", "pos_embed", "mask_token"))}

    def forward(self, images: Tensor, mask: MaskIndices, return_attention: bool = False):
        """Predictions ``[B, num_masked, target_dim]`` for the masked patches, in ``mask.masked`` order.

        With ``return_attention`` also returns ``{"blocks": [...], "recon": [...]}``: per-block attention probabilities
        of the main blocks and (proxy mode) of the twins' [MASK] queries over [PROXY, MASK], computed outside the fused
        kernel.
        """
        self._check_mask(images, mask)
        run = self._forward_proxy if self.mode == "proxy" else self._forward_vanilla
        out, attentions = run(images, mask, return_attention)
        prediction = self.head(self.encoder.norm(out))
        return (prediction, attentions) if return_attention else prediction

    def _check_mask(self, images: Tensor, mask: MaskIndices) -> None:
        if not isinstance(mask, MaskIndices):
            raise TypeError(f"mask must be MaskIndices (use MaskIndices.from_bool), got {type(mask).__name__}")
        for name, index in (("visible", mask.visible), ("masked", mask.masked)):
            if index.dtype != torch.int64 or index.dim() != 2 or index.shape[0] != images.shape[0]:
                raise ValueError(f"mask.{name} must be int64 [batch={images.shape[0]}, count], "
                                 f"got {index.dtype} {tuple(index.shape)}")
        if mask.num_patches != self.encoder.num_patches:
            raise ValueError(f"mask covers {mask.num_patches} patches but the image has {self.encoder.num_patches} "
                             f"({self.encoder.grid[0]}x{self.encoder.grid[1]})")

    def _forward_vanilla(self, images: Tensor, mask: MaskIndices, return_attention: bool):
        patches = self.encoder.embed_patches(images)
        is_masked = mask.as_bool().unsqueeze(-1)
        patches = torch.where(is_masked, self.mask_token.to(patches.dtype), patches) + self.encoder.pos_embed
        x = torch.cat([self.encoder.prefix_tokens(images.shape[0]), patches], dim=1)
        attentions = {"blocks": [], "recon": []}
        for index in range(len(self.encoder.blocks)):
            x, probs = self.encoder.run_block(index, x, return_attention)
            attentions["blocks"].append(probs)
        return _gather(x[:, self.encoder.num_prefix:], mask.masked), attentions if return_attention else None

    def _forward_proxy(self, images: Tensor, mask: MaskIndices, return_attention: bool):
        batch = images.shape[0]
        patches = self.encoder.embed_patches(images) + self.encoder.pos_embed
        x = torch.cat([self.encoder.prefix_tokens(batch), _gather(patches, mask.visible)], dim=1)
        queries = self.mask_token + _gather(self.encoder.pos_embed.expand(batch, -1, -1), mask.masked)
        num_proxy = self.encoder.num_prefix
        attentions = {"blocks": [], "recon": []}
        for index, recon in enumerate(self.recon_blocks):
            x, probs = self.encoder.run_block(index, x, return_attention)
            attentions["blocks"].append(probs)
            if self.encoder.grad_checkpointing and self.training and not return_attention:
                queries, recon_probs = checkpoint(recon, queries, x[:, :num_proxy], use_reentrant=False)
            else:
                queries, recon_probs = recon(queries, x[:, :num_proxy], return_attention)
            attentions["recon"].append(recon_probs)
        return queries, attentions if return_attention else None
