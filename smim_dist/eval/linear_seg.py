"""Linear segmentation of frozen features after block K: the paper's PascalVOC linear mIoU (Table 6, Table 1).

The patch tokens of the raw residual stream after block K (1-based; the paper reads block 6 of ViT-B at 448x448 input)
form a ``[D, h, w]`` map; a 1x1 convolution (a linear classifier per patch) turns it into class logits, which are
upsampled bilinearly to the fixed 100x100 of the label maps (resized nearest-neighbour) and trained with cross-entropy
that ignores VOC's 255, by SGD (momentum 0.9, lr 0.01, x0.1 after two thirds of the epochs) for 25 epochs. A
parameter-free BatchNorm in front of the convolution evens out feature scales as in the linear probe; at inference it
is a fixed affine map, so the head stays linear. Scores: mIoU over the classes present in the val predictions or
labels (the confusion-matrix mIoU of mmsegmentation) and pixel accuracy, both at the label resolution.

The recipe has no augmentation and the encoder is frozen, so each split's feature maps are encoded once and cached in
the eval folder (``seg/``, bf16); the head trains on the cache and saves its state after every epoch, so a rerun skips
the encoder and an interrupted run continues where it stopped. One process: the encoding is one pass over VOC.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from smim_dist.config import Config, ConfigError
from smim_dist.data.batch import IMAGENET_MEAN, IMAGENET_STD
from smim_dist.data.pretrain_loader import prepare_demo_data
from smim_dist.eval.data import IGNORE_INDEX, SegmentationSplit, label_maps, segmentation_splits, whole_image_loader
from smim_dist.eval.features import check_block, default_device, rank_and_world, resolve_eval_run
from smim_dist.eval.options import recipe_of
from smim_dist.eval.seg_metrics import confusion_matrix, segmentation_scores
from smim_dist.eval.results import (RESULTS_FILE, checkpoint_header, merge_results, prior_work, read_cache,
                                    results_folder, save_progress)
from smim_dist.files import replace_atomically
from smim_dist.engine.checkpoint import consolidated_state_dict
from smim_dist.models.timm_export import create_timm_encoder, encoder_state_dict

SEG_DIR = "seg"


@dataclasses.dataclass(frozen=True)
class SegRecipe:
    """The paper's linear-segmentation recipe by default."""
    epochs: int = 25
    batch_size: int = 16
    lr: float = 0.01
    """SGD learning rate, a tenth of it from two thirds of the epochs on"""
    img_size: int = 448
    """input side in pixels (the position embedding is resampled to it)"""
    label_size: int = 100
    """side of the label maps the loss and the scores are computed at"""

    @property
    def decay_epoch(self) -> int:
        """The epoch from which the learning rate is a tenth (two thirds in)."""
        return round(2 * self.epochs / 3)

    def check(self, patch_size: int) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.label_size < 1:
            raise ConfigError(f"--epochs {self.epochs} --batch-size {self.batch_size} label size {self.label_size}: "
                              "each must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: the learning rate must be positive")
        if self.img_size < patch_size or self.img_size % patch_size:
            raise ConfigError(f"--img-size {self.img_size}: must be a multiple of the patch size {patch_size}")


def seg_head(dim: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Sequential:
    conv = nn.Conv2d(dim, num_classes, kernel_size=1)
    nn.init.trunc_normal_(conv.weight, std=0.01, generator=generator)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.BatchNorm2d(dim, affine=False, eps=1e-6), conv)


def _logits(head: nn.Module, maps: Tensor, size: int) -> Tensor:
    return F.interpolate(head(maps.float()), size=(size, size), mode="bilinear", align_corners=False)


def train_seg_head(maps: Tensor, labels: Tensor, num_classes: int, recipe: SegRecipe, seed: int = 0,
                   resume: dict | None = None, save: Callable[[dict], None] | None = None,
                   say: Callable[[str], None] = print, device: torch.device | None = None) -> nn.Sequential:
    """The head on feature maps ``[N, D, h, w]`` and label maps ``[N, L, L]``; epochs visit the samples in an order
    seeded by (seed, epoch), so a run resumed from ``resume`` (the state ``save`` got after an epoch) ends where an
    uninterrupted one does. Batches move to ``device`` one at a time: VOC's cached maps need not fit on it."""
    device = device or maps.device
    head = seg_head(maps.shape[1], num_classes, torch.Generator().manual_seed(seed)).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=recipe.lr, momentum=0.9)
    first_epoch, history = 0, []
    if resume is not None:
        head.load_state_dict(resume["head"])
        optimizer.load_state_dict(resume["optimizer"])
        first_epoch, history = resume["epoch"], resume["history"]
    head.train()
    for epoch in range(first_epoch, recipe.epochs):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * (0.1 if epoch >= recipe.decay_epoch else 1.0)
        order = torch.randperm(len(maps), generator=torch.Generator().manual_seed(seed + epoch))
        total = torch.zeros((), device=device)
        for batch in order.split(recipe.batch_size):
            logits = _logits(head, maps[batch].to(device), recipe.label_size)
            loss = F.cross_entropy(logits, labels[batch].to(device).long(), ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(batch) / len(maps)
        history.append({"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                        "train_loss": round(total.item(), 6)})
        if save is not None:
            save({"epoch": epoch + 1, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                  "history": history})
        say(f"linear segmentation epoch {epoch + 1}/{recipe.epochs}: train loss {history[-1]['train_loss']:.4f}")
    return head


@torch.no_grad()
def evaluate_head(head: nn.Module, maps: Tensor, labels: Tensor, num_classes: int, batch_size: int,
                  device: torch.device) -> dict:
    head.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for batch in torch.arange(len(maps)).split(batch_size):
        predictions = _logits(head, maps[batch].to(device), labels.shape[-1]).argmax(1)
        confusion += confusion_matrix(predictions, labels[batch].to(device), num_classes)
    return segmentation_scores(confusion)


def load_seg_encoder(checkpoint: Path, cfg: Config, img_size: int, device: torch.device) -> VisionTransformer:
    """The frozen encoder for ``img_size`` inputs: the position embedding (patches only) is resampled bicubically
    from the pre-training grid, as timm does when fine-tuning at a higher resolution."""
    state = encoder_state_dict(consolidated_state_dict(checkpoint))
    old, new = cfg.model.img_size // cfg.model.patch_size, img_size // cfg.model.patch_size
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [new, new], [old, old], num_prefix_tokens=0)
    encoder = create_timm_encoder(dataclasses.replace(cfg.model, img_size=img_size), state)
    return encoder.eval().requires_grad_(False).to(device)  # type: ignore[return-value]


@torch.no_grad()
def encode_maps(encoder: VisionTransformer, split: SegmentationSplit, block: int, img_size: int, batch_size: int,
                num_workers: int, device: torch.device) -> Tensor:
    """bf16 ``[N, D, h, w]`` patch-token maps after ``block`` (1-based), in sample order."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    parts = []
    for images, _ in whole_image_loader(split, img_size, batch_size, num_workers):
        pixels = (images.to(device).float() - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            maps = encoder.forward_intermediates(pixels, indices=[block - 1], stop_early=True, output_fmt="NCHW",
                                                 intermediates_only=True)[0]
        parts.append(maps.to(torch.bfloat16).cpu())
    return torch.cat(parts)


@dataclasses.dataclass(frozen=True)
class SegOptions(SegRecipe):
    """The recipe, and what it reads and how: the paper reads block 6 of ViT-B's 12."""
    data: str | None = None
    """a PascalVOC tree (VOCdevkit/VOC2012) or a demo set; None: the run's demo set"""
    num_classes: int | None = None
    """classes, ignore index 255 aside; None: those of the data (VOC 21, demo 7)"""
    block: int = 6
    """1-based block whose feature map is read"""
    encode_batch_size: int = 16
    """images per forward pass"""
    force: bool = False
    """start over, re-encoding too, even if results for these settings are stored"""


def run_linear_seg(checkpoint: Path, out: Path | None = None, options: SegOptions = SegOptions(),
                   overrides: Sequence[str] = (), device: torch.device | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Segment with a linear head on a run's latest (or a ``checkpoints/<tag>``) checkpoint and store the ``seg``
    entry of ``results.json`` in ``out`` (default ``<run_dir>/eval/<tag>/``); returns the whole results file. Every
    input, label maps included, is checked before the model is loaded; stored results for the same settings are
    returned at once, ``options.force`` starts over."""
    start = time.perf_counter()
    recipe, block, data, force = recipe_of(options, SegRecipe), options.block, options.data, options.force
    if rank_and_world()[1] > 1:
        raise ConfigError("linear segmentation runs in one process; start it without torchrun")
    checkpoint, cfg = resolve_eval_run(Path(checkpoint), overrides)
    check_block(block, cfg)
    recipe.check(cfg.model.patch_size)
    if options.encode_batch_size < 1:
        raise ConfigError(f"--encode-batch-size {options.encode_batch_size}: a batch needs at least 1 image")
    if data is None and not cfg.data.demo:
        raise ConfigError("the run's data is not the demo set; pass --data with a PascalVOC tree (VOCdevkit/VOC2012)")
    root = Path(data) if data is not None else prepare_demo_data(cfg)
    train, val, found_classes = segmentation_splits(root)
    num_classes = options.num_classes or found_classes
    if num_classes < 2:
        raise ConfigError(f"--num-classes {num_classes}: segmentation needs at least 2 classes")
    train_y, val_y = (label_maps(split, recipe.label_size, num_classes) for split in (train, val))
    folder = results_folder(checkpoint, out)
    settings = {"block": block, **dataclasses.asdict(recipe), "num_classes": num_classes, "seed": cfg.seed,
                "data": str(root.resolve())}
    previous, state_file, state_key, resume = prior_work(folder, "seg", "linear segmentation", SEG_DIR,
                                                         checkpoint.name, settings, ("miou",), force, log)
    if previous is not None:
        return previous

    device = device or default_device()
    train_x, val_x = _cached_maps(checkpoint, cfg, (train, val), block, recipe.img_size, folder,
                                  options.encode_batch_size, device, not force, log)
    if resume is not None:
        log(f"linear segmentation resumed after epoch {resume['epoch']} from {state_file}")

    def save(state: dict) -> None:
        save_progress(state_file, {"settings": state_key, **state})

    head = train_seg_head(train_x, train_y, num_classes, recipe, cfg.seed, resume, save, log, device)
    scores = evaluate_head(head, val_x, val_y, num_classes, recipe.batch_size, device)
    entry = {**settings, **scores, "train_samples": len(train.pairs), "val_samples": len(val.pairs),
             "seconds": round(time.perf_counter() - start, 2)}
    results = merge_results(folder, checkpoint_header(checkpoint), "seg", entry)
    log(f"linear segmentation (block {block}) of {checkpoint} (step {results['step']}): mIoU {scores['miou']:.4f}, "
        f"pixel accuracy {scores['pixel_acc']:.4f}; wrote {folder / RESULTS_FILE}")
    return results


def _cached_maps(checkpoint: Path, cfg: Config, splits: Sequence[SegmentationSplit], block: int, img_size: int,
                 folder: Path, batch_size: int, device: torch.device, use_cache: bool,
                 log: Callable[[str], None]) -> list[Tensor]:
    """Each split's feature maps from the cache where it holds this split's, else encoded and cached."""
    keys = [{"tag": checkpoint.name, "block": block, "data": str(split.root.resolve()), "split": split.name,
             "samples": len(split.pairs), "img_size": img_size} for split in splits]
    files = [folder / SEG_DIR / f"features_block{block:02d}_{split.name}.pt" for split in splits]
    maps = [read_cache(file, key) if use_cache else None for file, key in zip(files, keys)]
    encoder = None
    for i, split in enumerate(splits):
        if maps[i] is not None:
            log(f"{split.name}: feature maps after block {block} read from {files[i]}")
            continue
        began = time.perf_counter()
        if encoder is None:
            encoder = load_seg_encoder(checkpoint, cfg, img_size, device)
        maps[i] = encode_maps(encoder, split, block, img_size, batch_size, cfg.data.num_workers, device)
        replace_atomically(files[i], lambda tmp: torch.save({"key": keys[i], "features": maps[i]}, tmp))
        log(f"{split.name}: {len(split.pairs)} images encoded after block {block} in "
            f"{time.perf_counter() - began:.1f}s; cached in {files[i]}")
    return maps  # type: ignore[return-value]
