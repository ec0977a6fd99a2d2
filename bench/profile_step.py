"""Where a pre-training step spends its time: torch.profiler over target, forward, backward and optimizer phases.

    python bench/profile_step.py --size small --img 224 --batch 16 --target maskfeat            # CPU
    python bench/profile_step.py --size micro --img 64 --patch 8 --batch 64 --target pixels     # CPU, small and fast
    python bench/profile_step.py --size base --batch 256 --dtype bf16 --trace /tmp/prof         # one GPU, chrome traces

For each model (vanilla MIM, SemanticMIM proxy) the step is the loop's (``smim_dist.engine.train_step``) on a plain
model: HOG / pixel targets under no_grad, forward, loss, backward, AdamW; ``--dtype bf16`` casts the model to bf16 as
DeepSpeed's bf16 engine holds it (no autocast). Each phase runs inside a ``record_function`` range (closed by a device
sync on GPU, so the range's wall time is the phase's device time); every operator's self time is charged to the phase
whose range it starts in, which also catches the backward ops that CUDA runs on the autograd engine's own thread.
Times are self CUDA time on GPU and self CPU time on CPU; operators are the ATen ops that launch the kernels, so names
read the same on both. Profiled times carry the profiler's own overhead: time steps with bench/step.py.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from smim_dist.config import ModelConfig
from smim_dist.data.batch import DeviceBatch
from smim_dist.engine.train_step import PlainEngine, train_step
from smim_dist.models.mim import MIMModel
from smim_dist.targets.build import MIMTarget
from step import DTYPES, build_target, make_batch

Step = Callable[[DeviceBatch], None]
PHASES = ("target", "forward", "backward", "optimizer")
GROUPS = {  # first match wins; the target and optimizer phases are grouped by phase, not by name
    "attention": ("scaled_dot_product", "attention"),
    "matmul/linear": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm"),
    "layernorm": ("layer_norm",),
    "gelu": ("gelu",),
    "gather/scatter/index": ("gather", "scatter", "index", "aten::cat", "aten::where"),
}


def build_step(mode: str, args: argparse.Namespace, device: torch.device, target: MIMTarget) -> Step:
    """The training step of ``smim_dist.engine.loop`` without DeepSpeed: the same modules, phases made visible."""
    cfg = ModelConfig(size=args.size, mode=mode, img_size=args.img, patch_size=args.patch, num_proxy=args.num_proxy)
    dtype = DTYPES[args.dtype]
    model = MIMModel(cfg, target.out_dim).to(device, dtype)
    engine = PlainEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda"))

    @contextlib.contextmanager
    def phase(name: str):
        """Closing each phase with a sync makes the range's wall time equal to the work it queued on the GPU."""
        with record_function(name):
            yield
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    return lambda batch: train_step(engine, target, batch, dtype, phase)


def run_profile(step: Step, batch: DeviceBatch, args: argparse.Namespace, device: torch.device) -> profile:
    """Warm-up steps (optimizer state, allocator, kernel selection) are run under the schedule and then discarded."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    plan = schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1)
    with profile(activities=activities, schedule=plan) as prof:
        for _ in range(args.warmup + args.steps):
            step(batch)
            prof.step()
    return prof


def op_self_time(event, device: torch.device) -> float:
    """The GPU's time where there is one: host time there is launch overhead, not the cost of the op."""
    return event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total


def phase_of(start: float, ranges: list[tuple[float, float, str]]) -> str:
    """By time, not by parent: CUDA's backward ops run on another thread than the "backward" range."""
    for begin, end, name in ranges:
        if begin <= start <= end:
            return name
    return "other"


def group_of(name: str, phase: str) -> str:
    """Target and optimizer are whole phases; within forward/backward the op name decides."""
    if phase in ("target", "optimizer"):
        return phase
    for group, patterns in GROUPS.items():
        if any(pattern in name for pattern in patterns):
            return group
    return "other"


def summarize(prof: profile, device: torch.device):
    """Per-phase wall time, per-(op, phase) self time and per-group self time (all in µs over the active steps).

    On CPU the ranges' own self time (Python and dispatch between ops) goes to "other", so the groups add up to the
    phases; on GPU it is host time and has no device time.
    """
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU and not e.is_async]
    ranges = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PHASES]
    phases: dict[str, float] = defaultdict(float)
    for begin, end, name in ranges:
        phases[name] += end - begin
    ops: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    groups: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name.startswith("ProfilerStep"):
            continue
        self_time = op_self_time(event, device)
        if event.name in PHASES:
            groups["other"] += self_time
            continue
        phase = phase_of(event.time_range.start, ranges)
        ops[event.name, phase][0] += self_time
        ops[event.name, phase][1] += 1
        groups[group_of(event.name, phase)] += self_time
    return phases, ops, groups


def report(mode: str, prof: profile, device: torch.device, args: argparse.Namespace) -> None:
    """Phases as shares of wall time; groups and operators as shares of all self time, so each line adds up."""
    phases, ops, groups = summarize(prof, device)
    step_us = sum(phases.values()) / args.steps
    total_self = sum(groups.values()) or 1.0
    busy = f", GPU busy {100 * total_self / (step_us * args.steps):.0f}% of it" if device.type == "cuda" else ""
    print(f"\n== {mode}: {step_us / 1e3:.1f} ms/step, {step_us / 1e3 / args.batch:.3f} ms/image{busy}")
    print("phases:  " + "  ".join(f"{p} {100 * phases[p] / (step_us * args.steps):.1f}%" for p in PHASES))
    print("groups:  " + "  ".join(f"{g} {100 * t / total_self:.1f}%"
                                  for g, t in sorted(groups.items(), key=lambda kv: -kv[1])))
    label = "self CUDA" if device.type == "cuda" else "self CPU"
    print(f"top {args.top} operators by {label} time:")
    print(f"  {'operator':58s} {'phase':9s} {'%':>6s} {'ms/step':>9s} {'calls/step':>10s}")
    for (name, phase), (self_us, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {name[:58]:58s} {phase:9s} {100 * self_us / total_self:6.1f} {self_us / 1e3 / args.steps:9.2f} "
              f"{calls / args.steps:10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="micro")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--num-proxy", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--target", choices=["maskfeat", "pixels"], default="maskfeat")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="the model's weights and compute: bf16 casts it to bf16 as DeepSpeed's bf16 engine does "
                             "(no autocast)")
    parser.add_argument("--mode", choices=["vanilla", "proxy", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=2, help="profiled but discarded steps")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps that are reported")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--trace", type=Path, help="write a chrome trace <DIR>/<mode>.json per model")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    target = build_target(args.target, args.patch, device)
    batch = make_batch(args, device)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"ViT-{args.size}/{args.patch} at {args.img}px, batch {args.batch}, {args.target} target, mask ratio "
          f"{args.mask_ratio}, {args.num_proxy} proxies, {args.dtype}, {args.steps} steps after {args.warmup} warm-up, "
          f"on {machine}, torch {torch.__version__}")
    for mode in ("vanilla", "proxy") if args.mode == "both" else (args.mode,):
        prof = run_profile(build_step(mode, args, device, target), batch, args, device)
        report(mode, prof, device, args)
        if args.trace:
            args.trace.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.trace / f"{mode}.json"))


if __name__ == "__main__":
    main()
