"""Which samples a rank reads, in which order: a pure function of (seed, epoch, rank, world size, accumulation).

Global step g of an epoch always covers the same ``global_batch`` samples of one seeded permutation, however they are
split over ranks and gradient-accumulation micro-steps, so 1 process x 4 micro-steps and 4 processes x 1 micro-step
train on identical batches. A restarted job asks for the same epoch from the micro-batch it stopped at and gets
exactly what the uninterrupted run would have read from there on; nothing about the order lives in process state.
The permutation is evaluated only at the positions this rank reads (``FeistelPermutation``), so starting an epoch
anywhere costs the same at a thousand samples and at billions.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from smim_dist.data.permutation import FeistelPermutation

CHUNK_SAMPLES = 1 << 16
"""positions evaluated at a time while iterating: bounds the order's memory whatever the epoch's size"""


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)``: loader workers keep their own copy of the dataset, and still seed each sample's
    augmentation with the right epoch. The tail that does not fill a global batch is dropped."""

    def __init__(self, num_samples: int, micro_batch: int, accumulation: int, rank: int, world_size: int, seed: int):
        self.global_batch = micro_batch * accumulation * world_size
        if num_samples < self.global_batch:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch of "
                             f"{self.global_batch}; lower optim.global_batch or add data")
        self.num_samples, self.micro_batch, self.accumulation = num_samples, micro_batch, accumulation
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.epoch, self.start_batch = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank reads per epoch."""
        return self.steps_per_epoch * self.accumulation

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} outside this epoch's {self.batches_per_epoch} micro-batches")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.micro_batch

    def _positions(self, first: int, stop: int) -> np.ndarray:
        """Global positions in the epoch's order of this rank's micro-batches ``first`` to ``stop`` - 1."""
        steps, accumulated = np.divmod(np.arange(first, stop, dtype=np.uint64), np.uint64(self.accumulation))
        starts = (steps * np.uint64(self.global_batch) + accumulated * np.uint64(self.world_size * self.micro_batch)
                  + np.uint64(self.rank * self.micro_batch))
        return (starts[:, None] + np.arange(self.micro_batch, dtype=np.uint64)).reshape(-1)

    def index_chunks(self):
        """This rank's sample indices from ``start_batch`` on, in order, a chunk of micro-batches at a time."""
        order = FeistelPermutation(self.num_samples, self.seed, self.epoch)
        per_chunk = max(1, CHUNK_SAMPLES // self.micro_batch)
        for first in range(self.start_batch, self.batches_per_epoch, per_chunk):
            yield order(self._positions(first, min(first + per_chunk, self.batches_per_epoch)))

    def rank_indices(self) -> np.ndarray:
        """All of ``index_chunks`` as one array (what FFCV's loader takes): 8 bytes per sample this rank reads."""
        out = np.empty(len(self), dtype=np.uint64)
        filled = 0
        for chunk in self.index_chunks():
            out[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
        return out

    def __iter__(self):
        return ((self.epoch, index) for chunk in self.index_chunks() for index in chunk.tolist())
