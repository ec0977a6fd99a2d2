"""The GPU half of ``bench/gpu_check.sh``: bf16 against fp32 through the DeepSpeed engine, then the engine's own speed.

    python bench/gpu_check.py --batch 256
    python bench/gpu_check.py --smoke     # on the CPU at toy size: checks the script itself (tests/test_bench_step.py)

1. One ViT-B/16 proxy model (MaskFeat target) is wrapped twice from the same weights, in a bf16 and in an fp32
   DeepSpeed engine, exactly as ``smim-train`` builds them. On one batch both compute the loss, take one optimizer
   step and compute the loss again; each bf16 loss must be finite and within ``--tolerance`` (relative) of fp32's.
2. The bf16 engine then trains ``--steps`` steps at ``--batch`` with the training loop's step
   (``smim_dist.engine.train_step``: targets, forward, loss, ``engine.backward``, ``engine.step``): images/s and MFU of
   the product path, DeepSpeed's overheads included, next to the same engine with ``engine.compile`` (the lever for
   the MFU goal: plain torch gained a third from compiling), with ``engine.overlap_comm`` (one GPU has nothing to
   overlap, so that row prices its synchronisation at the end of each backward) and the same step of the same model
   by plain torch (bf16 weights as the engine's, fused AdamW on them, no fp32 master copy), all in this process; then
   the whole training loop
   (``EpochRunner.run_epoch`` on uint8 loader batches: normalisation, targets, the non-finite guard, metrics, a host
   read every ``engine.check_every_steps``) around the same bf16 engine, to show what the loop adds to the engine,
   and every host synchronisation in its steps by source line (``torch.cuda.set_sync_debug_mode``), and the top
   operators of a few of its steps by self device time, from the loop's own profiler (``log.profile_steps``).
3. The DALL-E tokenizer (BEiT's target: 52 GFLOP per 112-px view, as much as the ViT-B/16 training step's 53) is
   timed in float32, as the target runs it by default (float16 convolutions, as OpenAI's original) and in
   channels-last layout, with the share of codes each agrees on (random weights: a numerical-sensitivity figure only).
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import deepspeed
import torch

from smim_dist.config import Config, ModelConfig
from smim_dist.engine.deepspeed_setup import build_engine, set_lr
from smim_dist.engine.distributed import init_distributed
from smim_dist.engine.loop import TrainState
from smim_dist.engine.step_profiler import StepProfiler
from smim_dist.engine.train_step import forward_loss, train_step
from smim_dist.models.flops import forward_flops
from smim_dist.models.mim import MIMModel
from smim_dist.targets.dalle import DalleEncoder, map_pixels
from scaling import build_runner, make_config, synthetic_batch, time_steps
from step import StepRunner, build_target, make_batch, peak_tflops, timed


def engine_config(args, precision: str, batch: int) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(size=args.size, mode="proxy", drop_path=0.0, img_size=args.img, patch_size=args.patch)
    cfg.optim.global_batch = cfg.optim.micro_batch = batch
    cfg.engine.precision = precision
    return cfg


def check_bf16_matches_fp32(args, device, target) -> bool:
    torch.manual_seed(0)
    model = MIMModel(engine_config(args, "fp32", args.check_batch).model, target.out_dim)
    args_small = argparse.Namespace(**{**vars(args), "batch": args.check_batch})
    batch = make_batch(args_small, device)
    losses = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        engine = build_engine(engine_config(args, precision, args.check_batch), copy.deepcopy(model).to(device), 1,
                              device)
        engine.eval()
        with torch.no_grad():
            before = forward_loss(engine, target, batch, dtype)[0]
        engine.train()
        set_lr(engine, 1e-3)
        train_step(engine, target, batch, dtype)
        engine.eval()
        with torch.no_grad():
            after = forward_loss(engine, target, batch, dtype)[0]
        losses[precision] = (float(before), float(after))
        del engine
    ok = True
    for index, label in enumerate(("loss before the step", "loss after one AdamW step")):
        fp32, bf16 = losses["fp32"][index], losses["bf16"][index]
        error = abs(bf16 - fp32) / abs(fp32)
        passed = torch.isfinite(torch.tensor(bf16)).item() and error <= args.tolerance
        ok &= passed
        print(f"  {label}: fp32 {fp32:.6f}, bf16 {bf16:.6f}, relative difference {error:.2e} "
              f"(tolerance {args.tolerance:.0e}) {'ok' if passed else 'FAILED'}")
    return ok


def time_engine(args, dist_info, target, peak: float) -> bool:
    """Prints the step times side by side; returns whether the loop's host syncs could be listed."""
    device = dist_info.device
    torch.manual_seed(0)
    cfg = engine_config(args, "bf16", args.batch)
    batch = make_batch(args, device)

    def engine_step(engine_setting: str | None):
        """A step of the bf16 engine ``smim-train`` builds, with one ``engine.*`` switch turned on."""
        variant = copy.deepcopy(cfg)
        if engine_setting:
            setattr(variant.engine, engine_setting, True)
        engine = build_engine(variant, MIMModel(cfg.model, target.out_dim).to(device), 1, device)
        return lambda: train_step(engine, target, batch, torch.bfloat16)

    plain = StepRunner(cfg.model, target, argparse.Namespace(dtype="bf16", host_sync=False, compile=False), device)
    steps = {"DeepSpeed bf16 engine (ZeRO 1)": engine_step(None),
             "DeepSpeed bf16 engine (ZeRO 1), engine.compile": engine_step("compile"),
             "DeepSpeed bf16 engine (ZeRO 1), engine.overlap_comm": engine_step("overlap_comm"),
             "plain torch, bf16 weights": lambda: plain.step(batch)}
    flops = 3 * forward_flops(cfg.model, args.mask_ratio, True, target.out_dim) * args.batch
    seconds = {}
    for label, step in steps.items():
        for _ in range(args.warmup):
            step()
        seconds[label] = timed(step, args.steps, device)
        tflops = flops / seconds[label] / 1e12
        print(f"  {label}, {model_name(args)} proxy, MaskFeat, batch {args.batch}: {1e3 * seconds[label]:.1f} ms/step, "
              f"{args.batch / seconds[label]:.0f} images/s, {tflops:.0f} TFLOP/s, MFU {100 * tflops / peak:.1f}%")
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds["loop"], syncs_listed = time_loop(args, dist_info)
    tflops = flops / seconds["loop"] / 1e12
    memory = (f", peak memory {(torch.cuda.max_memory_allocated(device) - held) / 2**30:.1f} GiB (model, optimizer "
              "state, activations)" if device.type == "cuda" else "")
    print(f"  the training loop around the DeepSpeed bf16 engine: {1e3 * seconds['loop']:.1f} ms/step, "
          f"{args.batch / seconds['loop']:.0f} images/s, {tflops:.0f} TFLOP/s, MFU {100 * tflops / peak:.1f}%{memory}")
    engine_time, compiled_time, overlapped_time, plain_time, loop_time = seconds.values()
    print(f"  step time / plain torch's: DeepSpeed bf16 {engine_time / plain_time:.2f}, compiled "
          f"{compiled_time / plain_time:.2f}, the training loop {loop_time / plain_time:.2f}")
    print(f"  engine.overlap_comm / without: {overlapped_time / engine_time:.3f} (on one GPU nothing overlaps: this is "
          "the price of its synchronisation at the end of each backward)")
    return syncs_listed


def time_loop(args, dist_info) -> tuple[float, bool]:
    """Seconds per step of ``EpochRunner.run_epoch``, the fastest of 3 rounds of ``args.steps`` steps, and whether
    listing its host syncs and profiling it worked."""
    loop_args = argparse.Namespace(size=args.size, mode="proxy", img=args.img, patch=args.patch, target="maskfeat",
                                   mask_ratio=args.mask_ratio, batch=args.batch, precision="bf16")
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = make_config(loop_args, 1, 1, out_dir)
        cfg.model.drop_path = 0.0
        runner, _ = build_runner(cfg, dist_info)
        batch = synthetic_batch(cfg, dist_info)
        runner.run_epoch([batch] * args.warmup, TrainState(), lambda: False)
        elapsed, _ = time_steps(runner, batch, args.steps, rounds=3)
        syncs_listed = run_part(lambda: report_syncs(runner, batch, args.steps))
        profiled = run_part(lambda: report_profile(runner, batch, Path(out_dir) / "profile"))
        runner.logger.close()
    return elapsed / args.steps, syncs_listed and profiled


def report_profile(runner, batch: dict, out_dir: Path, steps: int = 3) -> None:
    """The loop's own profiler, as ``log.profile_steps`` runs it in a training run, over a few steps: the head of the
    operator table it writes beside its trace."""
    runner.profiler = StepProfiler(1, steps, out_dir, 0, runner.device)
    runner.run_epoch([batch] * steps, TrainState(), lambda: False)
    table = next(out_dir.glob("*.txt")).read_text().splitlines()
    print(f"  the training loop's own profile of {steps} steps (log.profile_steps), top operators by self time:")
    print("\n".join("    " + line for line in table[:17]))


def report_syncs(runner, batch: dict, steps: int) -> None:
    """Every synchronising CUDA call in ``steps`` steps of the loop, by the Python line that made it, through
    ``torch.cuda.set_sync_debug_mode``: the loop's own reads (every ``engine.check_every_steps`` and at the epoch
    end) and whatever DeepSpeed still does per step."""
    if runner.device.type != "cuda":
        print("  host syncs: listed on CUDA devices only")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.run_epoch([batch] * steps, TrainState(), lambda: False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sources = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                  if "synchroniz" in str(w.message))
    print(f"  host syncs in {steps} steps of the training loop: {sum(sources.values())}"
          + "".join(f"\n    {count} x {where}" for where, count in sources.most_common()))


def time_tokenizer(args, device) -> None:
    """The encoder in float32 throughout (``target.tokenizer_fp16=false``; cuDNN's default TF32 convolutions on Ampere
    and later), as the target runs it by default (float16 convolutions but the output layer, as OpenAI's original),
    and that in channels-last layout; code agreement is against the first."""
    encoder = (DalleEncoder(n_hid=64, vocab_size=512) if args.smoke else DalleEncoder()).to(device)
    views = make_batch(args, device).tokenizer_views
    pixels = map_pixels(views)
    channels_last = copy.deepcopy(encoder).to(memory_format=torch.channels_last)
    variants = {"fp32 throughout (tokenizer_fp16=false)": lambda: encoder(pixels),
                "fp16 convolutions, fp32 output (the default, as OpenAI's)": lambda: encoder(pixels, torch.float16),
                "the default in channels-last layout": lambda: channels_last(
                    pixels.contiguous(memory_format=torch.channels_last), torch.float16)}
    reference = None
    for label, run in variants.items():
        with torch.no_grad():
            codes = run().argmax(dim=1)
            seconds = timed(run, args.steps, device)
        reference = codes if reference is None else reference
        agreement = (codes == reference).float().mean().item()
        print(f"  DALL-E tokenizer, {label}, batch {args.batch} at {views.shape[-1]} px: {1e3 * seconds:.1f} ms, "
              f"codes equal to the first: {100 * agreement:.1f}% (random weights)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--check-batch", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=2e-2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true",
                        help="run every part on the CPU with a micro model, a narrow tokenizer and tiny batches: "
                             "checks the script itself (figures meaningless) before a GPU's minutes are spent on it")
    args = parser.parse_args()
    args.size, args.img, args.patch, args.mask_ratio = "base", 224, 16, 0.6
    if args.smoke:
        args.size, args.img, args.patch, args.batch, args.check_batch, args.warmup, args.steps = \
            "micro", 64, 8, 4, 4, 1, 1
    dist_info = init_distributed()
    device = dist_info.device
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: this check is for a GPU machine (--smoke runs it on the CPU at toy size)")
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU smoke run"
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, DeepSpeed {deepspeed.__version__}")
    target = build_target("maskfeat", args.patch, device)
    print(f"bf16 vs fp32, {model_name(args)} proxy, MaskFeat, one batch of", args.check_batch)
    ok = run_part(lambda: check_bf16_matches_fp32(args, device, target))
    peak, source = peak_tflops(device, "bf16")
    print(f"training loop speed (peak {peak:.0f} TFLOP/s, {source})")
    ok &= run_part(lambda: time_engine(args, dist_info, target, peak))
    ok &= run_part(lambda: time_tokenizer(args, device))
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


def model_name(args) -> str:
    return f"ViT-{args.size}/{args.patch}"


def run_part(part) -> bool:
    """Runs one part; an exception is printed and the next part still runs, so one run of a few minutes on a
    borrowed GPU reports everything that works."""
    try:
        return part() is not False
    except Exception:
        traceback.print_exc()
        print("  FAILED (traceback above); going on with the next part", flush=True)
        torch.cuda.empty_cache()
        return False


if __name__ == "__main__":
    sys.exit(main())
