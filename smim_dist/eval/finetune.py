"""End-to-end fine-tuning of the pre-trained encoder on a labelled data set: the paper's fine-tuning column (Table 3,
Table 1: 100 epochs on ImageNet-1K, following BEiT and MAE).

The model is the checkpoint's encoder as the plain timm ViT that ``smim-export`` writes, with stochastic depth and a
fresh classifier (weights N(0, 2e-5), as MAE initialises it). The head reads MAE's global pool (BEiT's too): the mean
of the patch tokens (the [CLS] and register tokens, the other proxies, left out) through a new LayerNorm, ``fc_norm``,
which replaces the pre-trained final norm; ``global_pool="token"`` reads the [CLS] token through the pre-trained norm
instead. timm does what timm has: the augmentation (``create_transform``), mixup / cutmix with label smoothing
(``Mixup``, ``SoftTargetCrossEntropy``), the AdamW parameter groups with layer-wise lr decay and no weight decay on
biases, norms and embeddings (``create_optimizer_v2``). The learning rate is the project's warmup + cosine per step,
times each group's ``lr_scale``, as MAE sets it.

One process, or DDP under torchrun (NCCL on GPUs, gloo on CPUs) with each rank training on its share of every global
batch, bf16 autocast on GPUs. After every epoch the val split is scored (each rank its share) and rank 0 saves the
model, optimizer and metrics history atomically to ``finetune/state.pt``; a rerun continues from there and, since every
epoch re-seeds the generators, ends where an uninterrupted run does. The score stored is the last epoch's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import cast

import timm
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from smim_dist.config import ConfigError, ModelConfig
from smim_dist.data.batch import IMAGENET_MEAN, IMAGENET_STD
from smim_dist.engine.schedule import cosine_lr
from smim_dist.eval.data import LabelledSplit, centre_crop_loader
from smim_dist.eval.features import default_device, rank_and_world, resolve_eval_run
from smim_dist.eval.finetune_data import finetune_splits, train_loader, train_transform
from smim_dist.eval.options import option, recipe_of
from smim_dist.eval.results import (RESULTS_FILE, checkpoint_header, merge_results, prior_work, results_folder,
                                    save_progress, top_k_accuracy)
from smim_dist.engine.checkpoint import consolidated_state_dict
from smim_dist.models.timm_export import encoder_state_dict, timm_kwargs, timm_model_name
from smim_dist.seeding import reseed

FINETUNE_DIR = "finetune"
BETAS = (0.9, 0.999)
POOLS = ("avg", "token")


@dataclass(frozen=True)
class FinetuneRecipe:
    """BEiT's and MAE's ViT-B fine-tuning recipe by default, which the paper's Table 3 follows; MAE's 5 warmup epochs
    (BEiT uses 20 for 100 epochs)."""
    epochs: int = 100
    warmup_epochs: int = 5
    batch_size: int = 1024
    """global: over every rank and accumulation step"""
    accum_steps: int = 1
    """micro-batches whose gradients add up to one optimizer step, for GPUs that cannot hold batch / ranks images"""
    blr: float = 5e-4
    """peak learning rate per 256 images"""
    lr: float | None = None
    """absolute peak learning rate; None: blr * batch_size / 256 (the linear scaling rule)"""
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    """lr of block i (1-based, of depth d) = lr * layer_decay ** (d + 1 - i); embeddings d + 1 powers, head none"""
    drop_path: float = 0.1
    mixup: float = 0.8
    """mixup alpha; 0 turns it off"""
    cutmix: float = 1.0
    """cutmix alpha; 0 turns it off (with both on, timm picks one per batch, half the time each)"""
    smoothing: float = 0.1
    """label smoothing"""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    """timm's RandAugment policy"""
    re_prob: float = option(0.25, flag="--reprob")
    """random-erasing probability"""
    global_pool: str = option("avg", choices=POOLS)
    """avg: the mean patch token through a new LayerNorm (MAE); token: the [CLS] token"""

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def check(self, world_size: int) -> None:
        if self.epochs < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--epochs {self.epochs} --warmup-epochs {self.warmup_epochs}: need at least 1 epoch "
                              "and 0 <= warmup epochs < epochs")
        if self.accum_steps < 1 or self.batch_size < 1 or self.batch_size % (world_size * self.accum_steps):
            raise ConfigError(f"--batch-size {self.batch_size} --accum-steps {self.accum_steps}: the global batch "
                              f"must divide into {world_size} rank(s) x {self.accum_steps} accumulation step(s); pass "
                              f"a multiple of {world_size * max(1, self.accum_steps)}")
        if self.mixing and self.batch_size // (world_size * self.accum_steps) % 2:
            raise ConfigError(f"--batch-size {self.batch_size}: mixup / cutmix mix each batch with its reverse, so "
                              f"the {self.batch_size // (world_size * self.accum_steps)} images per rank and step must "
                              "be even; pass an even share or --mixup 0 --cutmix 0")
        if self.peak_lr <= 0 or not 0 <= self.min_lr <= self.peak_lr:
            raise ConfigError(f"--blr {self.blr} --lr {self.lr} --min-lr {self.min_lr}: need a positive peak "
                              f"learning rate (here {self.peak_lr}) and 0 <= min lr <= it")
        ranges = {"--weight-decay": (self.weight_decay, self.weight_decay >= 0, ">= 0"),
                  "--layer-decay": (self.layer_decay, 0 < self.layer_decay <= 1, "in (0, 1]"),
                  "--drop-path": (self.drop_path, 0 <= self.drop_path < 1, "in [0, 1)"),
                  "--mixup": (self.mixup, self.mixup >= 0, ">= 0 (0: off)"),
                  "--cutmix": (self.cutmix, self.cutmix >= 0, ">= 0 (0: off)"),
                  "--smoothing": (self.smoothing, 0 <= self.smoothing < 1, "in [0, 1)"),
                  "--reprob": (self.re_prob, 0 <= self.re_prob <= 1, "in [0, 1]")}
        for flag, (value, ok, allowed) in ranges.items():
            if not ok:
                raise ConfigError(f"{flag} {value}: must be {allowed}")
        if self.global_pool not in POOLS:
            raise ConfigError(f"--global-pool {self.global_pool!r}: choose one of {', '.join(POOLS)}")


def finetune_model(cfg: ModelConfig, state: dict[str, Tensor], num_classes: int, recipe: FinetuneRecipe,
                   generator: torch.Generator | None = None) -> VisionTransformer:
    """The exported encoder's weights in a timm ViT with ``num_classes`` outputs and the recipe's pool and drop
    path; every pre-trained weight must find its place (the pre-trained final norm is dropped for ``avg``)."""
    kwargs = {**timm_kwargs(cfg), "num_classes": num_classes, "global_pool": recipe.global_pool,
              "drop_path_rate": recipe.drop_path}
    model = cast(VisionTransformer, timm.create_model(timm_model_name(cfg), pretrained=False, **kwargs))
    if recipe.global_pool == "avg":
        state = {key: value for key, value in state.items() if not key.startswith("norm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = [key for key in model.state_dict() if key.startswith(("head.", "fc_norm."))]
    if sorted(missing) != sorted(fresh) or unexpected:
        raise RuntimeError(f"the encoder's weights do not fit the fine-tuning model: missing {missing}, unexpected "
                           f"{unexpected}")
    head = cast(nn.Linear, model.head)
    nn.init.trunc_normal_(head.weight, std=2e-5, generator=generator)
    nn.init.zeros_(head.bias)
    return model


def finetune_optimizer(model: nn.Module, recipe: FinetuneRecipe, fused: bool = False) -> torch.optim.Optimizer:
    """timm's AdamW with layer-wise lr decay groups; each group's ``lr_scale`` multiplies the scheduled lr."""
    return create_optimizer_v2(model, "adamw", lr=recipe.peak_lr, weight_decay=recipe.weight_decay,
                               layer_decay=recipe.layer_decay, betas=BETAS, fused=fused)


def _loss_and_mixup(recipe: FinetuneRecipe, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """Mixed soft targets (label smoothing folded in by ``Mixup``) need the soft-target loss."""
    if recipe.mixing:
        return SoftTargetCrossEntropy(), Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix,
                                               label_smoothing=recipe.smoothing, num_classes=num_classes)
    if recipe.smoothing > 0:
        return LabelSmoothingCrossEntropy(recipe.smoothing), None
    return nn.CrossEntropyLoss(), None


@torch.no_grad()
def evaluate(model: nn.Module, split: LabelledSplit, img_size: int, batch_size: int, num_workers: int,
             device: torch.device) -> dict[str, float]:
    """Top-1 (and top-5) on centre crops, as kNN and the linear probe read them; each rank scores its share and the
    hits are summed over ranks."""
    rank, world_size = rank_and_world()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    labels = torch.from_numpy(split.labels)
    model.eval()
    logits, targets = [], []
    for images, indices in centre_crop_loader(split, img_size, batch_size, num_workers, rank, world_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits.append(model((images.to(device).float() - mean) / std).float())
        targets.append(labels[indices].to(device))
    scores = top_k_accuracy(torch.cat(logits), torch.cat(targets))
    if world_size == 1:
        return scores
    count = sum(len(batch) for batch in targets)
    totals = torch.tensor([count, *(round(value * count) for value in scores.values())], dtype=torch.float64,
                          device=device)
    dist.all_reduce(totals)
    return {key: (totals[i + 1] / totals[0]).item() for i, key in enumerate(scores)}


def _check_classes(train: LabelledSplit, val: LabelledSplit, num_classes: int | None, recipe: FinetuneRecipe,
                   world_size: int) -> int:
    found = len(train.classes)
    if num_classes is not None and num_classes != found:
        raise ConfigError(f"--num-classes {num_classes}: {train.path} and {val.path} have {found} class folders; "
                          "pass their count or leave --num-classes out")
    if found < 2:
        raise ConfigError(f"{train.path} has {found} class folder; a classifier (and mixup / cutmix, which mix "
                          "labels) needs at least 2 classes")
    if train.num_samples < recipe.batch_size:
        raise ConfigError(f"--batch-size {recipe.batch_size}: the train split {train.path} holds only "
                          f"{train.num_samples} images, so an epoch would have no step; pass a smaller batch")
    if val.num_samples < world_size:
        raise ConfigError(f"the val split {val.path} holds {val.num_samples} images, fewer than the {world_size} ranks")
    return found


@dataclass(frozen=True)
class FinetuneOptions(FinetuneRecipe):
    """The recipe and how the run reports."""
    num_classes: int | None = None
    """checked against the class folders; None: their count"""
    log_every: int = 50
    """optimizer steps between loss lines (the loss is read back from the device only then)"""
    force: bool = False
    """start over even if results for these settings are stored"""


def run_finetune(checkpoint: Path, out: Path | None = None, options: FinetuneOptions = FinetuneOptions(),
                 overrides: Sequence[str] = (), device: torch.device | None = None,
                 log: Callable[[str], None] = print) -> dict | None:
    """Fine-tune a run's latest checkpoint (or a ``checkpoints/<tag>`` one) and store the ``finetune`` entry of
    ``results.json`` in ``out`` (default ``<run_dir>/eval/<tag>/``); returns the whole results file. Stored results
    for the same settings are returned at once, an interrupted run continues, ``options.force`` starts over. Every
    input is checked before the model is loaded. In a process group every rank must call it; ranks other than 0 return
    None."""
    start = time.perf_counter()
    recipe, log_every = recipe_of(options, FinetuneRecipe), options.log_every
    rank, world_size = rank_and_world()
    recipe.check(world_size)
    if log_every < 1:
        raise ConfigError(f"--log-every {log_every}: log the loss every 1 or more steps")
    checkpoint, cfg = resolve_eval_run(Path(checkpoint), overrides)
    train, val = finetune_splits(cfg)
    num_classes = _check_classes(train, val, options.num_classes, recipe, world_size)
    transform = train_transform(cfg.model.img_size, recipe.auto_augment, recipe.re_prob)
    say = log if rank == 0 else (lambda _: None)
    folder = results_folder(checkpoint, out)
    settings = {**asdict(recipe), "lr": recipe.peak_lr, "num_classes": num_classes, "img_size": cfg.model.img_size,
                "seed": cfg.seed, "train_data": str(train.path.resolve()), "val_data": str(val.path.resolve())}
    previous, state_file, state_key, resume = prior_work(folder, "finetune", "fine-tuning", FINETUNE_DIR,
                                                         checkpoint.name, settings, ("top1",), options.force, say)
    if previous is not None:
        return previous

    device = device or default_device()
    model = finetune_model(cfg.model, encoder_state_dict(consolidated_state_dict(checkpoint)), num_classes, recipe,
                           torch.Generator().manual_seed(cfg.seed)).to(device)
    optimizer = finetune_optimizer(model, recipe, fused=device.type == "cuda")
    first_epoch, history = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        first_epoch, history = resume["epoch"], resume["history"]
        say(f"fine-tuning resumed after epoch {resume['epoch']} from {state_file}")
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world_size > 1 else None
    trained: nn.Module = ddp if ddp is not None else model
    criterion, mixup = _loss_and_mixup(recipe, num_classes)
    micro_batch = recipe.batch_size // (world_size * recipe.accum_steps)
    steps = train.num_samples // recipe.batch_size
    say(f"fine-tuning {checkpoint} on {train.num_samples} images of {num_classes} classes: {recipe.epochs} epochs "
        f"of {steps} steps, batch {recipe.batch_size} ({world_size} rank(s) x {recipe.accum_steps} x {micro_batch}), "
        f"peak lr {recipe.peak_lr:g}")
    for epoch in range(first_epoch, recipe.epochs):
        began = time.perf_counter()
        reseed(cfg.seed, epoch, rank)
        loader = train_loader(train, transform, micro_batch, cfg.seed, epoch, rank, world_size, cfg.data.num_workers)
        batches = iter(islice(loader, steps * recipe.accum_steps))
        trained.train()
        total, running = torch.zeros((), device=device), torch.zeros((), device=device)
        for step in range(steps):
            lr = cosine_lr(epoch * steps + step, recipe.epochs * steps, recipe.warmup_epochs * steps,
                           recipe.peak_lr, recipe.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            for micro in range(recipe.accum_steps):
                images, labels = (tensor.to(device, non_blocking=True) for tensor in next(batches))
                if mixup is not None:
                    images, labels = mixup(images, labels)
                last = micro == recipe.accum_steps - 1  # DDP reduces the gradients of the last one only
                with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        loss = criterion(trained(images).float(), labels) / recipe.accum_steps
                    loss.backward()
                total += loss.detach() / steps
                running += loss.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % log_every == 0:
                say(f"fine-tuning epoch {epoch + 1} step {step + 1}/{steps}: loss {running.item() / log_every:.4f}, "
                    f"lr {lr:.3g}")
                running.zero_()
        if world_size > 1:
            dist.all_reduce(total)
            total /= world_size
        scores = evaluate(model, val, cfg.model.img_size, micro_batch, cfg.data.num_workers, device)
        history.append({"epoch": epoch + 1, "step": (epoch + 1) * steps, "train_loss": total.item(), "lr": lr,
                        **scores, "seconds": round(time.perf_counter() - began, 2)})
        if rank == 0:
            save_progress(state_file, {"settings": state_key, "epoch": epoch + 1, "model": model.state_dict(),
                                       "optimizer": optimizer.state_dict(), "history": history})
        say(f"fine-tuning epoch {epoch + 1}/{recipe.epochs}: train loss {history[-1]['train_loss']:.4f}, val "
            + ", ".join(f"{key} {value:.4f}" for key, value in scores.items()))
    if rank != 0:
        return None
    final = {key: value for key, value in history[-1].items() if key.startswith("top")}
    entry = {**settings, **final, "train_samples": train.num_samples, "val_samples": val.num_samples,
             "world_size": world_size, "seconds": round(time.perf_counter() - start, 2)}
    results = merge_results(folder, checkpoint_header(checkpoint), "finetune", entry)
    say(f"fine-tuning of {checkpoint} (step {results['step']}): top-1 {final['top1']:.4f}; wrote "
        f"{folder / RESULTS_FILE}")
    return results
