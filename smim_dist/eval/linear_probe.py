"""Linear probe of frozen features after block K: the paper's linear classification (Tables 3-4, "CLS" and "Patch").

The [CLS] token and the mean patch token of the raw residual stream after block K (1-based; the paper reads layer 7 of
ViT-B) each go through MAE's linear-probe head, BatchNorm1d(affine=False) + Linear, trained with SGD (momentum 0.9, no
weight decay), a warmup + cosine learning rate and cross-entropy; top-1 and top-5 on val.

This is the frozen-feature variant: each split is encoded once, from centre crops (as kNN reads them), and cached in
the eval folder (``linear/``, bf16, the precision the encoder computes in on GPUs), and the heads train on the cached
features. It is cheap (the encoder runs once per image rather than once per image per epoch) and makes a rerun or a
resumed probe skip the encoder; the full recipe feeds augmented images through the encoder every epoch and costs
about ``epochs`` times more encoder compute. The heads, their optimizer and the epoch are saved atomically after every
epoch, so an interrupted probe continues where it stopped. Under torchrun each rank encodes its share and rank 0 trains
the heads, which are tiny.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smim_dist.config import Config, ConfigError
from smim_dist.engine.schedule import cosine_lr
from smim_dist.eval.data import LabelledSplit, centre_crop_loader, eval_splits
from smim_dist.eval.features import (FEATURES, check_block, default_device, extract_features, load_encoder,
                                     rank_and_world, resolve_eval_run)
from smim_dist.eval.options import recipe_of
from smim_dist.eval.results import (RESULTS_FILE, checkpoint_header, merge_results, prior_work, read_cache,
                                    results_folder, save_progress, top_k_accuracy)
from smim_dist.files import replace_atomically

PROBE_DIR = "linear"


@dataclass(frozen=True)
class ProbeRecipe:
    """How the heads train; MAE's linear-probe recipe (90 epochs, 10 of warmup, lr 0.1 per 256) by default."""
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 1024
    """cached features per head step"""
    lr: float | None = None
    """peak learning rate; None: 0.1 * batch_size / 256 (the linear scaling rule)"""

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else 0.1 * self.batch_size / 256

    def check(self) -> None:
        if self.epochs < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--epochs {self.epochs} --warmup-epochs {self.warmup_epochs}: need at least 1 epoch "
                              "and 0 <= warmup epochs < epochs")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size {self.batch_size}: BatchNorm needs batches of at least 2 features")
        if self.peak_lr <= 0:
            raise ConfigError(f"--lr {self.lr}: the learning rate must be positive")


def linear_head(dim: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Sequential:
    """MAE's linear-probe head: a parameter-free BatchNorm evens out feature scales (which differ wildly between
    layers and methods, and would otherwise make one learning rate unfair to some), then a linear classifier."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def train_heads(features: dict[str, Tensor], labels: Tensor, num_classes: int, recipe: ProbeRecipe, seed: int = 0,
                resume: dict | None = None, save: Callable[[dict], None] | None = None,
                say: Callable[[str], None] = print) -> nn.ModuleDict:
    """One head per feature kind on ``[N, D]`` features, trained together (separate parameters, so summing their
    losses trains each alone). Epochs visit the samples in a seeded order and drop a last partial batch (a tiny one
    would skew BatchNorm), except when the whole set is smaller than a batch; the same ``seed`` gives the same heads
    whatever ran before in the process. After every epoch ``save`` gets the state (epoch, heads, optimizer, history
    of per-epoch losses) that ``resume`` continues from."""
    device, generator = labels.device, torch.Generator().manual_seed(seed)
    heads = nn.ModuleDict({kind: linear_head(x.shape[1], num_classes, generator)
                           for kind, x in features.items()}).to(device)
    optimizer = torch.optim.SGD(heads.parameters(), lr=0.0, momentum=0.9, weight_decay=0.0)
    first_epoch, history = 0, []
    if resume is not None:
        heads.load_state_dict(resume["heads"])
        optimizer.load_state_dict(resume["optimizer"])
        first_epoch, history = resume["epoch"], resume["history"]
    steps = max(1, len(labels) // recipe.batch_size)
    heads.train()
    for epoch in range(first_epoch, recipe.epochs):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + epoch)).to(device)
        losses = {kind: torch.zeros((), device=device) for kind in features}  # summed on device: no sync per step
        for step, batch in enumerate(order[: steps * recipe.batch_size].split(recipe.batch_size)):
            lr = cosine_lr(epoch * steps + step, recipe.epochs * steps, recipe.warmup_epochs * steps,
                           recipe.peak_lr, 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = {kind: F.cross_entropy(heads[kind](x[batch].float()), labels[batch]) for kind, x in features.items()}
            optimizer.zero_grad(set_to_none=True)
            torch.stack(list(loss.values())).sum().backward()
            optimizer.step()
            for kind, value in loss.items():
                losses[kind] += value.detach() / steps
        history.append({"epoch": epoch + 1, "lr": lr, **{f"train_loss_{kind}": round(value.item(), 6)
                                                          for kind, value in losses.items()}})
        if save is not None:
            save({"epoch": epoch + 1, "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                  "history": history})
        say(f"linear probe epoch {epoch + 1}/{recipe.epochs}: train loss "
            + ", ".join(f"{kind} {history[-1]['train_loss_' + kind]:.4f}" for kind in losses))
    return heads


@torch.no_grad()
def head_accuracy(heads: nn.ModuleDict, features: dict[str, Tensor], labels: Tensor,
                  batch_size: int = 4096) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 of each kind's head, with BatchNorm's running statistics (eval mode)."""
    heads.eval()
    return {kind: top_k_accuracy(torch.cat([heads[kind](chunk.float()) for chunk in x.split(batch_size)]), labels)
            for kind, x in features.items()}


def _cached_features(checkpoint: Path, cfg: Config, splits: Sequence[LabelledSplit], block: int, folder: Path,
                     batch_size: int, device: torch.device, use_cache: bool,
                     say: Callable[[str], None]) -> list[dict[str, Tensor]]:
    """bf16 features after ``block`` per split, from the cache where it holds this split's, else encoded (each rank
    its share) and cached by rank 0. Every rank decides from the cache before any rank writes to it."""
    keys = [{"tag": checkpoint.name, "block": block, "data": str(split.path.resolve()),
             "samples": split.num_samples, "img_size": cfg.model.img_size} for split in splits]
    files = [folder / PROBE_DIR / f"features_block{block:02d}_{split.name}.pt" for split in splits]
    features = [read_cache(file, key) if use_cache else None for file, key in zip(files, keys)]
    missing = [i for i, found in enumerate(features) if found is None]
    if not missing:
        say(f"features after block {block} read from {files[0].parent}")
        return cast(list[dict[str, Tensor]], features)
    encoder = load_encoder(checkpoint, cfg, device)
    rank, world_size = rank_and_world()
    loaders = {i: centre_crop_loader(splits[i], cfg.model.img_size, batch_size, cfg.data.num_workers, rank,
                                     world_size) for i in missing}  # all alive to the end: see centre_crop_loader
    for i, loader in loaders.items():
        began = time.perf_counter()
        encoded = extract_features(encoder, loader, splits[i].num_samples, device, FEATURES, block)
        features[i] = {kind: values.to(torch.bfloat16).cpu() for kind, values in encoded.items()}
        if rank == 0:
            cache = {"key": keys[i], "features": features[i]}
            replace_atomically(files[i], lambda tmp: torch.save(cache, tmp))
        say(f"{splits[i].name}: {splits[i].num_samples} images encoded after block {block} in "
            f"{time.perf_counter() - began:.1f}s; cached in {files[i]}")
    return cast(list[dict[str, Tensor]], features)


@dataclass(frozen=True)
class LinearOptions(ProbeRecipe):
    """The recipe, and what it reads and how: the paper probes block 7 of ViT-B's 12."""
    block: int = 7
    """1-based block whose output is probed"""
    encode_batch_size: int = 128
    """images per forward pass"""
    force: bool = False
    """start over, re-encoding too, even if results for these settings are stored"""


def run_linear_probe(checkpoint: Path, out: Path | None = None, options: LinearOptions = LinearOptions(),
                     overrides: Sequence[str] = (), device: torch.device | None = None,
                     log: Callable[[str], None] = print) -> dict | None:
    """Probe a run's latest checkpoint (or a ``checkpoints/<tag>`` one) and store the ``linear`` entry of
    ``results.json`` in ``out`` (default ``<run_dir>/eval/<tag>/``); returns the whole results file. An entry stored
    for the same checkpoint, settings and data is returned at once, an interrupted probe continues, and
    ``options.force`` starts over (re-encoding too). Every input is checked before the model is loaded. In a process
    group every rank must call it; ranks other than 0 return None once their share is encoded."""
    start = time.perf_counter()
    recipe, block, force = recipe_of(options, ProbeRecipe), options.block, options.force
    recipe.check()
    if options.encode_batch_size < 1:
        raise ConfigError(f"--encode-batch-size {options.encode_batch_size}: a batch needs at least 1 image")
    checkpoint, cfg = resolve_eval_run(Path(checkpoint), overrides)
    check_block(block, cfg)
    train, val = eval_splits(cfg)
    if train.num_samples < 2:
        raise ConfigError(f"{train.path} holds {train.num_samples} image; BatchNorm needs at least 2 to train on")
    rank = rank_and_world()[0]
    say = log if rank == 0 else (lambda _: None)
    folder = results_folder(checkpoint, out)
    settings = {"block": block, **asdict(recipe), "lr": recipe.peak_lr, "seed": cfg.seed,
                "train_data": str(train.path.resolve()), "val_data": str(val.path.resolve())}
    previous, state_file, state_key, resume = prior_work(folder, "linear", "linear probe", PROBE_DIR, checkpoint.name,
                                                         settings, FEATURES, force, say)
    if previous is not None:
        return previous

    device = device or default_device()
    features = _cached_features(checkpoint, cfg, (train, val), block, folder, options.encode_batch_size, device,
                                not force, say)
    if rank != 0:
        return None
    train_x, val_x = ({kind: values.to(device) for kind, values in split.items()} for split in features)
    train_y, val_y = (torch.from_numpy(split.labels).to(device) for split in (train, val))
    if resume is not None:
        say(f"linear probe resumed after epoch {resume['epoch']} from {state_file}")

    def save(state: dict) -> None:
        save_progress(state_file, {"settings": state_key, **state})

    num_classes = int(max(train_y.max(), val_y.max())) + 1
    heads = train_heads(train_x, train_y, num_classes, recipe, cfg.seed, resume, save, say)
    entry = {**settings, **head_accuracy(heads, val_x, val_y), "train_samples": train.num_samples,
             "val_samples": val.num_samples, "seconds": round(time.perf_counter() - start, 2)}
    results = merge_results(folder, checkpoint_header(checkpoint), "linear", entry)
    say(f"linear probe (block {block}) of {checkpoint} (step {results['step']}): "
        + ", ".join(f"{kind} top-1 {entry[kind]['top1']:.4f}" for kind in FEATURES)
        + f"; wrote {folder / RESULTS_FILE}")
    return results

