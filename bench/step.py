"""Training-step throughput and model-FLOPs utilisation, vanilla MIM vs SemanticMIM, side by side in one process.

    python bench/step.py                                                    # CPU: micro, tiny, small at 224 px
    python bench/step.py --sizes base --batch 256 --dtype bf16 --targets maskfeat beit --compile   # one GPU

A step is the training loop's micro-step (``smim_dist.engine.train_step``) on a plain model: the target under
``no_grad`` (HOG, the DALL-E tokenizer on the half-size view, or normalised pixels), the model's forward and loss,
backward and a fused AdamW step. ``--dtype bf16`` casts the model to bf16 as DeepSpeed's bf16 engine holds it (no
autocast; AdamW then updates the bf16 weights, without DeepSpeed's fp32 master copy). For each size and target the two
models take turns round by round, so clock and thermal drift hit both alike. MFU counts model FLOPs
only (3x the forward count of ``smim_dist.models.flops``, the target generator excluded) against the card's dense
datasheet peak, or on a CPU or an unknown card against the rate this process measures for a large matrix product.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from smim_dist.config import ModelConfig
from smim_dist.data.batch import DeviceBatch
from smim_dist.data.masking import RandomMaskGenerator
from smim_dist.engine.device_peak import datasheet_peak
from smim_dist.engine.train_step import PlainEngine, masked_targets, train_step
from smim_dist.models.flops import forward_flops
from smim_dist.models.mask_index import MaskIndices
from smim_dist.models.mim import MIMModel
from smim_dist.targets.build import MIMTarget
from smim_dist.targets.dalle import DalleEncoder, DalleTokenizer
from smim_dist.targets.hog import HOGTarget
from smim_dist.targets.pixels import PixelTarget

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row:
    size: str
    target: str
    mode: str
    batch: int
    ms_per_step: float
    images_per_s: float
    model_tflops: float
    mfu: float
    target_ms: float


def peak_tflops(device: torch.device, dtype: str) -> tuple[float, str]:
    """The device's dense peak in TFLOP/s and where the figure comes from."""
    if device.type == "cuda":
        listed = datasheet_peak(torch.cuda.get_device_name(device), dtype)
        if listed:
            return listed
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    for _ in range(2):
        a @ a
    synchronize(device)
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ a
    synchronize(device)
    rate = 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12
    return rate, f"measured {size}x{size} {dtype} matmul"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_target(kind: str, patch: int, device: torch.device) -> MIMTarget:
    """BEiT's tokenizer gets random weights of the real architecture: the same cost as OpenAI's, no file needed."""
    if kind == "beit":
        tokenizer = DalleTokenizer(DalleEncoder())
        return MIMTarget(kind, tokenizer, tokenizer.num_codes).to(device)
    generator = HOGTarget(patch) if kind == "maskfeat" else PixelTarget(patch)
    return MIMTarget(kind, generator, generator.out_dim).to(device)


class StepRunner:
    """One model with its optimizer and target; ``step`` is the loop's micro-step without the loader."""

    def __init__(self, cfg: ModelConfig, target: MIMTarget, args, device: torch.device):
        self.cfg, self.target = cfg, target
        self.dtype = DTYPES[args.dtype]
        self.host_sync = args.host_sync
        model = MIMModel(cfg, target.out_dim).to(device, self.dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.engine = PlainEngine(torch.compile(model) if args.compile else model, optimizer)

    def step(self, batch: DeviceBatch) -> None:
        loss = train_step(self.engine, self.target, batch, self.dtype)
        if self.host_sync:
            loss.item()


def timed(fn, steps: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def make_batch(args, device: torch.device) -> DeviceBatch:
    grid = args.img // args.patch
    masks = RandomMaskGenerator((grid, grid), round(args.mask_ratio * grid * grid))
    mask = MaskIndices.from_bool(np.stack([masks.mask_for(0, 0, i) for i in range(args.batch)])).to(device)
    images = torch.randn(args.batch, 3, args.img, args.img, device=device)
    view = grid * DalleEncoder().downsample
    views = torch.rand(args.batch, 3, view, view, device=device)
    return DeviceBatch(images, mask, views)


def bench_pair(size: str, target_kind: str, args, device: torch.device, peak: float) -> list[Row]:
    target = build_target(target_kind, args.patch, device)
    batch = make_batch(args, device)
    runners = {mode: StepRunner(ModelConfig(size=size, mode=mode, img_size=args.img, patch_size=args.patch,
                                            num_proxy=args.num_proxy), target, args, device)
               for mode in ("vanilla", "proxy")}
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step(batch)
    times = {mode: [] for mode in runners}
    for _ in range(args.rounds):
        for mode, runner in runners.items():
            times[mode].append(timed(lambda: runner.step(batch), args.steps, device))
    target_time = timed(lambda: masked_targets(target, batch), args.steps, device)
    rows = []
    for mode, runner in runners.items():
        seconds = statistics.median(times[mode])
        tflops = 3 * forward_flops(runner.cfg, args.mask_ratio, True, target.out_dim) * args.batch / seconds / 1e12
        rows.append(Row(size, target_kind, mode, args.batch, 1e3 * seconds, args.batch / seconds, tflops,
                        tflops / peak, 1e3 * target_time))
    return rows


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_table(rows: list[Row]) -> None:
    print(f"{'size':6s} {'target':9s} {'mode':8s} {'ms/step':>9s} {'images/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'target ms':>9s}")
    for row in rows:
        print(f"{row.size:6s} {row.target:9s} {row.mode:8s} {row.ms_per_step:9.2f} {row.images_per_s:9.1f} "
              f"{row.model_tflops:8.2f} {100 * row.mfu:5.1f}% {row.target_ms:9.2f}")
    for vanilla, proxy in zip(rows[::2], rows[1::2]):
        print(f"{vanilla.size}/{vanilla.target}: proxy / vanilla step time per image "
              f"{proxy.ms_per_step / vanilla.ms_per_step:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["micro", "tiny", "small"])
    parser.add_argument("--targets", nargs="+", choices=["maskfeat", "beit", "pixels"], default=["maskfeat"])
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--num-proxy", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="the models' weights and compute: bf16 casts them to bf16 as DeepSpeed's bf16 engine does "
                             "(no autocast)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (warm-up pays for it)")
    parser.add_argument("--host-sync", action="store_true",
                        help="read the loss on the host every step, to measure what one sync per step costs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    peak, peak_source = peak_tflops(device, args.dtype)
    print(f"{describe_machine(device)}; {args.img}px, patch {args.patch}, batch {args.batch}, mask ratio "
          f"{args.mask_ratio}, {args.num_proxy} proxies, {args.dtype}{', compiled' if args.compile else ''}"
          f"{', host sync every step' if args.host_sync else ''}; peak {peak:.3g} TFLOP/s ({peak_source})",
          flush=True)
    rows = []
    for size in args.sizes:
        for target in args.targets:
            rows += bench_pair(size, target, args, device, peak)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": describe_machine(device), "peak_tflops": peak, "peak_source": peak_source,
                       "args": vars(args), "rows": [asdict(row) for row in rows]}, file, indent=1)


if __name__ == "__main__":
    main()
