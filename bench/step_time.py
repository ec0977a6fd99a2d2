"""Vanilla MIM vs SemanticMIM: training step time per image, same ViT, image size, batch, target and mask ratio.

    python bench/step_time.py --size tiny --img 224 --batch 32            # CPU
    python bench/step_time.py --size base --batch 128 --dtype bf16 --compile   # one GPU

Both variants run in this one process, alternating round by round so drift hits both alike; the report gives the
median per-image time of each, the ratio, and the ratio the FLOP model predicts.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from smim_dist.config import ModelConfig
from smim_dist.loss import gather_masked, mim_loss
from smim_dist.masking import RandomMaskGenerator
from smim_dist.models.flops import forward_flops
from smim_dist.models.mask_index import MaskIndices
from smim_dist.models.mim import MIMModel
from smim_dist.targets.hog import HOGTarget
from smim_dist.targets.pixels import PixelTarget

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_step(mode: str, args, device: torch.device, target_dim: int):
    cfg = ModelConfig(size=args.size, mode=mode, img_size=args.img, patch_size=args.patch, num_proxy=args.num_proxy)
    model = MIMModel(cfg, target_dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if args.compile else model

    def step(images, mask, targets):
        with torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32"):
            loss = mim_loss(forward(images, mask), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return cfg, step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="micro")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--num-proxy", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--target", choices=["maskfeat", "pixels"], default="maskfeat")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    target = (HOGTarget(args.patch) if args.target == "maskfeat" else PixelTarget(args.patch)).to(device)
    grid = args.img // args.patch
    masks = RandomMaskGenerator((grid, grid), round(args.mask_ratio * grid * grid))
    mask = MaskIndices.from_bool(np.stack([masks.mask_for(0, 0, i) for i in range(args.batch)])).to(device)
    images = torch.randn(args.batch, 3, args.img, args.img, device=device)
    targets = gather_masked(target(images), mask.masked)

    variants = {mode: build_step(mode, args, device, target.out_dim) for mode in ("vanilla", "proxy")}
    per_image = {mode: [] for mode in variants}
    for _, step in variants.values():
        for _ in range(2):
            step(images, mask, targets)
    for _ in range(args.rounds):
        for mode, (_, step) in variants.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(images, mask, targets)
            synchronize(device)
            per_image[mode].append((time.perf_counter() - start) / (args.steps * args.batch))

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"ViT-{args.size}/{args.patch} at {args.img}px, batch {args.batch}, {args.target} target, mask ratio "
          f"{args.mask_ratio}, {args.num_proxy} proxies, {args.dtype}{' compiled' if args.compile else ''}, on {machine}")
    medians = {mode: statistics.median(times) for mode, times in per_image.items()}
    for mode, value in medians.items():
        print(f"  {mode:8s} {1e3 * value:8.3f} ms/image  ({1 / value:8.1f} images/s)")
    flops = {mode: forward_flops(cfg, args.mask_ratio, True, target.out_dim) for mode, (cfg, _) in variants.items()}
    print(f"  proxy / vanilla step time: {medians['proxy'] / medians['vanilla']:.3f}   "
          f"(forward FLOPs ratio {flops['proxy'] / flops['vanilla']:.3f})")


if __name__ == "__main__":
    main()
