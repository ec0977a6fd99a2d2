"""Pre-training loader streaming webdataset tar shards (the img2dataset layout of LAION-scale sets), with the same
batches, augmentation and masks as the file loader.

Everything a batch contains is a pure function of (seed, epoch, rank, world size, worker count, shard list): the
epoch's shard order is a seeded permutation, rank r reads shards[r::world_size], its worker w reads [w::W] of that,
each worker's shuffle windows are seeded from (seed, epoch, rank, worker, read, window), and each sample's crop and
mask from (seed, epoch, hash of its key). The DataLoader takes batches round-robin from its workers, so worker w emits
global batches w, w+W, w+2W, ... of the rank's epoch (shifted on resume, see ``ShardStream.__iter__``).

A batch is always B consecutive items of its worker's shuffled stream. An item whose image is missing, empty or
undecodable keeps its slot: it is replaced by the next decodable image of the same batch, augmented with its own key
(as the file loader replaces a bad file by the next one), and counted in ``corrupt_skipped``. Since no decode can move
a batch boundary, resuming only has to count items, not decode them.

The shuffle permutes windows of ``shuffle_buffer`` consecutive items (a rolling buffer would make each item depend on
everything read before it), so a resumed worker starts reading at the first item of the window it stopped in: local
``.tar`` shards before that are passed over by their headers alone and the skipped samples of its shard are never
read; other sources (``pipe:``, URLs, compressed tars) are read through up to there.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import re
import tarfile
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


def raw_samples(urls: list[str]):
    """(key, image bytes or None) per tar sample, shards in order; text and metadata are dropped right away so the
    shuffle window only holds encoded images."""
    for sample in tarfile_samples({"url": url} for url in urls):
        yield sample["__key__"], image_of(sample)


def image_of(members: dict):
    """A sample's image member: the first of IMAGE_EXTENSIONS it has, or None."""
    return next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)


KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
METADATA = re.compile(r"__[^/]*__($|/)")


def tar_samples(path: str) -> list[tuple[str, tuple[int, int] | None]]:
    """A local tar's samples as webdataset groups them (regular files, its metadata names skipped, consecutive members
    sharing the name up to the basename's first dot; ``webdataset.tariterators``), each as its key and the (offset,
    size) of its image or None, from the headers alone. Unbuffered, so that a header costs a 512-byte read."""
    groups: list[tuple[str, dict]] = []
    with open(path, "rb", buffering=0) as file, tarfile.open(fileobj=file, mode="r:") as tar:
        for info in tar:
            name, match = info.name, KEY_AND_SUFFIX.match(info.name)
            if (not info.isreg() or not match or METADATA.match(name)
                    or ("/" not in name and name.startswith("__") and name.endswith("__"))):
                continue
            if not groups or groups[-1][0] != match.group(1):
                groups.append((match.group(1), {}))
            suffix = match.group(2).lower()
            if suffix in groups[-1][1]:
                raise ValueError(f"{path}: {name}: duplicate file name in tar file")  # as webdataset refuses it
            groups[-1][1][suffix] = (info.offset_data, info.size)
    return [(key, image_of(members)) for key, members in groups]


def indexed(url: str) -> bool:
    return url.endswith(".tar") and not url.startswith("pipe:") and "://" not in url


class ShardPass:
    """One read of a worker's shards in order, as (key, image bytes or None) items, from item ``skip`` on; ``length``
    counts the items of the shards it has gone through, skipped ones included. A shard with a known count (``counts``,
    from ``data.shard_counts``) that lies wholly before ``skip`` is not opened."""

    def __init__(self, urls: list[str], skip: int, counts: dict[str, int] | None = None):
        self.urls, self.skip, self.counts, self.length = urls, skip, counts or {}, 0

    def __iter__(self):
        skip = self.skip
        for url in self.urls:
            known, before = self.counts.get(url), self.length
            if known is not None and skip >= known:
                self.length += known
                skip -= known
                continue
            yield from self._shard(url, skip)
            skip = max(0, self.skip - self.length)
            if known is not None and self.length - before != known:
                raise ValueError(f"{url} holds {self.length - before} samples, not the {known} data.shard_counts "
                                 "says; count the shards again (smim-convert count)")

    def _shard(self, url: str, skip: int):
        if not indexed(url):
            for number, (key, data) in enumerate(raw_samples([url])):
                self.length += 1
                if number >= skip:
                    yield key, data
            return
        samples = tar_samples(url)
        self.length += len(samples)
        with open(url, "rb") as file:
            for key, member in samples[skip:]:
                yield key, None if member is None else _read_at(file, *member)


def _read_at(file, offset: int, size: int) -> bytes:
    file.seek(offset)
    return file.read(size)


def windows(items, size: int):
    """Lists of ``size`` consecutive items (the last may be shorter)."""
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


class ShardStream(IterableDataset):
    """One rank's share of an epoch. Without ``batches_per_epoch`` each worker reads its shards once and stops at
    its last whole batch; with it the rank yields exactly that many micro-batches, a worker that runs dry reading its
    shards again with a fresh shuffle (every rank must take the same number of steps under DDP)."""

    def __init__(self, cfg: Config, shards: list[str], rank: int, batch_size: int, epoch: int, start_batch: int,
                 batches_per_epoch: int | None, shuffle_buffer: int, counts: dict[str, int] | None = None):
        self.transform = PretrainTransform(cfg)
        self.seed, self.batch_size = cfg.seed, batch_size
        self.shards, self.rank, self.epoch, self.counts = shards, rank, epoch, counts
        self.start_batch, self.batches_per_epoch, self.shuffle_buffer = start_batch, batches_per_epoch, shuffle_buffer

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a shard stream read once has no known length; pass batches_per_epoch")
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def items(self, urls: list[str], part: int, start: int = 0):
        """This worker part's shuffled stream from item ``start`` on: each read of its shards is cut into windows of
        ``shuffle_buffer`` items, each window permuted by (seed, epoch, rank, part, read, window)."""
        remaining = start
        for read in itertools.count() if self.batches_per_epoch is not None else [0]:
            first = remaining // self.shuffle_buffer
            source = ShardPass(urls, first * self.shuffle_buffer, self.counts)
            drop = remaining - first * self.shuffle_buffer
            for number, window in enumerate(windows(source, self.shuffle_buffer), first):
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, part, read, number])
                yield from (window[i] for i in rng.permutation(len(window))[drop:])
                drop = 0
            if source.length == 0:
                raise RuntimeError(f"shards {urls} hold no samples")
            remaining = max(0, remaining - source.length)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # The DataLoader's round-robin starts at worker 0 however far in the epoch we are, so a resumed worker plays
        # the part (shards, shuffle seed, batch numbers) of the worker that produced global batch start_batch + worker.
        part = (worker + self.start_batch) % workers
        stop = self.batches_per_epoch if self.batches_per_epoch is not None else float("inf")
        mine = itertools.count(part, workers)
        skipped = len(range(part, min(self.start_batch, stop), workers))
        items = self.items(self.shards[part::workers], part, skipped * self.batch_size)
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
                       batches_per_epoch: int | None = None, shuffle_buffer: int = 1000,
                       counts: dict[str, int] | None = None) -> DataLoader:
    """Micro-batches (``stack_samples`` dicts) of this rank's share of ``epoch``, from micro-batch ``start_batch`` on.

    ``batches_per_epoch`` fixes the micro-batches per rank (resume is then exact for any ``start_batch``, and ``len``
    works). Without it, an epoch is one read of the shards and resume is exact only for a ``start_batch`` before the
    first worker runs out of data, since after that the round-robin skips that worker. ``counts``: samples per shard
    URL (``smim_dist.data.shard_counts``), so that a resume opens no shard before its window's.
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
    dataset = ShardStream(cfg, mine, rank, micro_batch, epoch, start_batch, batches_per_epoch, shuffle_buffer, counts)
    return DataLoader(dataset, batch_size=micro_batch, num_workers=cfg.data.num_workers,
                      collate_fn=stack_samples, pin_memory=torch.cuda.is_available(), drop_last=True,
                      prefetch_factor=4 if cfg.data.num_workers > 0 else None)


class ShardEpochs:
    """The shard stream behind the sampler interface the trainer uses (``set_epoch``, ``steps_per_epoch``): an epoch
    is ``data.samples_per_epoch`` samples, so every rank takes the same number of steps and resume is exact."""

    def __init__(self, cfg: Config, rank: int, world_size: int, counts: dict[str, int] | None = None):
        try:
            check_shards(cfg.data.path, world_size, cfg.data.num_workers)
        except ValueError as err:
            raise ConfigError(f"data.path={cfg.data.path!r}: {err}") from err
        self.cfg, self.rank, self.world_size, self.counts = cfg, rank, world_size, counts
        self.steps_per_epoch = cfg.data.samples_per_epoch // cfg.optim.global_batch
        self.batches_per_epoch = self.steps_per_epoch * cfg.optim.accumulation_steps(world_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        return iter(build_shard_loader(self.cfg, self.cfg.data.path, self.rank, self.world_size, self.epoch,
                                       self.start_batch, batches_per_epoch=self.batches_per_epoch,
                                       shuffle_buffer=self.cfg.data.shuffle_buffer, counts=self.counts))
