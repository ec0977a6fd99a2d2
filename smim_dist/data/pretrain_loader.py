"""The pre-training loader a config asks for: FFCV (the default), image files in torch DataLoader workers, or
streamed webdataset shards; all three crop, flip, jitter and mask a sample identically for a given (seed, epoch,
index) and start at any micro-batch of an epoch."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image

from smim_dist.config import Config, ConfigError
from smim_dist.data.augment import PretrainSample, PretrainTransform, stack_samples
from smim_dist.data.demo import MANIFEST, SHARD_PATTERN, ensure_demo_dataset
from smim_dist.data.sampler import ResumableDistributedSampler
from smim_dist.data.shard_counts import load_counts
from smim_dist.data.shards import ShardEpochs, expand_shards

MAX_REPLACEMENTS = 16
DEMO_IMAGE_SIZE = 128
"""stored side of the demo images; crops are resized to model.img_size"""


class ImageListDataset(Dataset):
    """Decodes one file per sample; an undecodable file is replaced by the next decodable one and counted, so a
    corrupt image costs one sample instead of a multi-day run."""

    def __init__(self, root: Path, files: list[str], transform: PretrainTransform):
        self.root, self.files, self.transform = root, files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> PretrainSample:
        epoch, index = key
        for offset in range(MAX_REPLACEMENTS):
            path = self.root / self.files[(index + offset) % len(self.files)]
            try:
                image = decode_image(str(path), mode=ImageReadMode.RGB)
            except (RuntimeError, OSError):
                continue
            sample = self.transform(image, epoch, index)
            sample.corrupt_skipped = offset
            return sample
        raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive undecodable images from {self.root / self.files[index]}; "
                           "the data set looks broken")


def prepare_demo_data(cfg: Config) -> Path:
    """Generate the demo set on first use (safe when several ranks race to do it), saying so: it takes a while."""
    root = Path(cfg.data.path)
    building = not (root / MANIFEST).exists()
    if building:
        print(f"building the demo data set in {root}, once: {cfg.data.demo_images} training images of "
              f"{DEMO_IMAGE_SIZE} px as image files, an FFCV file and webdataset shards ...", file=sys.stderr,
              flush=True)
    start = time.monotonic()
    try:
        ensure_demo_dataset(root, num_train=cfg.data.demo_images, num_val=max(cfg.data.demo_images // 4, 6),
                            size=DEMO_IMAGE_SIZE, seed=0, scenes=cfg.data.demo_scenes)
    except ValueError as err:  # another data set, or another demo set, is already there
        raise ConfigError(f"data.path={cfg.data.path!r}: {err}") from None
    if building:
        print(f"built the demo data set in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return root


def resolve_data(cfg: Config) -> Config:
    """With ``data.demo``, point ``data.path`` at the demo set's rendering that ``data.source`` reads."""
    if not cfg.data.demo:
        return cfg
    root = Path(cfg.data.path)
    path = {"ffcv": root / "train.beton", "imagefolder": root, "webdataset": root / SHARD_PATTERN}[cfg.data.source]
    data = dataclasses.replace(cfg.data, path=str(path), samples_per_epoch=cfg.data.demo_images)
    return dataclasses.replace(cfg, data=data)


def training_files(cfg: Config) -> tuple[Path, list[str]]:
    train = Path(cfg.data.path) / "train"
    classes, class_to_idx = find_classes(str(train))
    samples = make_dataset(str(train), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise ConfigError(f"{train} holds no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    return train, [str(Path(path).relative_to(train)) for path, _ in samples]


def build_pretrain_loader(cfg: Config, rank: int, world_size: int, device: torch.device | None = None):
    """The loader to iterate and the object that positions it (``set_epoch(epoch, start_batch)``,
    ``steps_per_epoch``); for FFCV and shard streams both are the same object. ``device``: FFCV moves batches to a
    GPU in its own CUDA stream. FFCV is imported only for FFCV runs: its import compiles numba code, about 5 s in
    every process."""
    cfg = resolve_data(cfg)
    if cfg.data.source == "ffcv":
        from smim_dist.data.ffcv_loader import FFCVPretrainLoader

        loader = FFCVPretrainLoader(cfg, rank, world_size, device)
        return loader, loader
    if cfg.data.source == "webdataset":
        counts = None
        if cfg.data.shard_counts:
            try:
                counts = load_counts(cfg.data.shard_counts, expand_shards(cfg.data.path))
            except ValueError as err:
                raise ConfigError(str(err)) from err
        stream = ShardEpochs(cfg, rank, world_size, counts)
        return stream, stream
    root, files = training_files(cfg)
    dataset = ImageListDataset(root, files, PretrainTransform(cfg))
    micro_batch = cfg.optim.micro_batch_size(world_size)
    sampler = ResumableDistributedSampler(len(dataset), micro_batch, cfg.optim.accumulation_steps(world_size),
                                          rank, world_size, cfg.seed)
    loader = DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=stack_samples, pin_memory=torch.cuda.is_available(), drop_last=True,
                        persistent_workers=cfg.data.num_workers > 0,
                        prefetch_factor=4 if cfg.data.num_workers > 0 else None)
    return loader, sampler
