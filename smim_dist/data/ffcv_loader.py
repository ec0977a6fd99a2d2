"""FFCV loaders: pre-training batches from a ``.beton`` written by ``smim-convert``, centre-cropped evaluation
batches, and image + label-map batches for segmentation evaluation.

Pre-training reads in the order of ``ResumableDistributedSampler`` (each rank a disjoint share, a function of
(seed, epoch), startable at any micro-batch), so FFCV serves exactly the samples the image-file loader would, with the
same crops and masks, while decoding in compiled threads instead of Python worker processes.
"""

from __future__ import annotations

import contextlib
import queue
from pathlib import Path

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder

from smim_dist.config import Config, ConfigError
from smim_dist.data.beton_check import open_beton
from smim_dist.data.ffcv_union import UnionLoader
from smim_dist.data.ffcv_ops import EpochClock, ResizeDecoder, SeededCropDecoder, SeededPatchMasks
from smim_dist.data.sampler import ResumableDistributedSampler
from smim_dist.data.sharded_beton import ShardedReader, is_sharded
from smim_dist.data.masking import build_mask_generator
from smim_dist.vit_sizes import image_grid

REQUIRED_FIELDS = {"image": RGBImageField, "index": IntField}
MEDIAN_SAMPLES = 100_000
"""images whose sizes estimate a data set's median size: evenly spaced, so the check costs the same at any scale"""
EVAL_CROP_RATIO = 224 / 256
"""centre crop = this share of the shorter side, as in the standard ImageNet evaluation"""


def check_beton(path: str | Path, img_size: int, min_samples: int, verify: bool = False) -> Reader | ShardedReader:
    """Open a .beton or a sharded data set (a folder) and check it can feed pre-training (``verify``: its checksums
    too, where that is cheap); errors name the file and what to do."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"data.path={str(path)!r} does not exist; data.source=ffcv reads a .beton file written by "
                          "`smim-convert imagefolder SRC OUT.beton` (or set data.demo=true for the embedded demo set)")
    reader = ShardedReader(path, verify) if is_sharded(path) else open_beton(path, verify)
    fields = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
    for name, kind in REQUIRED_FIELDS.items():
        if not isinstance(reader.handlers.get(name), kind):
            raise ConfigError(f"{path} has fields {fields}; pre-training needs {name!r} as an {kind.__name__}. "
                              "Write it with smim-convert, which stores image, label and index")
    if reader.num_samples < min_samples:
        raise ConfigError(f"{path} holds {reader.num_samples} images, fewer than one global batch of {min_samples}; "
                          "lower optim.global_batch or add data")
    image = reader.metadata["f" + str(list(reader.handlers).index("image"))]
    image = image[:: max(1, len(image) // MEDIAN_SAMPLES)]
    longest = np.median(np.maximum(image["height"], image["width"]))
    if longest < img_size:
        raise ConfigError(f"the images in {path} have a median longest side of {longest:.0f} px, smaller than "
                          f"model.img_size={img_size}: crops would be upsampled blur. Re-convert with "
                          f"--max-side >= {img_size} or lower model.img_size")
    return reader


class _SamplerOrder(TraversalOrder):
    """Hands FFCV the sampler's order. FFCV instantiates the order it is given (``order(loader)``) yet only accepts
    ``TraversalOrder`` instances, so this instance returns itself when called."""

    def __init__(self, sampler: ResumableDistributedSampler):
        self.sampler = sampler

    def __call__(self, loader: Loader) -> "_SamplerOrder":
        self.loader = loader
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.sampler.rank_indices()


def _threads(num_workers: int) -> int:
    return max(1, num_workers)


@contextlib.contextmanager
def _torch_threads_kept():
    """FFCV sets torch's intra-op threads to its own decoding threads when it builds a loader or starts an epoch;
    training keeps its own setting."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _new_loader(source: str | Path | Reader | ShardedReader, **kwargs) -> Loader:
    """FFCV's loader of a .beton, or ``UnionLoader`` for a sharded data set; ``source`` is its path or the reader
    ``check_beton`` opened (a sharded set's is used as it is; FFCV's own loader opens its file again)."""
    with _torch_threads_kept():
        if isinstance(source, ShardedReader):
            return UnionLoader(source, **kwargs)
        return Loader(source.file_name if isinstance(source, Reader) else str(source), **kwargs)


class FFCVPretrainLoader:
    """Iterates one epoch per ``iter()``; ``set_epoch(epoch, start_batch)`` positions it, as for the sampler."""

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device | None = None):
        reader = check_beton(cfg.data.path, cfg.model.img_size, cfg.optim.global_batch, verify=rank == 0)
        self.sampler = ResumableDistributedSampler(reader.num_samples, cfg.optim.micro_batch_size(world_size),
                                                   cfg.optim.accumulation_steps(world_size), rank, world_size, cfg.seed)
        self.clock = EpochClock()
        masks = build_mask_generator(cfg.mask.kind, image_grid(cfg.model.img_size, cfg.model.patch_size),
                                     cfg.mask.ratio)
        self.num_visible = masks.num_patches - masks.num_masked
        to_device = [ToDevice(device, non_blocking=True)] if device is not None and device.type == "cuda" else []
        data = cfg.data
        decoder = SeededCropDecoder(cfg.model.img_size, cfg.seed, self.clock, data.crop_scale, data.crop_ratio,
                                    data.hflip, data.color_jitter, getattr(reader, "largest_image", None))
        self.loader = _new_loader(
            reader, batch_size=self.sampler.micro_batch, num_workers=_threads(data.num_workers),
            order=_SamplerOrder(self.sampler), drop_last=True, batches_ahead=3, pipelines={
                "image": PipelineSpec("image", decoder, [ToTensor(), *to_device, ToTorchImage(channels_last=False)]),
                "label": None,
                "index": [IntDecoder(), ToTensor()],
                "mask": PipelineSpec("index", IntDecoder(), [SeededPatchMasks(masks, cfg.seed, self.clock),
                                                             ToTensor(), *to_device]),
            })
        self._epoch_iterator = None

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._stop_loading()
        self.sampler.set_epoch(epoch, start_batch)
        self.clock.epoch = epoch

    def _stop_loading(self) -> None:
        """Wait out an abandoned epoch's loading thread, which would otherwise read the clock after it moved. Once
        closed, FFCV's thread gives up a batch it cannot queue within 0.5 s; only its last put (the end of the epoch)
        waits for room, so a batch is taken off only while it still runs after that: taking them off as fast as it
        queues them would let it load the rest of the epoch first."""
        if self._epoch_iterator is not None:
            self._epoch_iterator.close()
            while self._epoch_iterator.is_alive():
                self._epoch_iterator.join(timeout=1.0)
                with contextlib.suppress(queue.Empty):
                    self._epoch_iterator.output_queue.get_nowait()
            self._epoch_iterator = None

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.micro_batch

    def __iter__(self):
        self._stop_loading()
        self._epoch_iterator = _start_epoch(self.loader)
        for images, indices, masks in _batches(self._epoch_iterator):
            yield {"images": images, "index": indices[:, 0], "visible": masks[:, : self.num_visible].contiguous(),
                   "masked": masks[:, self.num_visible:].contiguous(),
                   "corrupt_skipped": torch.zeros((), dtype=torch.long)}
        self._epoch_iterator = None


def _start_epoch(loader: Loader) -> EpochIterator:
    with _torch_threads_kept():
        return iter(loader)


def _batches(iterator: EpochIterator):
    """FFCV's ``EpochIterator.__next__``, except that a loading thread that died (its traceback is printed) raises
    here instead of leaving training blocked forever on an empty queue."""
    while True:
        try:
            item = iterator.output_queue.get(timeout=1.0)
        except queue.Empty:
            if not iterator.is_alive():
                raise RuntimeError("FFCV's loading thread died; its traceback is printed above") from None
            continue
        if item is None:
            iterator.close()
            return
        slot, result = item
        if torch.cuda.is_available():
            iterator.current_stream.wait_stream(iterator.cuda_streams[slot])
        yield result


class FFCVEvalLoader:
    """Centre crops (``EVAL_CROP_RATIO`` of the shorter side, resized to ``img_size``) with labels and indices, in
    file order; rank r reads samples r, r + world_size, ... so ranks together cover every sample exactly once."""

    def __init__(self, path: str | Path, img_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 4):
        reader = ShardedReader(path) if is_sharded(path) else open_beton(path)
        self.loader = _new_loader(
            reader, batch_size=batch_size, num_workers=_threads(num_workers), order=OrderOption.SEQUENTIAL,
            drop_last=False, indices=np.arange(rank, reader.num_samples, world_size, dtype=np.uint64),
            pipelines={"image": [CenterCropRGBImageDecoder((img_size, img_size), EVAL_CROP_RATIO), ToTensor(),
                                 ToTorchImage(channels_last=False)],
                       "label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]})

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return _batches(_start_epoch(self.loader))


class FFCVSegmentationLoader:
    """Images and label maps resized whole to ``img_size`` x ``img_size`` (the image with INTER_AREA, the map
    nearest-neighbour), in file order, from a .beton written by ``smim-convert segmentation``: batches of
    (images uint8 [B, 3, S, S], label maps int64 [B, S, S], indices [B, 1]). Rank r reads samples r, r + world_size,
    ..., so ranks together cover every sample exactly once. The images are FFCV's reused buffers, as in
    ``FFCVEvalLoader``; the label maps are fresh tensors."""

    def __init__(self, path: str | Path, img_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 4):
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"segmentation data {str(path)!r} does not exist; write it with `smim-convert "
                              "segmentation IMAGES MASKS OUT.beton`")
        reader = open_beton(path)
        kinds = {"image": RGBImageField, "mask": RGBImageField, "index": IntField}
        if not all(isinstance(reader.handlers.get(name), kind) for name, kind in kinds.items()):
            fields = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
            raise ConfigError(f"{path} has fields {fields}; segmentation needs 'image' and 'mask' RGBImageFields and "
                              "an 'index' IntField. Write it with `smim-convert segmentation IMAGES MASKS OUT.beton`")
        # FFCV returns the outputs in the file's field order
        self._order = [name for name in reader.handlers if name in kinds]
        self.loader = _new_loader(
            path, batch_size=batch_size, num_workers=_threads(num_workers), order=OrderOption.SEQUENTIAL,
            drop_last=False, indices=np.arange(rank, reader.num_samples, world_size, dtype=np.uint64),
            pipelines={**{name: None for name in reader.handlers},
                       "image": PipelineSpec("image", ResizeDecoder(img_size),
                                             [ToTensor(), ToTorchImage(channels_last=False)]),
                       "mask": PipelineSpec("mask", ResizeDecoder(img_size, nearest=True), [ToTensor()]),
                       "index": [IntDecoder(), ToTensor()]})

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in _batches(_start_epoch(self.loader)):
            outputs = dict(zip(self._order, batch))
            yield outputs["image"], outputs["mask"][..., 0].long(), outputs["index"]
