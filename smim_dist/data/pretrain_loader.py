"""Pre-training loader over a list of image files (the embedded demo set), with per-sample augmentation and masking
in the worker processes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image

from smim_dist.config import Config
from smim_dist.data.augment import PretrainSample, PretrainTransform, stack_samples
from smim_dist.data.demo import ensure_demo_dataset, load_manifest
from smim_dist.data.sampler import ResumableDistributedSampler


class ImageListDataset(Dataset):
    def __init__(self, root: Path, files: list[str], transform: PretrainTransform):
        self.root, self.files, self.transform = root, files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> PretrainSample:
        epoch, index = key
        image = decode_image(str(self.root / self.files[index]), mode=ImageReadMode.RGB)
        return self.transform(image, epoch, index)


def prepare_demo_data(cfg: Config) -> Path:
    """Generate the demo set on first use (safe when several ranks race to do it)."""
    return ensure_demo_dataset(cfg.data.path, num_train=cfg.data.demo_images, num_val=max(cfg.data.demo_images // 4, 6),
                               size=max(96, cfg.model.img_size * 3 // 2), seed=0)


def build_pretrain_loader(cfg: Config, rank: int, world_size: int) -> tuple[DataLoader, ResumableDistributedSampler]:
    root = Path(cfg.data.path)
    files = [entry["image"] for entry in load_manifest(root)["train"]]
    dataset = ImageListDataset(root, files, PretrainTransform(cfg))
    sampler = ResumableDistributedSampler(len(dataset), cfg.optim.micro_batch, cfg.optim.accumulation_steps(world_size),
                                          rank, world_size, cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.optim.micro_batch, sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=stack_samples, pin_memory=torch.cuda.is_available(), drop_last=True,
                        persistent_workers=cfg.data.num_workers > 0,
                        prefetch_factor=4 if cfg.data.num_workers > 0 else None)
    return loader, sampler
