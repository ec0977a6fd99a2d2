"""Pre-training loader streaming webdataset tar shards (the img2dataset layout of LAION-scale sets), with the same
batches, augmentation and masks as the file loader.

Everything a batch contains is a pure function of (seed, epoch, rank, world size, worker count, shard list): the
epoch's shard order is a seeded permutation, rank r reads shards[r::world_size], its worker w reads [w::W] of that,
each worker's shuffle buffer is seeded from (seed, epoch, rank, worker), and each sample's crop and mask from
(seed, epoch, hash of its key). The DataLoader takes batches round-robin from its workers, so worker w emits global
batches w, w+W, w+2W, ... of the rank's epoch (shifted on resume, see ``ShardStream.__iter__``).

A batch is always B consecutive items of its worker's shuffled stream. An item whose image is missing, empty or
undecodable keeps its slot: it is replaced by the next decodable image of the same batch, augmented with its own key
(as the file loader replaces a bad file by the next one), and counted in ``corrupt_skipped``. Since no decode can move
a batch boundary, resuming only has to count items, not decode them.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import io
import itertools
import re
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from smim_dist.config import Config, ConfigError
from smim_dist.data.augment import PretrainSample, PretrainTransform, stack_samples
from smim_dist.data.tar_index import IMAGE_EXTENSIONS

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def expand_shards(spec: str) -> list[str]:
    """Shard URLs from a spec: comma/space separated entries, each brace-expanded (``/d/{00000..00127}.tar``).

    A ``pipe:`` spec is one shell command whose spaces are not separators, e.g. ``pipe:aws s3 cp s3://b/{0..9}.tar -``
    gives ten commands; webdataset runs them and reads their stdout.
    """
    spec = spec.strip()
    patterns = [spec] if spec.startswith("pipe:") else re.split(r"[\s,]+(?![^{]*})", spec)
    urls = [url for pattern in patterns if pattern for url in braceexpand(pattern)]
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    return urls


def key_index(key: str) -> int:
    """Stable per-sample integer for ``sample_rng``: the same key gets the same crop and mask on any rank, worker or
    restart, and in any shard order."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def decode_rgb(data: bytes | None) -> Tensor | None:
    """uint8 [3, H, W], or None for a missing, empty or undecodable image."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.array(image.convert("RGB"))
    except DECODE_ERRORS:
        return None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def shuffled(items, size: int, rng: np.random.Generator):
    """Classic shuffle buffer: each arriving item evicts a random resident one; the rest drains in random order."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    yield from (buffer[i] for i in rng.permutation(len(buffer)))


def raw_samples(urls: list[str]):
    """(key, image bytes or None) per tar sample, shards in order; text and metadata are dropped right away so the
    shuffle buffer only holds encoded images."""
    for sample in tarfile_samples({"url": url} for url in urls):
        yield sample["__key__"], next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


class ShardStream(IterableDataset):
    """One rank's share of an epoch. Without ``batches_per_epoch`` each worker reads its shards once and stops at
    its last whole batch; with it the rank yields exactly that many micro-batches, a worker that runs dry reading its
    shards again with a fresh shuffle (every rank must take the same number of steps under DDP)."""

    def __init__(self, cfg: Config, shards: list[str], rank: int, batch_size: int, epoch: int, start_batch: int,
                 batches_per_epoch: int | None, shuffle_buffer: int):
        self.transform = PretrainTransform(cfg)
        self.seed, self.batch_size = cfg.seed, batch_size
        self.shards, self.rank, self.epoch = shards, rank, epoch
        self.start_batch, self.batches_per_epoch, self.shuffle_buffer = start_batch, batches_per_epoch, shuffle_buffer

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a shard stream read once has no known length; pass batches_per_epoch")
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def items(self, urls: list[str], part: int):
        for read in itertools.count() if self.batches_per_epoch is not None else [0]:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, part, read])
            count = 0
            for count, item in enumerate(shuffled(raw_samples(urls), self.shuffle_buffer, rng), 1):
                yield item
            if count == 0:
                raise RuntimeError(f"shards {urls} hold no samples")

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # The DataLoader's round-robin starts at worker 0 however far in the epoch we are, so a resumed worker plays
        # the part (shards, shuffle seed, batch numbers) of the worker that produced global batch start_batch + worker.
        part = (worker + self.start_batch) % workers
        stop = self.batches_per_epoch if self.batches_per_epoch is not None else float("inf")
        mine = itertools.count(part, workers)
        items = self.items(self.shards[part::workers], part)
        # Fast-forward: the items of this part's batches before start_batch are read from the tars and shuffled but
        # never decoded or augmented, so a resume costs re-reading about start_batch/W batches' bytes per worker.
        skipped = len(range(part, min(self.start_batch, stop), workers))
        collections.deque(itertools.islice(items, skipped * self.batch_size), maxlen=0)
        for number in itertools.islice(mine, skipped, None):
            if number >= stop:
                return
            chunk = list(itertools.islice(items, self.batch_size))
            if len(chunk) < self.batch_size:
                return
            yield from self.assemble(chunk)

    def assemble(self, chunk: list[tuple[str, bytes | None]]) -> list[PretrainSample]:
        images = [decode_rgb(data) for _, data in chunk]
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise RuntimeError(f"all {len(chunk)} images of a batch are missing or undecodable (keys "
                               f"{[key for key, _ in chunk]}); the shards look broken")
        samples = []
        for slot, (key, _) in enumerate(chunk):
            source = slot if images[slot] is not None else good[bisect.bisect(good, slot) % len(good)]
            sample = self.transform(images[source], self.epoch, key_index(key))
            sample.corrupt_skipped = int(source != slot)
            samples.append(sample)
        return samples


def check_shards(spec: str, world_size: int, num_workers: int) -> list[str]:
    """The shard URLs of a spec, refusing (before any training) a spec that names missing local files or has too
    few shards for every rank's workers to get one."""
    urls = expand_shards(spec)
    missing = [url for url in urls if not url.startswith("pipe:") and "://" not in url and not Path(url).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]!r}")
    workers = max(num_workers, 1)
    if len(urls) < world_size * workers:
        raise ValueError(f"{len(urls)} shards cannot feed {world_size} ranks x {workers} loader workers; at least "
                         f"{world_size * workers} are needed (split the shards finer or lower data.num_workers)")
    return urls


def build_shard_loader(cfg: Config, shards: str, rank: int, world_size: int, epoch: int, start_batch: int = 0, *,
                       batches_per_epoch: int | None = None, shuffle_buffer: int = 1000) -> DataLoader:
    """Micro-batches (``stack_samples`` dicts) of this rank's share of ``epoch``, from micro-batch ``start_batch`` on.

    ``batches_per_epoch`` fixes the micro-batches per rank (resume is then exact for any ``start_batch``, and ``len``
    works). Without it, an epoch is one read of the shards and resume is exact only for a ``start_batch`` before the
    first worker runs out of data, since after that the round-robin skips that worker.
    """
    urls = check_shards(shards, world_size, cfg.data.num_workers)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside world_size={world_size}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be at least 1")
    if batches_per_epoch is not None and batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch={batches_per_epoch} must be at least 1")
    if start_batch < 0 or (batches_per_epoch is not None and start_batch > batches_per_epoch):
        raise ValueError(f"start_batch={start_batch} outside this epoch's {batches_per_epoch} micro-batches")
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(urls))
    mine = [urls[i] for i in order[rank::world_size]]
    micro_batch = cfg.optim.micro_batch_size(world_size)
    dataset = ShardStream(cfg, mine, rank, micro_batch, epoch, start_batch, batches_per_epoch, shuffle_buffer)
    return DataLoader(dataset, batch_size=micro_batch, num_workers=cfg.data.num_workers,
                      collate_fn=stack_samples, pin_memory=torch.cuda.is_available(), drop_last=True,
                      prefetch_factor=4 if cfg.data.num_workers > 0 else None)


class ShardEpochs:
    """The shard stream behind the sampler interface the trainer uses (``set_epoch``, ``steps_per_epoch``): an epoch
    is ``data.samples_per_epoch`` samples, so every rank takes the same number of steps and resume is exact."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        try:
            check_shards(cfg.data.path, world_size, cfg.data.num_workers)
        except ValueError as err:
            raise ConfigError(f"data.path={cfg.data.path!r}: {err}") from err
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.steps_per_epoch = cfg.data.samples_per_epoch // cfg.optim.global_batch
        self.batches_per_epoch = self.steps_per_epoch * cfg.optim.accumulation_steps(world_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        return iter(build_shard_loader(self.cfg, self.cfg.data.path, self.rank, self.world_size, self.epoch,
                                       self.start_batch, batches_per_epoch=self.batches_per_epoch,
                                       shuffle_buffer=self.cfg.data.shuffle_buffer))
