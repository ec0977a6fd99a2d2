"""UperNet's data: mmsegmentation's ADE20K training crops and val images, keyed so that any rank, worker or rerun
draws the same crop for the same (seed, epoch, sample), and the label-id scan that runs before any model is loaded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.functional import InterpolationMode, resize

from smim_dist.config import ConfigError
from smim_dist.data.batch import IMAGENET_MEAN, IMAGENET_STD
from smim_dist.eval.data import IGNORE_INDEX, SegmentationSplit, read_label_map
from smim_dist.eval.features import default_device, rank_and_world

RATIO_RANGE = (0.5, 2.0)
"""training rescale factors of the crop-size short side"""
CAT_MAX_RATIO = 0.75
LONG_SIDE = 4
"""the long side is at most this many times the short side's target (mmsegmentation's 2560 x 640 scale)"""



def normalise(images: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(-1, 1, 1)
    return (images.float() - mean) / std


def scaled_size(height: int, width: int, short: float) -> list[int]:
    """mmsegmentation's keep-ratio resize to a (LONG_SIDE * short, short) scale."""
    factor = min(short / min(height, width), LONG_SIDE * short / max(height, width))
    return [max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))]


def _crop_box(label: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """mmsegmentation's RandomCrop with cat_max_ratio: up to 10 draws, keeping the first in which no class covers
    CAT_MAX_RATIO of the labelled pixels (a crop of sky alone teaches little)."""
    for _ in range(10):
        top = int(rng.integers(0, max(label.shape[0] - crop, 0) + 1))
        left = int(rng.integers(0, max(label.shape[1] - crop, 0) + 1))
        counts = np.bincount(label[top:top + crop, left:left + crop].ravel(), minlength=256)[:IGNORE_INDEX]
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
            break
    return top, left


class TrainCrops(Dataset):
    """Augmented (uint8 image ``[3, S, S]``, uint8 label map ``[S, S]``) for an ``(epoch, index)`` item, every random
    choice drawn from a generator keyed by (seed, epoch, index): the same crop in any worker, rank or rerun."""

    def __init__(self, split: SegmentationSplit, crop: int, seed: int):
        self.split, self.crop, self.seed = split, crop, seed

    def __len__(self) -> int:
        return len(self.split.pairs)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, Tensor]:
        epoch, index = item
        rng = np.random.default_rng([self.seed, epoch, index])
        image_file, mask_file = self.split.pairs[index]
        image = decode_image(str(image_file), mode=ImageReadMode.RGB)
        label = torch.from_numpy(read_label_map(self.split, mask_file).copy())[None]
        size = scaled_size(image.shape[-2], image.shape[-1], self.crop * rng.uniform(*RATIO_RANGE))
        image = resize(image, size, antialias=True)
        label = resize(label, size, interpolation=InterpolationMode.NEAREST)[0]
        top, left = _crop_box(label.numpy(), self.crop, rng)
        image = image[:, top:top + self.crop, left:left + self.crop]
        label = label[top:top + self.crop, left:left + self.crop]
        if rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        pad = (0, self.crop - label.shape[1], 0, self.crop - label.shape[0])
        return F.pad(image, pad), F.pad(label, pad, value=IGNORE_INDEX)


def epoch_items(num_samples: int, batch_size: int, seed: int, epoch: int, first_step: int, rank: int,
                world_size: int) -> list[tuple[int, int]]:
    """This rank's ``(epoch, index)`` items from step ``first_step`` of the epoch on: global batch k is samples
    ``k * batch_size ...`` of a permutation seeded by (seed, epoch), rank r takes every world-size-th of them, and a
    last partial batch is dropped. The global batches do not depend on the world size."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [(epoch, index) for step in range(first_step, num_samples // batch_size)
            for index in order[step * batch_size:(step + 1) * batch_size][rank::world_size]]


class ValImages(Dataset):
    """(uint8 image rescaled to a short side of ``crop``, uint8 label map at its own size)."""

    def __init__(self, split: SegmentationSplit, crop: int):
        self.split, self.crop = split, crop

    def __len__(self) -> int:
        return len(self.split.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_file, mask_file = self.split.pairs[index]
        image = decode_image(str(image_file), mode=ImageReadMode.RGB)
        image = resize(image, scaled_size(image.shape[-2], image.shape[-1], self.crop), antialias=True)
        return image, torch.from_numpy(read_label_map(self.split, mask_file).copy())



def check_label_ids(splits: Sequence[SegmentationSplit], num_classes: int) -> None:
    """Refuse label maps with a class id of ``num_classes`` or more, reading every map once (each rank its share)."""
    rank, world_size = rank_and_world()
    largest = torch.zeros((), dtype=torch.int64)
    for split in splits:
        for _, mask in split.pairs[rank::world_size]:
            ids = read_label_map(split, mask)
            largest = torch.maximum(largest, torch.tensor(int(ids[ids != IGNORE_INDEX].max(initial=0))))
    if world_size > 1:
        largest = largest.to(default_device())
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    if int(largest) >= num_classes:
        raise ConfigError(f"--num-classes {num_classes}: the label maps of {splits[0].root} hold class id "
                          f"{int(largest)} (ids run 0..num classes - 1, {IGNORE_INDEX} ignored); pass --num-classes "
                          f"{int(largest) + 1} or more")
