"""The frozen encoder of a pre-training checkpoint and its features over a labelled split.

The encoder is built exactly as ``smim-export`` builds it (consolidated fp32 weights in a plain timm ViT), so a
protocol measures what downstream users will load. With a process group, each rank encodes its share of the samples
and the features are all-gathered back into sample order, so the result does not depend on the world size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from smim_dist.config import Config, ConfigError, load_config
from smim_dist.data.batch import IMAGENET_MEAN, IMAGENET_STD
from smim_dist.engine.run_dir import CONFIG_FILE
from smim_dist.engine.checkpoint import consolidated_state_dict, resolve_checkpoint
from smim_dist.vit_sizes import vit_size
from smim_dist.models.timm_export import create_timm_encoder, encoder_state_dict

FEATURES = ("cls", "patch")
"""cls: the [CLS] token; patch: the mean of the patch tokens (register tokens, the other proxies, are in neither)"""


def resolve_eval_run(path: Path, overrides: Sequence[str] = ()) -> tuple[Path, Config]:
    """The checkpoint directory and the run's config with ``data.*`` overrides (the evaluation may read the data from
    elsewhere; the model is fixed by the weights). The training machine's files (its data, the BEiT tokenizer) need
    not exist here: each protocol checks the data it reads."""
    checkpoint, cfg = resolve_checkpoint(path)
    fixed = [item for item in overrides if not item.startswith("data.")]
    if fixed:
        raise ConfigError(f"override {fixed[0]!r}: an evaluation may only override data.* keys; the rest of the "
                          "config is the run's and the model is fixed by its weights")
    if overrides:
        cfg = load_config(checkpoint.parent.parent / CONFIG_FILE, list(overrides))
    return checkpoint, cfg


def check_block(block: int, cfg: Config) -> None:
    """Refuse a block the encoder does not have, before anything is loaded (the paper reads blocks 6-7 of 12)."""
    depth = vit_size(cfg.model.size).depth
    if not 1 <= block <= depth:
        raise ConfigError(f"--block {block}: the encoder (model.size={cfg.model.size}) has depth {depth}, so the "
                          f"block must be 1..{depth} (1-based; the paper reads block 7 of ViT-B's 12)")


def load_encoder(checkpoint: Path, cfg: Config, device: torch.device) -> VisionTransformer:
    """The checkpoint's encoder as a frozen timm ViT in eval mode."""
    encoder = create_timm_encoder(cfg.model, encoder_state_dict(consolidated_state_dict(checkpoint)))
    return cast(VisionTransformer, encoder.eval().requires_grad_(False).to(device))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    """This rank's GPU (torchrun and ``init_distributed`` select it), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _tokens(encoder: VisionTransformer, pixels: Tensor, block: int | None) -> Tensor:
    """All tokens after the final norm (``block`` None), or the raw residual stream after block ``block`` (1-based):
    the final norm belongs to the last block's output, and the linear probe normalises what it reads anyway."""
    if block is None:
        return encoder.forward_features(pixels)
    intermediates = encoder.forward_intermediates(pixels, indices=[block - 1], return_prefix_tokens=True,
                                                  stop_early=True, output_fmt="NLC", intermediates_only=True)
    patches, prefix = cast(list[tuple[Tensor, Tensor]], intermediates)[0]
    return torch.cat([prefix, patches], dim=1)


@torch.no_grad()
def extract_features(encoder: VisionTransformer, batches: Iterable[tuple[Tensor, Tensor]], num_samples: int,
                     device: torch.device, kinds: Sequence[str] = FEATURES, block: int | None = None
                     ) -> dict[str, Tensor]:
    """float32 ``[num_samples, D]`` per kind in sample order, from this rank's (uint8 images, sample indices) batches
    and, in a process group, everyone else's; of the final tokens, or of those after block ``block`` (1-based).
    bf16 autocast on GPUs, fp32 on CPUs."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    parts: dict[str, list[Tensor]] = {kind: [] for kind in kinds}
    order = []
    for images, indices in batches:
        pixels = (images.to(device, non_blocking=True).float() - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = _tokens(encoder, pixels, block).float()
        pooled = {"cls": tokens[:, 0], "patch": tokens[:, encoder.num_prefix_tokens:].mean(1)}
        for kind in kinds:
            parts[kind].append(pooled[kind])
        order.append(indices.to(device, copy=True))  # FFCV refills its index buffer with the next batch
    indices = torch.cat(order)
    local = {kind: torch.cat(chunks) for kind, chunks in parts.items()}
    if rank_and_world()[1] > 1:
        indices, local = _all_gather(indices, local)
    if indices.numel() != num_samples or not torch.equal(indices.sort().values, torch.arange(num_samples,
                                                                                            device=device)):
        raise RuntimeError(f"the loaders delivered {indices.numel()} samples, not each of the {num_samples} once")
    return {kind: torch.empty_like(values).index_copy_(0, indices, values) for kind, values in local.items()}


def _all_gather(indices: Tensor, local: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Every rank's indices and features; shares differ by at most one sample, so they are padded to the largest
    (padding rows carry index -1 and are dropped)."""
    count = torch.tensor([indices.numel()], device=indices.device)
    counts = [torch.zeros_like(count) for _ in range(rank_and_world()[1])]
    dist.all_gather(counts, count)
    largest = int(max(counts).item())

    def gather(values: Tensor, fill: float) -> Tensor:
        padded = torch.full((largest, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
        padded[: values.shape[0]] = values
        pieces = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(pieces, padded)
        return torch.cat(pieces)

    indices = gather(indices, -1)
    keep = indices >= 0
    return indices[keep], {kind: gather(values, 0.0)[keep] for kind, values in local.items()}
