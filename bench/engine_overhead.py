"""What the DeepSpeed engine adds to a training step: operators, host reads and time, next to plain torch.

    python bench/engine_overhead.py                                   # CPU: micro model, bf16, ZeRO 0-3
    python bench/engine_overhead.py --size base --img 224 --patch 16 --batch 256 --stages 1   # one GPU
    python bench/engine_overhead.py --check-grad-overflow             # DeepSpeed's default bf16 overflow checks
    python bench/engine_overhead.py --torch-autocast --stages 1 2     # DeepSpeed's torch_autocast mode instead
    python bench/engine_overhead.py --stages 1 --show-reads           # where each host read comes from
    python bench/engine_overhead.py --stages 1 2 --compare-contiguous-gradients   # and without DeepSpeed's copies
    python bench/engine_overhead.py --stages 1 2 --compare-overlap-comm           # and with engine.overlap_comm
    python bench/engine_overhead.py --precision fp32 --stages 0 1     # fp32 weights and compute throughout

Each row is the training loop's step (``smim_dist.engine.train_step``: pixel targets, forward, loss, backward, optimizer
step) of the same proxy model on the same batch: plain torch (weights in ``--precision``, gradient clipping, fused
AdamW) and the engine ``smim-train`` builds (its DeepSpeed config, fused AdamW, clipping inside AdamW where
``smim-train`` puts it there), per ZeRO stage. torch.profiler counts the
ATen operators a step runs (on a GPU most launch a kernel, so they are what the host must issue) and the host reads
(``aten::_local_scalar_dense``: ``.item()``, ``bool(tensor)``). On a GPU a read of a device tensor stalls the host
until the device is done; on a CPU reads cost nothing, and some (torch's CPU AdamW reading its step count)
happen only there. Operator counts do not depend on the machine; times do.
"""

from __future__ import annotations

import argparse
import collections
import copy
import time

import deepspeed
import torch
from torch.profiler import ProfilerActivity, profile

from smim_dist.config import Config, ModelConfig
from smim_dist.engine.deepspeed_setup import clip_inside_adamw, deepspeed_config, norm_inside_adamw, param_groups
from smim_dist.engine.distributed import init_distributed
from smim_dist.engine.train_step import PlainEngine, train_step
from smim_dist.models.mim import MIMModel
from step import build_target, make_batch, synchronize


def read_sources(prof) -> collections.Counter:
    """Where the host reads come from: the innermost Python frame above each ``_local_scalar_dense`` (the profile
    records Python frames as ``file.py(line): function`` parents)."""
    sources = collections.Counter()
    for event in prof.events():
        if event.name == "aten::_local_scalar_dense":
            parent = event.cpu_parent
            while parent is not None and ".py(" not in parent.name:
                parent = parent.cpu_parent
            sources[parent.name if parent is not None else "?"] += 1
    return sources


def count_ops(step, steps: int, device: torch.device, show_reads_of: str | None = None) -> tuple[float, float, float]:
    """Operators and host reads per step (profiled), and the unprofiled time per step in ms; with ``show_reads_of`` (the
    row's label), also where the reads come from."""
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=show_reads_of is not None) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = prof.key_averages()
    ops = sum(event.count for event in events if event.key.startswith("aten::")) / steps
    reads = sum(event.count for event in events if event.key == "aten::_local_scalar_dense") / steps
    if show_reads_of is not None:
        print(f"{show_reads_of}:")
        for source, count in read_sources(prof).most_common():
            print(f"    {count / steps:6.1f} reads/step  {source}")
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return ops, reads, 1e3 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="micro")
    parser.add_argument("--img", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--check-grad-overflow", action="store_true",
                        help="turn DeepSpeed's bf16 per-gradient overflow checks back on (its default)")
    parser.add_argument("--show-reads", action="store_true", help="print where each row's host reads come from")
    parser.add_argument("--compare-contiguous-gradients", action="store_true",
                        help="also run ZeRO 1/2 with each gradient left where autograd put it instead of copied into "
                             "DeepSpeed's bucket and partition buffers (zero_optimization.contiguous_gradients: false)")
    parser.add_argument("--compare-overlap-comm", action="store_true",
                        help="also run ZeRO 1/2 with engine.overlap_comm (gradient buckets all-reduced during the "
                             "backward)")
    parser.add_argument("--torch-autocast", action="store_true",
                        help="DeepSpeed's torch_autocast mode instead (fp32 weights and gradients, bf16 compute, "
                             "DeepSpeed's clipping)")
    args = parser.parse_args()
    if args.precision != "bf16" and (args.check_grad_overflow or args.torch_autocast):
        parser.error(f"--check-grad-overflow and --torch-autocast are bf16 modes, not --precision {args.precision}")
    args.mask_ratio = 0.6
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    device = init_distributed().device
    target = build_target("pixels", args.patch, device)
    batch = make_batch(args, device)
    model_cfg = ModelConfig(size=args.size, img_size=args.img, patch_size=args.patch, drop_path=0.0)
    torch.manual_seed(0)
    base = MIMModel(model_cfg, target.out_dim)

    plain = copy.deepcopy(base).to(device, dtype)
    plain_engine = PlainEngine(plain, torch.optim.AdamW(plain.parameters(), fused=True), clip_grad=3.0)
    rows = {}
    label = f"plain torch, {args.precision}"
    rows[label] = count_ops(lambda: train_step(plain_engine, target, batch, dtype), args.steps, device,
                            label if args.show_reads else None)

    def variants(stage: int) -> list[tuple[int, bool, bool]]:
        """(stage, contiguous gradients, overlap_comm): smim-train's setting first, then the comparisons asked for."""
        chosen = [(stage, True, False)]
        if stage in (1, 2):
            chosen += [(stage, False, False)] * args.compare_contiguous_gradients
            chosen += [(stage, True, True)] * args.compare_overlap_comm
        return chosen

    for stage, contiguous, overlap_comm in (row for stage in args.stages for row in variants(stage)):
        cfg = Config()
        cfg.model = model_cfg
        cfg.optim.global_batch = cfg.optim.micro_batch = args.batch
        cfg.engine.precision, cfg.engine.zero_stage = args.precision, stage
        cfg.engine.overlap_comm = overlap_comm
        ds_config = deepspeed_config(cfg, 1, sum(param.numel() for param in base.parameters()))
        if args.check_grad_overflow:
            ds_config["bf16"] = {"enabled": True}
        if not contiguous:
            ds_config["zero_optimization"]["contiguous_gradients"] = False
        if args.torch_autocast:
            ds_config.pop("bf16", None)
            ds_config.update(torch_autocast={"enabled": True, "dtype": "bfloat16"},
                             gradient_clipping=cfg.optim.clip_grad)
            ds_config["zero_optimization"]["compute_grad_norm"] = True
        model = copy.deepcopy(base).to(device)
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decayed_tokens)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                          optimizer=torch.optim.AdamW(groups, lr=cfg.optim.lr, fused=True))
        if norm_inside_adamw(cfg) and not args.torch_autocast:
            clip_inside_adamw(engine, cfg.optim.clip_grad)
        input_dtype = torch.float32 if args.torch_autocast else dtype
        mode = "torch_autocast" if args.torch_autocast else args.precision
        label = (f"DeepSpeed {mode}, ZeRO {stage}" + ("" if contiguous else ", no contiguous gradients")
                 + (", overlap_comm" if overlap_comm else ""))
        rows[label] = count_ops(lambda: train_step(engine, target, batch, input_dtype), args.steps, device,
                                label if args.show_reads else None)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    checks = "on" if args.check_grad_overflow else "off (as smim-train runs)"
    print(f"ViT-{args.size}/{args.patch} proxy at {args.img} px, batch {args.batch}, on {machine}"
          + (f"; DeepSpeed's bf16 overflow checks {checks}" if args.precision == "bf16" else ""))
    print(f"{'step':58s} {'aten ops':>9s} {'host reads':>11s} {'ms/step':>9s}")
    for label, (ops, reads, ms) in rows.items():
        print(f"{label:58s} {ops:9.0f} {reads:11.0f} {ms:9.1f}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
