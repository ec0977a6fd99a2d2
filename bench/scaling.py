"""Data-parallel scaling of the real training step (1 vs 2 processes) and optimizer-state bytes per rank by ZeRO stage.

    python bench/scaling.py --size micro --img 64 --patch 8 --batch 64 --target pixels     # CPU: gloo, 1 thread/process
    python bench/scaling.py --size base --img 224 --patch 16 --batch 128 --precision bf16  # 2 GPUs: NCCL
    python bench/scaling.py --compare-overlap-comm     # also times each world with engine.overlap_comm (ZeRO 1/2)

Weak scaling: every process trains the same micro batch of synthetic images, made once on its device so no loader is
timed, through this project's own loop (``EpochRunner.run_epoch``: targets, DeepSpeed forward, loss, backward, the
all-reduced non-finite flag, step). On CPU each process gets one torch thread, so world size 1 and 2 use one core
per process. Efficiency = throughput(2) / (2 x throughput(1)).

Optimizer state: after one step under ZeRO 0-3 the tensors the torch AdamW inside DeepSpeed updates and keeps are
counted on rank 0, each storage once, next to what the parameter count predicts (2 fp32 moments per parameter, plus an
fp32 master copy where DeepSpeed keeps one, divided by the world size where ZeRO shards them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smim_dist.config import Config, EngineConfig, LogConfig, MaskConfig, ModelConfig, OptimConfig, TargetConfig
from smim_dist.engine.deepspeed_setup import build_engine, check_precision
from smim_dist.engine.distributed import DistInfo, barrier, init_distributed
from smim_dist.engine.loop import EpochRunner, TrainState
from smim_dist.run_logger import RunLogger
from smim_dist.data.masking import build_mask_generator
from smim_dist.models.mask_index import MaskIndices
from smim_dist.models.mim import MIMModel
from smim_dist.targets.build import build_target

STAGES = (0, 1, 2, 3)
WORLDS = (1, 2)


def make_config(args: argparse.Namespace, world: int, zero_stage: int, out_dir: str,
                overlap_comm: bool = False) -> Config:
    """The training defaults, with the benchmark's model and batch, no accumulation and logging that never fires."""
    return Config(
        output_dir=out_dir, run_name="scaling",
        model=ModelConfig(size=args.size, mode=args.mode, img_size=args.img, patch_size=args.patch),
        target=TargetConfig(kind=args.target), mask=MaskConfig(ratio=args.mask_ratio),
        optim=OptimConfig(epochs=1, micro_batch=args.batch, global_batch=args.batch * world),
        engine=EngineConfig(zero_stage=zero_stage, precision=args.precision, overlap_comm=overlap_comm),
        log=LogConfig(every_steps=10**9, progress=False, wandb_mode="disabled"))


def synthetic_batch(cfg: Config, info: DistInfo) -> dict:
    """One loader batch (uint8 images and masks), different per rank, already on the device."""
    generator = torch.Generator().manual_seed(info.rank)
    size = (cfg.optim.micro_batch, 3, cfg.model.img_size, cfg.model.img_size)
    grid = cfg.model.img_size // cfg.model.patch_size
    masks = build_mask_generator(cfg.mask.kind, (grid, grid), cfg.mask.ratio)
    mask = MaskIndices.from_bool(np.stack([masks.mask_for(info.rank, 0, i) for i in range(size[0])])).to(info.device)
    images = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator).to(info.device)
    return {"images": images, "visible": mask.visible, "masked": mask.masked, "corrupt_skipped": 0}


def build_runner(cfg: Config, info: DistInfo) -> tuple[EpochRunner, int]:
    """A fresh model, engine and loop for ``cfg``, as ``smim_dist.train`` builds them, and the parameter count."""
    target = build_target(cfg).to(info.device)
    torch.manual_seed(cfg.seed)
    model = MIMModel(cfg.model, target.out_dim)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = build_engine(cfg, model, info.world_size, info.device)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(cfg, info.is_main, 0, 0)
    return EpochRunner(cfg, engine, target, info.device, logger, steps_per_epoch=10**6), params


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(runner: EpochRunner, batch: dict, steps: int, rounds: int) -> tuple[float, float]:
    """Wall and CPU seconds (the most any rank used) for ``steps`` training steps, in the fastest of ``rounds``, since
    on a shared machine other work only ever slows a round down. Wall time well above CPU time means a rank waited:
    at a collective for the other rank, or for a core that other work held."""
    measured = []
    for _ in range(rounds):
        barrier()
        synchronize(runner.device)
        start, cpu = time.perf_counter(), time.process_time()
        runner.run_epoch([batch] * steps, TrainState(), lambda: False)
        synchronize(runner.device)
        used = torch.tensor([time.perf_counter() - start, time.process_time() - cpu], device=runner.device)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
        measured.append(tuple(used.tolist()))
    return min(measured)


def time_all_reduce(numel: int, device: torch.device, repeats: int = 5) -> float:
    """Seconds for one all-reduce of a gradient-sized fp32 buffer: the communication a data-parallel step adds."""
    grads = torch.zeros(numel, device=device)
    dist.all_reduce(grads)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(grads)
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def optimizer_state_bytes(engine) -> tuple[int, int]:
    """(Adam moments, fp32 master weights) in bytes on this rank. DeepSpeed points the torch optimizer's param groups at
    the flat fp32 partitions it updates (ZeRO 1-3, bf16/fp16), so walking that optimizer finds both; a storage that
    also backs the model's own parameters (ZeRO 0 and ZeRO 3 in fp32) is the model, not extra optimizer state."""
    seen = {t.untyped_storage().data_ptr() for p in engine.module.parameters() for t in (p, getattr(p, "ds_tensor", p))}

    def new_bytes(tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    optimizer = engine.basic_optimizer
    moments = sum(new_bytes(value) for state in optimizer.state.values() for value in state.values()
                  if torch.is_tensor(value))
    master = sum(new_bytes(param) for group in optimizer.param_groups for param in group["params"])
    return moments, master


def expected_state_bytes(params: int, stage: int, world: int, precision: str) -> tuple[int, int]:
    """What the parameter count predicts; ZeRO 1/2 clone their fp32 partition even when the model itself is fp32."""
    shards = world if stage else 1
    master = precision != "fp32" or stage in (1, 2)
    return 8 * params // shards, 4 * params // shards if master else 0


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str, results: mp.SimpleQueue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's calls of deprecated torch collectives
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    info = init_distributed()
    check_precision(args.precision, info.device)
    result = {"overlapped": {}, "state": {}}
    for overlap_comm in (False, True) if args.compare_overlap_comm else (False,):
        cfg = make_config(args, world, args.zero_stage, out_dir, overlap_comm)
        runner, params = build_runner(cfg, info)
        batch = synthetic_batch(cfg, info)
        runner.run_epoch([batch] * args.warmup, TrainState(), lambda: False)
        elapsed, cpu = time_steps(runner, batch, args.steps, args.rounds)
        runner.logger.close()
        runner.engine.destroy()
        timing = {"images_per_s": world * args.batch * args.steps / elapsed, "step_ms": 1e3 * elapsed / args.steps,
                  "cpu_ms": 1e3 * cpu / args.steps}
        (result["overlapped"] if overlap_comm else result).update(timing)
    result.update(all_reduce_ms=1e3 * time_all_reduce(params, info.device), params=params)
    for stage in STAGES:
        runner, _ = build_runner(make_config(args, world, stage, out_dir), info)
        runner.run_epoch([batch], TrainState(), lambda: False)
        result["state"][stage] = optimizer_state_bytes(runner.engine)
        runner.logger.close()
        runner.engine.destroy()
    if info.is_main:
        results.put(result)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model}, {os.cpu_count()} cores ({platform.machine()})"


def run_world(world: int, args: argparse.Namespace) -> dict:
    """All of one world size's measurements, in fresh processes joined over gloo (CPU) or NCCL (GPU). On CPU they are
    forked, inheriting this process's imports (seconds each on a small machine); CUDA needs spawned ones."""
    start_method = "spawn" if torch.cuda.is_available() else "fork"
    results = mp.get_context(start_method).SimpleQueue()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(worker, args=(world, free_port(), args, out_dir, results), nprocs=world,
                           start_method=start_method)
    return results.get()


def report(args: argparse.Namespace, runs: dict[int, dict]) -> dict:
    speedup = runs[2]["images_per_s"] / runs[1]["images_per_s"]
    print(f"{args.mode} ViT-{args.size}/{args.patch} at {args.img}px ({runs[1]['params'] / 1e6:.2f}M params), micro "
          f"batch {args.batch} per process, {args.target} target, ZeRO-{args.zero_stage}, {args.precision}, "
          f"{args.warmup} warm-up + best of {args.rounds} x {args.steps} timed steps, on {machine()}"
          + ("" if torch.cuda.is_available() else f", {args.threads} torch thread(s) per process"))
    print(f"{'processes':>9} {'images/s':>10} {'ms/step':>9} {'CPU ms/step':>12} {'all-reduce ms':>14}")
    for world, run in runs.items():
        print(f"{world:>9} {run['images_per_s']:>10.1f} {run['step_ms']:>9.1f} {run['cpu_ms']:>12.1f} "
              f"{run['all_reduce_ms']:>14.2f}")
    print(f"speedup 2 vs 1 processes: {speedup:.3f}   weak-scaling efficiency: {speedup / 2:.1%}   "
          f"(CPU time per step, 1 / 2 processes: {runs[1]['cpu_ms'] / runs[2]['cpu_ms']:.1%})")
    for world, run in runs.items() if args.compare_overlap_comm else ():
        overlapped = run["overlapped"]
        print(f"{world} process(es) with engine.overlap_comm: {overlapped['images_per_s']:.1f} images/s, "
              f"{overlapped['step_ms']:.1f} ms/step, {overlapped['step_ms'] / run['step_ms']:.3f}x the step time "
              "without")
    print("\noptimizer state per rank after one step, MiB measured (expected from the parameter count)")
    print(f"{'ZeRO':>4} {'world':>5} {'Adam moments':>20} {'fp32 master':>20} {'total':>20}")
    rows = []
    for stage in STAGES:
        for world, run in runs.items():
            measured = run["state"][stage]
            expected = expected_state_bytes(run["params"], stage, world, args.precision)
            rows.append({"stage": stage, "world": world, "moments": measured[0], "master": measured[1],
                         "expected_moments": expected[0], "expected_master": expected[1]})
            cells = zip((*measured, sum(measured)), (*expected, sum(expected)))
            print(f"{stage:>4} {world:>5} " + " ".join(f"{m / 2**20:9.3f} ({e / 2**20:7.3f})" for m, e in cells))
    total = {(r["stage"], r["world"]): (r["moments"], r["moments"] + r["master"]) for r in rows}
    print("total, world 2 / world 1:  " + "  ".join(f"ZeRO-{s} {total[s, 2][1] / total[s, 1][1]:.3f}" for s in STAGES))
    print("Adam moments at world 2, vs ZeRO-0:  "
          + "  ".join(f"ZeRO-{s} {total[s, 2][0] / total[0, 2][0]:.3f}" for s in STAGES))
    timings = {str(world): {k: v for k, v in run.items() if k != "state"} for world, run in runs.items()}
    return {"machine": machine(), "settings": vars(args), "runs": timings,
            "speedup": speedup, "efficiency": speedup / 2, "optimizer_state": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="micro")
    parser.add_argument("--mode", choices=["proxy", "vanilla"], default="proxy")
    parser.add_argument("--img", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="micro batch per process")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--target", choices=["maskfeat", "pixels"], default="pixels")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--zero-stage", type=int, choices=STAGES, default=1, help="ZeRO stage of the timed runs")
    parser.add_argument("--compare-overlap-comm", action="store_true",
                        help="also time each world size with engine.overlap_comm (ZeRO 1/2), in the same processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds; the fastest counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.compare_overlap_comm and args.zero_stage not in (1, 2):
        parser.error(f"--compare-overlap-comm needs --zero-stage 1 or 2 (engine.overlap_comm), not {args.zero_stage}")
    if torch.cuda.is_available() and torch.cuda.device_count() < max(WORLDS):
        parser.error(f"needs {max(WORLDS)} GPUs for the 2-process run, found {torch.cuda.device_count()}")
    results = report(args, {world: run_world(world, args) for world in WORLDS})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
