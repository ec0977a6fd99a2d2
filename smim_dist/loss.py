"""MIM losses over the masked patches only; [PROXY] and visible tokens are never supervised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mim_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for token targets (BEiT: ``target`` is ``[B, M]`` int64 codes), mean squared error for feature
    targets (MaskFeat HOG, normalised pixels: ``[B, M, dim]``). Computed in float32 whatever the autocast dtype."""
    prediction = prediction.float()
    if target.dtype == torch.int64:
        return F.cross_entropy(prediction.flatten(0, 1), target.flatten())
    return F.mse_loss(prediction, target.float())


def gather_masked(per_patch: Tensor, masked: Tensor) -> Tensor:
    """Rows of a per-patch target ``[B, N, ...]`` at the masked indices ``[B, M]``, in the model's prediction order."""
    index = masked.view(*masked.shape, *([1] * (per_patch.dim() - 2))).expand(-1, -1, *per_patch.shape[2:])
    return torch.gather(per_patch, 1, index)


@torch.no_grad()
def image_blind_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """The loss of a model that ignores the image and predicts this batch's average target: the level a training loss
    must get below to show the model learned anything (MSE targets: the targets' variance around their mean; token
    targets: the entropy of the batch's code histogram). Device-side, no host read."""
    if target.dtype == torch.int64:
        counts = torch.zeros(prediction.shape[-1], device=target.device).scatter_add_(
            0, target.flatten(), torch.ones(target.numel(), device=target.device))
        probs = counts / target.numel()
        return -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    target = target.float()
    return (target - target.mean(dim=(0, 1))).square().mean()
