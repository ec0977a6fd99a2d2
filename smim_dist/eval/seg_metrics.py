"""Segmentation scores as every protocol reports them (mIoU over the classes present, pixel accuracy), from one
confusion matrix summed over batches, so linear and UperNet segmentation compare like for like."""

from __future__ import annotations

import torch
from torch import Tensor

from smim_dist.eval.data import IGNORE_INDEX


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """int64 ``[C, C]``: row = true class, column = predicted class, over the pixels not labelled ``IGNORE_INDEX``."""
    labels = labels.long()
    valid = labels != IGNORE_INDEX
    pairs = labels[valid] * num_classes + predictions[valid].long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def segmentation_scores(confusion: Tensor) -> dict:
    """mIoU over the classes that occur (in labels or predictions: union > 0; the others are None per class), and
    pixel accuracy."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    iou = torch.where(present, hits / union.clamp(min=1), torch.zeros_like(hits))
    return {"miou": iou[present].mean().item() if present.any() else 0.0,
            "pixel_acc": (hits.sum() / confusion.sum().clamp(min=1)).item(),
            "per_class_iou": [value if ok else None for value, ok in zip(iou.tolist(), present.tolist())]}
