"""The paper's attention analyses (Fig. 1/7, 8, 9, 13) on a checkpoint's frozen encoder, vanilla or proxy mode.

    smim-eval attention --checkpoint runs/maskfeat_proxy --layer 11 --images 256 --query 7,7

For the first ``SHOWN_IMAGES`` val images: one query patch's attention over the patches and each prefix token's
([PROXY] in proxy mode, [CLS] in vanilla) attention over the patches, at ``--layer``. Over ``--images`` val images:
each prefix token's mean attention map and how concentrated it is, and the mean attention distance of every head of
every layer. Attention maps are head-averaged raw softmax weights over the patch keys (they sum to the share of
attention that goes to patches, ``patch_mass``; the rest goes to prefix tokens). Entropies and distances renormalise
over the patch keys, so a token that mostly attends to prefix tokens is still described by where its patch attention
goes. Layers are 0-based block indices; the query is a 0-based (row, col) of the patch grid. One process.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from smim_dist.config import Config, ConfigError
from smim_dist.data.batch import IMAGENET_MEAN, IMAGENET_STD
from smim_dist.eval.attention_plots import render_figures
from smim_dist.eval.data import centre_crop_loader, eval_splits
from smim_dist.eval.features import default_device, load_encoder, resolve_eval_run
from smim_dist.eval.options import option
from smim_dist.eval.results import checkpoint_header, merge_results, results_folder
from smim_dist.files import write_atomic
from smim_dist.vit_sizes import image_grid, vit_size

SHOWN_IMAGES = 4
"""images whose per-image maps (Fig. 1/7, 8) are stored and drawn"""
BATCH = 8
"""images per forward pass: every layer's attention of a batch is held at once (ViT-B/16: ~24 MB per image)"""
RESULTS_FILE = "attention.json"
ATTENTION_DIR = "attention"


def attention_weights(attn: Attention, qkv: Tensor) -> Tensor:
    """``[B, heads, N, N]`` softmax attention of a timm ``Attention`` from its qkv projection's output, computed as its
    unfused path does (q/k norm, scale, softmax)."""
    batch, tokens, _ = qkv.shape
    q, k, _ = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)


def attention_modules(encoder: VisionTransformer) -> list[Attention]:
    return [cast(Attention, block.attn) for block in encoder.blocks]


@contextmanager
def captured_attention(encoder: VisionTransformer) -> Iterator[list[Tensor]]:
    """A list that collects each block's attention weights, in block order, for the forward passes run inside.

    timm runs fused attention and never materialises the weights; a hook on each qkv projection recomputes them
    without touching the model (the fused output is unchanged)."""
    weights: list[Tensor] = []

    def hook(attn: Attention) -> Callable[[torch.nn.Module, tuple, Tensor], None]:
        return lambda _module, _inputs, qkv: weights.append(attention_weights(attn, qkv))

    handles = [attn.qkv.register_forward_hook(hook(attn)) for attn in attention_modules(encoder)]
    try:
        yield weights
    finally:
        for handle in handles:
            handle.remove()


def patch_distances(grid: tuple[int, int], patch_size: int) -> Tensor:
    """``[P, P]`` Euclidean distances in pixels between patch centres, row-major patch order."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size
    return torch.cdist(centres, centres)


def mean_attention_distance(weights: Tensor, num_prefix: int, distances: Tensor) -> Tensor:
    """``[B, heads]``: per image and head, the attention-weighted query-key distance averaged over the patch queries.
    Prefix tokens have no position, so they are dropped as queries and keys and each query's patch attention is
    renormalised to sum to 1."""
    patches = weights[..., num_prefix:, num_prefix:].double()
    patches = patches / patches.sum(dim=-1, keepdim=True)
    return (patches * distances.to(patches.device)).sum(dim=-1).mean(dim=-1)


def patch_entropy(maps: Tensor) -> Tensor:
    """Entropy in nats of attention maps ``[..., P]`` renormalised over the patches: 0 on one patch, log P uniform."""
    probs = maps / maps.sum(dim=-1, keepdim=True)
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)


def prefix_names(cfg: Config) -> list[str]:
    """proxy mode: proxy0 (also the [CLS] token) .. proxyP-1; vanilla: cls."""
    return [f"proxy{i}" for i in range(cfg.model.num_prefix)] if cfg.model.mode == "proxy" else ["cls"]


def _checked_request(cfg: Config, layer: int | None, query: tuple[int, int] | None) -> tuple[int, tuple[int, int]]:
    """The layer and query with their defaults (last layer, centre patch), refused when outside the model."""
    depth = vit_size(cfg.model.size).depth
    layer = depth - 1 if layer is None else layer
    if not 0 <= layer < depth:
        raise ConfigError(f"--layer {layer}: the encoder has {depth} blocks, so a layer is 0 .. {depth - 1}")
    grid = image_grid(cfg.model.img_size, cfg.model.patch_size)
    query = (grid[0] // 2, grid[1] // 2) if query is None else query
    if not (0 <= query[0] < grid[0] and 0 <= query[1] < grid[1]):
        raise ConfigError(f"--query {query[0]},{query[1]}: the patch grid is {grid[0]}x{grid[1]}, so a query is "
                          f"ROW,COL with 0 <= ROW < {grid[0]} and 0 <= COL < {grid[1]}")
    return layer, query


class _Totals:
    """Running sums over the images seen, one batch's attention at a time."""

    def __init__(self, depth: int, heads: int, num_prefix: int, num_patches: int):
        self.images = 0
        self.distance = torch.zeros(depth, heads, dtype=torch.float64)
        self.prefix_map = torch.zeros(num_prefix, num_patches, dtype=torch.float64)
        self.prefix_entropy = torch.zeros(num_prefix, dtype=torch.float64)

    def add(self, weights: list[Tensor], layer: int, num_prefix: int, distances: Tensor) -> None:
        self.images += weights[0].shape[0]
        self.distance += torch.stack([mean_attention_distance(w, num_prefix, distances).sum(0).cpu() for w in weights])
        prefix = weights[layer][:, :, :num_prefix, num_prefix:].mean(dim=1).double().cpu()
        self.prefix_map += prefix.sum(0)
        self.prefix_entropy += patch_entropy(prefix).sum(0)


def _grid_list(values: Tensor, grid: tuple[int, int]) -> list:
    return [[round(v, 6) for v in row] for row in values.reshape(grid).tolist()]


def _analyse(encoder: VisionTransformer, batches: Iterable[tuple[Tensor, Tensor]], cfg: Config, layer: int,
             query: tuple[int, int], num_images: int, device: torch.device) -> tuple[_Totals, list[dict], list[Tensor]]:
    """Running sums over the first ``num_images`` images, and the shown images' maps and uint8 pixels."""
    grid = image_grid(cfg.model.img_size, cfg.model.patch_size)
    num_prefix, modules = encoder.num_prefix_tokens, attention_modules(encoder)
    totals = _Totals(len(modules), modules[0].num_heads, num_prefix, grid[0] * grid[1])
    distances = patch_distances(grid, cfg.model.patch_size)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    query_token = num_prefix + query[0] * grid[1] + query[1]
    shown: list[dict] = []
    pixels: list[Tensor] = []
    for images, indices in batches:
        images, indices = images[: num_images - totals.images], indices[: num_images - totals.images]
        with torch.no_grad(), captured_attention(encoder) as weights:
            encoder.forward_features((images.to(device).float() - mean) / std)
            totals.add(weights, layer, num_prefix, distances)
        at_layer = weights[layer].mean(dim=1)[:, :, num_prefix:].cpu()
        for image, index, maps in zip(images, indices.tolist(), at_layer):
            if len(shown) < SHOWN_IMAGES:
                shown.append({"index": index, "query": _grid_list(maps[query_token], grid),
                              "prefix": [_grid_list(m, grid) for m in maps[:num_prefix]]})
                pixels.append(image.clone())  # FFCV reuses its batch buffers
        if totals.images >= num_images:
            break
    return totals, shown, pixels


def summary(results: dict, out_dir: Path) -> dict:
    """The numbers worth comparing across checkpoints, for ``results.json``: per layer the head-averaged mean attention
    distance (Fig. 13), and per prefix token the entropy of its maps relative to uniform attention (Fig. 9)."""
    return {"layer": results["layer"], "images": results["images"], "query": results["query"],
            "mean_distance_px": [round(sum(row) / len(row), 4) for row in results["mean_distance_px"]],
            "prefix_entropy": {item["token"]: round(item["mean_entropy"] / results["max_entropy"], 6)
                               for item in results["prefix_mean"]},
            "figures": str(out_dir), "seconds": results["seconds"]}


@dataclass(frozen=True)
class AttentionOptions:
    """The model's last block and centre patch by default, which depend on its size."""
    layer: int | None = None
    """0-based block of the attention maps; None: the last"""
    images: int = 64
    """val images averaged over"""
    query: tuple[int, int] | None = option(None, metavar="ROW,COL")
    """0-based patch whose attention is drawn; None: the centre"""


def run_attention(checkpoint: Path, out: Path | None = None, options: AttentionOptions = AttentionOptions(),
                  overrides: Sequence[str] = (), device: torch.device | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Analyse the first ``options.images`` val images of a run's latest (or a ``checkpoints/<tag>``) checkpoint;
    write ``attention.json`` and PNGs to ``<out>/attention/`` (``out`` defaults to ``<run_dir>/eval/<tag>``), a
    summary into ``<out>/results.json`` beside the other protocols', and return the full results. Every input is
    checked before the model is loaded."""
    start = time.perf_counter()
    images = options.images
    if images <= 0:
        raise ConfigError(f"--images {images}: the analyses need at least 1 image")
    checkpoint, cfg = resolve_eval_run(Path(checkpoint), overrides)
    layer, query = _checked_request(cfg, options.layer, options.query)
    val = eval_splits(cfg)[1]
    if images > val.num_samples:
        raise ConfigError(f"--images {images} is more than the {val.num_samples} val images in {val.path}")
    folder = results_folder(checkpoint, out)
    out_dir = folder / ATTENTION_DIR

    device = device or default_device()
    encoder = load_encoder(checkpoint, cfg, device)
    loader = centre_crop_loader(val, cfg.model.img_size, min(BATCH, images), cfg.data.num_workers)
    totals, shown, pixels = _analyse(encoder, loader, cfg, layer, query, images, device)
    grid = image_grid(cfg.model.img_size, cfg.model.patch_size)
    prefix_map = totals.prefix_map / totals.images
    results: dict[str, Any] = {
        "protocol": "attention", **checkpoint_header(checkpoint), "mode": cfg.model.mode,
        "val_data": str(val.path.resolve()), "images": totals.images, "layer": layer, "depth": totals.distance.shape[0],
        "num_heads": totals.distance.shape[1], "grid": list(grid), "patch_size": cfg.model.patch_size,
        "img_size": cfg.model.img_size, "query": list(query), "prefix_tokens": prefix_names(cfg),
        "max_entropy": math.log(grid[0] * grid[1]), "shown": shown,
        "prefix_mean": [{"token": name, "map": _grid_list(prefix_map[i], grid),
                         "patch_mass": round(prefix_map[i].sum().item(), 6),
                         "entropy_of_mean": round(patch_entropy(prefix_map[i]).item(), 6),
                         "mean_entropy": round(totals.prefix_entropy[i].item() / totals.images, 6)}
                        for i, name in enumerate(prefix_names(cfg))],
        "mean_distance_px": [[round(d, 4) for d in row] for row in (totals.distance / totals.images).tolist()]}
    out_dir.mkdir(parents=True, exist_ok=True)
    results["figures"] = render_figures(out_dir, results, pixels)
    results["seconds"] = round(time.perf_counter() - start, 2)
    write_atomic(out_dir / RESULTS_FILE, json.dumps(results, indent=1) + "\n")
    merge_results(folder, checkpoint_header(checkpoint), "attention", summary(results, out_dir))
    log(f"attention of {checkpoint} (step {results['step']}, layer {layer}, {totals.images} images): wrote "
        f"{out_dir / RESULTS_FILE} and {len(results['figures'])} figures")
    return results
