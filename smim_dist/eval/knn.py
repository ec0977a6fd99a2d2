"""Weighted k-nearest-neighbour classification of frozen features (the DINO protocol).

No training and no hyper-parameter search, so it is the cheapest honest read of how semantic the features are, and the
one a training run launches on every new checkpoint. Each val image is classified by its ``k`` most cosine-similar
train images, each voting for its class with weight ``exp(similarity / temperature)``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from smim_dist.config import Config, ConfigError
from smim_dist.engine.checkpoint import META
from smim_dist.eval.data import LabelledSplit, centre_crop_loader, eval_splits
from smim_dist.eval.features import FEATURES, extract_features, load_encoder, rank_and_world, resolve_eval_run

SIMILARITY_ELEMENTS = 1 << 27
"""queries x train images per similarity chunk (512 MiB of float32), so memory stays flat as the memory bank grows"""
RESULTS_FILE = "results.json"


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
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    hits = ranked == val_labels[:, None]
    result = {"top1": hits[:, 0].float().mean().item()}
    if num_classes >= 5:
        result["top5"] = hits.any(dim=1).float().mean().item()
    return result


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


def _previous(results_file: Path, settings: dict, kinds: Sequence[str]) -> dict | None:
    """The stored results if they answer this request (the checkpoint's path is not compared: a run directory may
    move); an error if the file holds other results."""
    if not results_file.exists():
        return None
    stored = json.loads(results_file.read_text())
    differences = [f"{key}: stored {stored.get(key)!r}, asked {value!r}" for key, value in settings.items()
                   if stored.get(key) != value]
    differences += [f"no {kind} features" for kind in kinds if kind not in stored]
    if differences:
        raise ConfigError(f"{results_file} holds other results ({'; '.join(differences)}); pass --force to replace "
                          "them or --out DIR to write elsewhere")
    return stored


def _write_json_atomic(path: Path, values: dict) -> None:
    """A reader (or a second evaluation job) sees the old file or the whole new one, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(tmp, path)


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


def run_knn(checkpoint: Path, out: Path | None = None, k: int = 20, temperature: float = 0.07,
            feature: str = "both", overrides: Sequence[str] = (), force: bool = False, batch_size: int = 128,
            device: torch.device | None = None, log: Callable[[str], None] = print) -> dict:
    """Evaluate a run's latest checkpoint (or a ``checkpoints/<tag>`` one) and write ``results.json`` to ``out``
    (default ``<run_dir>/eval/<tag>/``); returns the results. Results already stored for the same checkpoint,
    settings and data are returned without recomputing unless ``force``. Every input is checked before the model is
    loaded. In a process group every rank must call it; rank 0 writes and logs."""
    start = time.perf_counter()
    kinds = _check_settings(k, temperature, feature, batch_size)
    checkpoint, cfg = resolve_eval_run(Path(checkpoint), overrides)
    train, val = eval_splits(cfg)
    if k > train.num_samples:
        raise ConfigError(f"--k {k} is more neighbours than the {train.num_samples} train images in {train.path}; "
                          f"pass --k {train.num_samples} or less")
    say = log if rank_and_world()[0] == 0 else (lambda _: None)
    results_file = (Path(out) if out else checkpoint.parent.parent / "eval" / checkpoint.name) / RESULTS_FILE
    settings = {"protocol": "knn", "tag": checkpoint.name, "k": k, "temperature": temperature,
                "train_data": str(train.path.resolve()), "val_data": str(val.path.resolve())}
    previous = None if force else _previous(results_file, settings, kinds)
    if previous is not None:
        say(f"kNN results for {checkpoint} are already in {results_file}; nothing to do (--force recomputes)")
        return previous

    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    accuracies = _accuracies(checkpoint, cfg, (train, val), kinds, k, temperature, batch_size, device, say)
    meta = checkpoint / META
    results: dict[str, Any] = {
        **settings, "checkpoint": str(checkpoint.resolve()),
        "step": json.loads(meta.read_text())["step"] if meta.exists() else None, **accuracies,
        "train_samples": train.num_samples, "val_samples": val.num_samples,
        "seconds": round(time.perf_counter() - start, 2)}
    if rank_and_world()[0] == 0:
        _write_json_atomic(results_file, results)
    say(f"kNN (k={k}, T={temperature}) of {checkpoint} (step {results['step']}): "
        + ", ".join(f"{kind} top-1 {results[kind]['top1']:.4f}" for kind in kinds) + f"; wrote {results_file}")
    return results
