"""Weighted k-nearest-neighbour classification of frozen features (the DINO protocol).

No training and no hyper-parameter search, so it is the cheapest honest read of how semantic the features are, and the
one a training run launches on every new checkpoint. Each val image is classified by its ``k`` most cosine-similar
train images, each voting for its class with weight ``exp(similarity / temperature)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from smim_dist.config import Config, ConfigError
from smim_dist.eval.data import LabelledSplit, centre_crop_loader, eval_splits
from smim_dist.eval.features import (FEATURES, default_device, extract_features, load_encoder, rank_and_world,
                                     resolve_eval_run)
from smim_dist.eval.options import option
from smim_dist.eval.results import (RESULTS_FILE, checkpoint_header, merge_results, previous_results,
                                    results_folder, top_k_accuracy)

SIMILARITY_ELEMENTS = 1 << 27
"""queries x train images per similarity chunk (512 MiB of float32), so memory stays flat as the memory bank grows"""


def knn_scores(train: Tensor, train_labels: Tensor, queries: Tensor, k: int, temperature: float, num_classes: int,
               max_elements: int = SIMILARITY_ELEMENTS) -> Tensor:
    """``[Q, num_classes]`` vote totals; ``train`` and ``queries`` must be L2-normalised. Queries are compared with
    the train set in chunks of at most ``max_elements`` similarities."""
    scores = []
    for chunk in queries.split(max(1, max_elements // train.shape[0])):
        similarity, neighbours = (chunk @ train.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp()))
    return torch.cat(scores)


def knn_accuracy(train: Tensor, train_labels: Tensor, val: Tensor, val_labels: Tensor, k: int = 20,
                 temperature: float = 0.07) -> dict[str, float]:
    """Top-1 (and top-5 where there are at least 5 classes) accuracy of weighted kNN on raw features."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    scores = knn_scores(F.normalize(train, dim=1), train_labels, F.normalize(val, dim=1), k, temperature, num_classes)
    return top_k_accuracy(scores, val_labels)


def _check_settings(k: int, temperature: float, feature: str, batch_size: int) -> tuple[str, ...]:
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: a batch needs at least 1 image")
    if k <= 0:
        raise ConfigError(f"--k {k}: the number of neighbours must be at least 1 (20 is the usual choice)")
    if temperature <= 0:
        raise ConfigError(f"--temperature {temperature}: the vote temperature must be positive (0.07 is the usual one)")
    if feature not in (*FEATURES, "both"):
        raise ConfigError(f"--feature {feature!r} is not one of {[*FEATURES, 'both']}")
    return FEATURES if feature == "both" else (feature,)


def _accuracies(checkpoint: Path, cfg: Config, splits: tuple[LabelledSplit, LabelledSplit], kinds: Sequence[str],
                k: int, temperature: float, batch_size: int, device: torch.device,
                say: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Encode both splits (each rank its share) and classify val by its kNN in train, per feature kind."""
    encoder = load_encoder(checkpoint, cfg, device)
    rank, world_size = rank_and_world()
    loaders = [centre_crop_loader(split, cfg.model.img_size, batch_size, cfg.data.num_workers, rank, world_size)
               for split in splits]  # all alive to the end: see centre_crop_loader
    features, labels = [], []
    for split, loader in zip(splits, loaders):
        began = time.perf_counter()
        features.append(extract_features(encoder, loader, split.num_samples, device, kinds))
        labels.append(torch.from_numpy(split.labels).to(device))
        say(f"{split.name}: {split.num_samples} images encoded in {time.perf_counter() - began:.1f}s")
    return {kind: knn_accuracy(features[0][kind], labels[0], features[1][kind], labels[1], k, temperature)
            for kind in kinds}


@dataclass(frozen=True)
class KnnOptions:
    """DINO's protocol by default."""
    feature: str = option("both", choices=(*FEATURES, "both"))
    """cls: the [CLS] token; patch: the mean patch token; both: each, reported side by side"""
    k: int = 20
    """neighbours that vote"""
    temperature: float = 0.07
    """T of the vote weight exp(similarity / T)"""
    batch_size: int = 128
    """images per forward pass"""
    force: bool = False
    """start over, recomputing, even if results for these settings are stored"""


def run_knn(checkpoint: Path, out: Path | None = None, options: KnnOptions = KnnOptions(),
            overrides: Sequence[str] = (), device: torch.device | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Evaluate a run's latest checkpoint (or a ``checkpoints/<tag>`` one) and store the ``knn`` entry of
    ``results.json`` in ``out`` (default ``<run_dir>/eval/<tag>/``); returns the whole results file. An entry already
    stored for the same checkpoint, settings and data is returned without recomputing unless ``options.force``. Every
    input is checked before the model is loaded. In a process group every rank must call it; rank 0 writes and logs."""
    start = time.perf_counter()
    k, temperature = options.k, options.temperature
    kinds = _check_settings(k, temperature, options.feature, options.batch_size)
    checkpoint, cfg = resolve_eval_run(Path(checkpoint), overrides)
    train, val = eval_splits(cfg)
    if k > train.num_samples:
        raise ConfigError(f"--k {k} is more neighbours than the {train.num_samples} train images in {train.path}; "
                          f"pass --k {train.num_samples} or less")
    say = log if rank_and_world()[0] == 0 else (lambda _: None)
    folder = results_folder(checkpoint, out)
    settings = {"k": k, "temperature": temperature, "train_data": str(train.path.resolve()),
                "val_data": str(val.path.resolve())}
    previous = None if options.force else previous_results(folder, "knn", checkpoint.name, settings, kinds)
    if previous is not None:
        say(f"kNN results for {checkpoint} are already in {folder / RESULTS_FILE}; nothing to do (--force recomputes)")
        return previous

    accuracies = _accuracies(checkpoint, cfg, (train, val), kinds, k, temperature, options.batch_size,
                             device or default_device(), say)
    header = checkpoint_header(checkpoint)
    entry: dict[str, Any] = {**settings, **accuracies, "train_samples": train.num_samples,
                             "val_samples": val.num_samples, "seconds": round(time.perf_counter() - start, 2)}
    if rank_and_world()[0] != 0:
        return {**header, "protocols": {"knn": entry}}
    results = merge_results(folder, header, "knn", entry)
    say(f"kNN (k={k}, T={temperature}) of {checkpoint} (step {header['step']}): "
        + ", ".join(f"{kind} top-1 {entry[kind]['top1']:.4f}" for kind in kinds) + f"; wrote {folder / RESULTS_FILE}")
    return results
