"""Per-step learning rate: linear warmup from 0, then half-cosine down to a floor (MAE / BEiT recipe)."""

from __future__ import annotations

import math


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based); ``step == total_steps`` gives ``min_lr``."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
