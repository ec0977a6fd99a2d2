"""UperNet fine-tuning for semantic segmentation: the paper's ADE20K mIoU (Table 4, Table 1), BEiT's protocol.

The encoder (the checkpoint's plain timm ViT, position embedding resampled to the crop size, drop path on) is fine-tuned
with a UperNet decoder (``smim_dist.models.upernet``) for a number of iterations: cross-entropy ignoring 255 on logits
upsampled to the crop, plus 0.4 x the auxiliary FCN head's; AdamW with BEiT's layer-wise lr decay (timm's parameter
groups), linear warmup then poly decay to 0, as mmsegmentation schedules it. Training crops follow mmsegmentation's
ADE20K pipeline: the image rescaled to a short side of crop x U(0.5, 2) (long side at most 4x that), a crop of
``crop_size`` redrawn up to 10 times while one class covers 3/4 of its labelled pixels, a horizontal flip with
probability 0.5, padding with ignored pixels; the photometric distortion is left out. Evaluation rescales each val image
to a short side of ``crop_size``, averages the logits of crop-size windows slid with stride 2/3 crop (mmsegmentation's
``slide`` mode, as BEiT evaluates), scores at the label map's own size: confusion-matrix mIoU and pixel accuracy.

Under torchrun every rank trains on its share of each global batch (DDP; SyncBatchNorm on GPUs) and scores its share of
val. Every random choice is seeded by (seed, epoch, sample) or (seed, rank, iteration) rather than drawn from a running
generator, so the model, the optimizer and the iteration, saved atomically every ``save_every`` iterations in
``upernet/state.pt``, are all a rerun needs to continue exactly as if it had not stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from smim_dist.config import Config, ConfigError
from smim_dist.data.pretrain_loader import prepare_demo_data
from smim_dist.eval.data import IGNORE_INDEX, SegmentationSplit, segmentation_splits
from smim_dist.eval.features import default_device, rank_and_world, resolve_eval_run
from smim_dist.eval.options import recipe_of
from smim_dist.eval.seg_metrics import confusion_matrix, segmentation_scores
from smim_dist.eval.upernet_data import TrainCrops, ValImages, check_label_ids, epoch_items, normalise
from smim_dist.eval.results import (METRICS_FILE, RESULTS_FILE, checkpoint_header, merge_results, prior_work,
                                    results_folder)
from smim_dist.seeding import reseed
from smim_dist.files import replace_atomically
from smim_dist.engine.checkpoint import consolidated_state_dict
from smim_dist.models.timm_export import encoder_state_dict, timm_kwargs, timm_model_name
from smim_dist.models.upernet import UperNet

UPERNET_DIR = "upernet"

@dataclasses.dataclass(frozen=True)
class UperNetRecipe:
    """The paper's ADE20K recipe (Table 4: BEiT's, 160k iterations at 640 px) by default. The learning rate 1e-4 with
    layer decay 0.65 is MAE's ViT-B UperNet recipe (mmsegmentation's ``upernet_mae-base`` config) for an encoder
    pre-trained without labels, as here; BEiT's published configs (3e-5, decay 0.9) start from encoders already
    fine-tuned on ImageNet-22k labels."""
    iters: int = 160_000
    batch_size: int = 16
    """crops per iteration over all ranks"""
    crop_size: int = 640
    lr: float = 1e-4
    """peak AdamW learning rate, the decoder's"""
    layer_decay: float = 0.65
    """lr factor per encoder block towards the input"""
    weight_decay: float = 0.05
    warmup_iters: int = 1500
    drop_path: float = 0.1
    aux_weight: float = 0.4
    """weight of the auxiliary FCN head's loss"""

    def lr_at(self, iteration: int) -> float:
        """Linear warmup from 0, then poly (power 1) decay to 0 at ``iters``."""
        if iteration < self.warmup_iters:
            return self.lr * iteration / self.warmup_iters
        return self.lr * (1 - (iteration - self.warmup_iters) / (self.iters - self.warmup_iters))

    def check(self, patch_size: int, world_size: int = 1, synced_bn: bool = False) -> None:
        if self.iters < 1 or not 0 <= self.warmup_iters < self.iters:
            raise ConfigError(f"--iters {self.iters} --warmup-iters {self.warmup_iters}: need at least 1 iteration "
                              "and 0 <= warmup iterations < iterations")
        if self.batch_size < 1 or self.batch_size % world_size:
            raise ConfigError(f"--batch-size {self.batch_size}: the global batch must be a positive multiple of the "
                              f"{world_size} processes")
        if self.batch_size // world_size < 2 and not synced_bn:
            raise ConfigError(f"--batch-size {self.batch_size} on {world_size} process(es): BatchNorm needs at least "
                              "2 crops per process unless it is synchronised (SyncBatchNorm, on GPUs)")
        if self.lr <= 0 or not 0 < self.layer_decay <= 1 or self.weight_decay < 0:
            raise ConfigError(f"--lr {self.lr} --layer-decay {self.layer_decay} --weight-decay {self.weight_decay}: "
                              "need lr > 0, 0 < layer decay <= 1 and weight decay >= 0")
        if not 0 <= self.drop_path < 1 or self.aux_weight < 0:
            raise ConfigError(f"--drop-path {self.drop_path} aux weight {self.aux_weight}: need 0 <= drop path < 1 "
                              "and aux weight >= 0")
        if self.crop_size < 2 * patch_size or self.crop_size % patch_size:
            raise ConfigError(f"--crop-size {self.crop_size}: must be a multiple of the patch size {patch_size}, at "
                              "least two patches (the coarsest pyramid level halves the patch grid)")


def load_upernet(checkpoint: Path, cfg: Config, recipe: UperNetRecipe, num_classes: int) -> UperNet:
    """The checkpoint's encoder for crop-size inputs (position embedding resampled bicubically, as for linear
    segmentation) with the recipe's drop path, under a freshly initialised decoder."""
    state = encoder_state_dict(consolidated_state_dict(checkpoint))
    old, new = cfg.model.img_size // cfg.model.patch_size, recipe.crop_size // cfg.model.patch_size
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [new, new], [old, old], num_prefix_tokens=0)
    model_cfg = dataclasses.replace(cfg.model, img_size=recipe.crop_size)
    encoder = timm.create_model(timm_model_name(model_cfg), pretrained=False, drop_path_rate=recipe.drop_path,
                                **timm_kwargs(model_cfg))
    encoder.load_state_dict(state, strict=True)
    return UperNet(cast(VisionTransformer, encoder), num_classes)


def upernet_optimizer(model: UperNet, recipe: UperNetRecipe) -> torch.optim.AdamW:
    """AdamW over timm's layer-decay groups (each with its ``lr_scale``); no weight decay on biases, norms, position
    embedding and prefix tokens, as BEiT."""
    groups = param_groups_layer_decay(model, recipe.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=recipe.layer_decay)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.999))


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over the labelled pixels (0, not NaN, for a crop without any)."""
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def seg_loss(model: nn.Module, pixels: Tensor, labels: Tensor, aux_weight: float) -> Tensor:
    """The training loss of normalised crops ``[B, 3, S, S]`` and their label maps ``[B, S, S]``; bf16 on GPUs."""
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=pixels.device.type == "cuda"):
        logits, aux = model(pixels)
    return _cross_entropy(logits, labels) + aux_weight * _cross_entropy(aux, labels)


def _starts(size: int, crop: int, stride: int) -> list[int]:
    return sorted({min(i * stride, size - crop) for i in range((size - crop + stride - 1) // stride + 1)})


@torch.no_grad()
def slide_logits(model: UperNet, pixels: Tensor, crop: int) -> Tensor:
    """float ``[C, H, W]`` logits of one normalised image ``[3, H, W]`` (each side at least ``crop``): the average over
    the crop-size windows, slid with stride 2/3 crop, that cover each pixel."""
    height, width = pixels.shape[-2:]
    stride = max(1, 2 * crop // 3)
    boxes = [(top, left) for top in _starts(height, crop, stride) for left in _starts(width, crop, stride)]
    windows = torch.stack([pixels[:, top:top + crop, left:left + crop] for top, left in boxes])
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=pixels.device.type == "cuda"):
        logits = model(windows)[0]
    logits = F.interpolate(logits.float(), size=(crop, crop), mode="bilinear", align_corners=False)
    total = logits.new_zeros(logits.shape[1], height, width)
    count = logits.new_zeros(1, height, width)
    for (top, left), window in zip(boxes, logits):
        total[:, top:top + crop, left:left + crop] += window
        count[:, top:top + crop, left:left + crop] += 1
    return total / count


@torch.no_grad()
def evaluate_upernet(model: UperNet, split: SegmentationSplit, crop: int, num_classes: int, device: torch.device,
                     num_workers: int = 0) -> dict:
    """mIoU and pixel accuracy over ``split``, at each label map's own size; in a process group each rank scores its
    share and the confusion matrices are summed."""
    rank, world_size = rank_and_world()
    loader = DataLoader(ValImages(split, crop), batch_size=None, sampler=range(rank, len(split.pairs), world_size),
                        num_workers=num_workers)
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for image, label in loader:
        pixels = normalise(image.to(device))
        height, width = pixels.shape[-2:]
        padded = F.pad(pixels, (0, max(crop - width, 0), 0, max(crop - height, 0)))
        logits = slide_logits(model, padded, crop)[None, :, :height, :width]
        predictions = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        confusion += confusion_matrix(predictions, label.to(device), num_classes)
    model.train()
    if world_size > 1:
        confusion = confusion.to(device)
        dist.all_reduce(confusion)
    return segmentation_scores(confusion.cpu())


def _record(file: Path, entry: dict) -> None:
    with file.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _metrics_until(file: Path, iteration: int) -> None:
    """Drop the records written after ``iteration`` (all of them when starting over): an interrupted run's records
    after the state it is resumed from, which the rerun writes again."""
    if file.exists():
        kept = [line for line in file.read_text().splitlines() if json.loads(line)["iteration"] <= iteration]
        replace_atomically(file, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


@dataclasses.dataclass(frozen=True)
class UperNetOptions(UperNetRecipe):
    """The recipe, what it reads, and how the run reports and saves."""
    data: str | None = None
    """an ADE20K tree (ADEChallengeData2016), a PascalVOC tree or a demo set; None: the run's demo set"""
    num_classes: int | None = None
    """classes, ignore index 255 aside; None: those of the data (ADE20K 150, VOC 21, demo 7)"""
    eval_every: int = 0
    """also score val every N iterations; 0: at the end only"""
    save_every: int = 1000
    """iterations between saved states, where a rerun continues"""
    log_every: int = 50
    """iterations between loss records"""
    force: bool = False
    """start over even if results for these settings are stored"""


def run_upernet(checkpoint: Path, out: Path | None = None, options: UperNetOptions = UperNetOptions(),
                overrides: Sequence[str] = (), device: torch.device | None = None,
                log: Callable[[str], None] = print) -> dict | None:
    """Fine-tune UperNet on a run's latest (or a ``checkpoints/<tag>``) checkpoint and store the ``upernet`` entry of
    ``results.json`` in ``out`` (default ``<run_dir>/eval/<tag>/``); returns the whole results file (None on ranks
    other than 0). Every input, the class ids of every label map included, is checked before the model is loaded;
    stored results for the same settings are returned at once, an interrupted run continues from its last saved
    state, ``options.force`` starts over. Loss records and val scores go to ``upernet/metrics.jsonl``."""
    start = time.perf_counter()
    recipe, data = recipe_of(options, UperNetRecipe), options.data
    eval_every, save_every, log_every = options.eval_every, options.save_every, options.log_every
    checkpoint, cfg = resolve_eval_run(Path(checkpoint), overrides)
    rank, world_size = rank_and_world()
    device = device or default_device()
    synced_bn = device.type == "cuda" and world_size > 1
    recipe.check(cfg.model.patch_size, world_size, synced_bn)
    if eval_every < 0 or save_every < 1 or log_every < 1:
        raise ConfigError(f"--eval-every {eval_every} --save-every {save_every} --log-every {log_every}: need "
                          "eval every >= 0 (0: at the end only) and save / log every >= 1")
    if data is None and not cfg.data.demo:
        raise ConfigError("the run's data is not the demo set; pass --data with an ADE20K tree (ADEChallengeData2016) "
                          "or a PascalVOC tree (VOCdevkit/VOC2012)")
    root = Path(data) if data is not None else prepare_demo_data(cfg)
    train, val, found_classes = segmentation_splits(root)
    num_classes = options.num_classes or found_classes
    if num_classes < 2:
        raise ConfigError(f"--num-classes {num_classes}: segmentation needs at least 2 classes")
    if len(train.pairs) < recipe.batch_size:
        raise ConfigError(f"--batch-size {recipe.batch_size}: the train split of {root} holds only "
                          f"{len(train.pairs)} images, less than one batch")
    say = log if rank == 0 else (lambda _: None)
    folder = results_folder(checkpoint, out)
    settings = {**dataclasses.asdict(recipe), "num_classes": num_classes, "seed": cfg.seed,
                "data": str(root.resolve())}
    previous, state_file, state_key, resume = prior_work(folder, "upernet", "UperNet fine-tuning", UPERNET_DIR,
                                                         checkpoint.name, settings, ("miou",), options.force, say)
    if previous is not None:
        return previous
    check_label_ids((train, val), num_classes)

    torch.manual_seed(cfg.seed)
    model = load_upernet(checkpoint, cfg, recipe, num_classes)
    if synced_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device).train()
    optimizer = upernet_optimizer(model, recipe)
    iteration, metrics = 0, folder / UPERNET_DIR / METRICS_FILE
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        iteration = resume["iteration"]
        say(f"UperNet resumed after iteration {iteration} from {state_file}")
    if rank == 0:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        _metrics_until(metrics, iteration)
    trained = model if world_size == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    dataset, steps_per_epoch = TrainCrops(train, recipe.crop_size, cfg.seed), len(train.pairs) // recipe.batch_size
    running, since, began = torch.zeros((), device=device), iteration, time.perf_counter()
    while iteration < recipe.iters:
        epoch, step = divmod(iteration, steps_per_epoch)
        items = epoch_items(len(train.pairs), recipe.batch_size, cfg.seed, epoch, step, rank, world_size)
        loader = DataLoader(dataset, batch_size=recipe.batch_size // world_size, sampler=items,
                            num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
        for images, labels in loader:
            lr = recipe.lr_at(iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            reseed(cfg.seed, rank, iteration)  # dropout and drop path
            loss = seg_loss(trained, normalise(images.to(device, non_blocking=True)),
                            labels.to(device, non_blocking=True), recipe.aux_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.detach()
            iteration += 1
            last = iteration == recipe.iters
            if iteration % log_every == 0 or last:
                if world_size > 1:
                    dist.all_reduce(running)
                mean = running.item() / (iteration - since) / world_size
                say(f"UperNet iteration {iteration}/{recipe.iters}: loss {mean:.4f}, lr {lr:.3g}")
                if rank == 0:
                    _record(metrics, {"iteration": iteration, "loss": mean, "lr": lr,
                                      "seconds": round(time.perf_counter() - began, 2)})
                running.zero_()
                since = iteration
            if rank == 0 and (iteration % save_every == 0 or last):
                state = {"settings": state_key, "iteration": iteration, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict()}
                replace_atomically(state_file, lambda tmp: torch.save(state, tmp))
            if eval_every and iteration % eval_every == 0 and not last:
                scores = evaluate_upernet(model, val, recipe.crop_size, num_classes, device, cfg.data.num_workers)
                say(f"UperNet iteration {iteration}: val mIoU {scores['miou']:.4f}")
                if rank == 0:
                    _record(metrics, {"iteration": iteration, "miou": scores["miou"],
                                      "pixel_acc": scores["pixel_acc"]})
            if last:
                break

    scores = evaluate_upernet(model, val, recipe.crop_size, num_classes, device, cfg.data.num_workers)
    if rank != 0:
        return None
    _record(metrics, {"iteration": iteration, "miou": scores["miou"], "pixel_acc": scores["pixel_acc"]})
    entry = {**settings, **scores, "train_samples": len(train.pairs), "val_samples": len(val.pairs),
             "world_size": world_size, "seconds": round(time.perf_counter() - start, 2)}
    results = merge_results(folder, checkpoint_header(checkpoint), "upernet", entry)
    say(f"UperNet of {checkpoint} (step {results['step']}): mIoU {scores['miou']:.4f}, pixel accuracy "
        f"{scores['pixel_acc']:.4f}; wrote {folder / RESULTS_FILE}")
    return results
