"""Boolean patch masks turned into gather indices, once, where it is cheap.

The proxy encoder runs only the visible patches, so every image of a batch must have the same number of masked patches
and the model must know that number without asking the GPU (a ``.item()`` in the step would stall the pipeline).
Converting the mask on the CPU side of the loader gives index tensors whose shapes carry the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class MaskIndices:
    """Indices of visible and masked patches, each ``[batch, count]`` in ascending patch order."""

    visible: Tensor
    masked: Tensor

    @property
    def num_patches(self) -> int:
        return self.visible.shape[1] + self.masked.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "MaskIndices":
        return MaskIndices(self.visible.to(device, non_blocking=non_blocking),
                           self.masked.to(device, non_blocking=non_blocking))

    def as_bool(self) -> Tensor:
        """``[batch, num_patches]`` with True at masked patches, built on the indices' device without a sync."""
        mask = torch.zeros(self.masked.shape[0], self.num_patches, dtype=torch.bool, device=self.masked.device)
        return mask.scatter_(1, self.masked, True)

    @classmethod
    def from_bool(cls, mask: Tensor | np.ndarray) -> "MaskIndices":
        """Validate a ``[batch, num_patches]`` boolean mask (True = masked) and split it; call this on CPU tensors."""
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a boolean tensor (True = masked patch), got dtype {mask.dtype}")
        if mask.dim() != 2:
            raise ValueError(f"mask must have shape [batch, num_patches], got {tuple(mask.shape)}")
        counts = mask.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(
                f"every image needs the same number of masked patches, got counts {sorted(set(counts.tolist()))}; "
                "use the generators in smim_dist.data.masking, which mask an exact count")
        num_masked, num_patches = int(counts[0]), mask.shape[1]
        if not 0 < num_masked < num_patches:
            raise ValueError(
                f"mask hides {num_masked} of {num_patches} patches; at least one patch must be visible and one masked")
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
        return cls(visible=order[:, : num_patches - num_masked].contiguous(),
                   masked=order[:, num_patches - num_masked:].contiguous())
