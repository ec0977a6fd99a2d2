"""Images for fine-tuning: timm's training augmentation over a labelled ImageFolder split, one rank's share per epoch,
and the same seeds for an epoch whether it runs in an uninterrupted run or in a resumed one.

Fine-tuning decodes every training image every epoch through RandAugment and random erasing, which work on PIL images,
so it reads image trees (the demo set included: it is stored as trees beside its .beton files), not FFCV files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import posterize
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from smim_dist.config import Config, ConfigError
from smim_dist.data.batch import IMAGENET_MEAN, IMAGENET_STD
from smim_dist.eval.data import LabelledSplit, eval_splits
from smim_dist.seeding import reseed


def finetune_splits(cfg: Config) -> tuple[LabelledSplit, LabelledSplit]:
    """The labelled (train, val) image trees of the run's data (``data.*`` overrides applied); .beton files are
    refused, except the demo set's, whose trees are read instead."""
    if cfg.data.demo:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="imagefolder"))
    train, val = eval_splits(cfg)
    if not train.files:
        raise ConfigError(f"{train.path} is a .beton file; fine-tuning augments PIL images every epoch (RandAugment, "
                          "random erasing) and reads ImageFolder trees: pass data.source=imagefolder data.path=ROOT "
                          "with ROOT/train/<class>/<image> and ROOT/val/<class>/<image>")
    return train, val


def train_transform(img_size: int, auto_augment: str, re_prob: float) -> Callable[[Image.Image], Tensor]:
    """MAE's fine-tuning augmentation, built by timm: random resized crop (scale 0.08-1, bicubic), flip,
    RandAugment ``auto_augment``, normalisation, random erasing with probability ``re_prob`` (per-pixel noise)."""
    mean, std = (tuple(value / 255 for value in values) for values in (IMAGENET_MEAN, IMAGENET_STD))
    try:
        transform = create_transform(img_size, is_training=True, auto_augment=auto_augment, interpolation="bicubic",
                                     re_prob=re_prob, re_mode="pixel", re_count=1, mean=mean, std=std)
    except (AssertionError, ValueError, KeyError) as err:
        raise ConfigError(f"--auto-augment {auto_augment!r}: timm cannot build it ({err}); use a timm policy such as "
                          "rand-m9-mstd0.5-inc1") from None
    for step in transform.transforms:
        for op in [*getattr(step, "ops", ()), *(op for ops in getattr(step, "policy", ()) for op in ops)]:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def _posterize(image: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, with 0 bits kept giving the black image Pillow gave before it began to refuse 0 bits.
    RandAugment's "inc1" posterize keeps 0 bits at magnitude 10, which m9 mstd0.5 draws about 2% of the time: with
    timm 1.0.31 and Pillow 13 a fine-tuning run would stop within its first ImageNet epoch."""
    return Image.new(image.mode, image.size) if bits_to_keep < 1 else posterize(image, bits_to_keep)


class _TrainImages(Dataset):
    def __init__(self, split: LabelledSplit, transform: Callable[[Image.Image], Tensor]):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return self.split.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        with Image.open(self.split.path / self.split.files[index]) as image:
            return self.transform(image.convert("RGB")), int(self.split.labels[index])


def _seed_worker(rank: int, worker: int) -> None:
    """torch gives a loader's workers the same seeds on every rank; mix the rank in, so ranks augment differently."""
    reseed(torch.initial_seed() % 2**32, worker, rank)


def train_loader(split: LabelledSplit, transform: Callable[[Image.Image], Tensor], batch_size: int, seed: int,
                 epoch: int, rank: int, world_size: int, num_workers: int) -> DataLoader:
    """Rank ``rank``'s batches of ``batch_size`` augmented images and labels for ``epoch``: a seeded shuffle split
    into equal shares, partial batches dropped. Call after ``reseed(seed, epoch, rank)``, which
    seeds the workers too."""
    sampler: DistributedSampler = DistributedSampler(_TrainImages(split, transform), num_replicas=world_size,
                                                     rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return DataLoader(sampler.dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=torch.cuda.is_available(), worker_init_fn=partial(_seed_worker, rank))
