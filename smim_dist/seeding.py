"""Reseeding Python's, NumPy's and torch's global generators from a key of integers (seed, epoch or step, rank):
what draws from them (augmentation, mixup, dropout, drop path) then depends on where a run is, not on its history,
so a resumed run draws what an uninterrupted one draws, and ranks draw differently."""

from __future__ import annotations

import random

import numpy as np
import torch


def reseed(*key: int) -> None:
    value = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
