"""``smim-train``: pre-train on this process, under torchrun / the deepspeed launcher, or as one task of a SLURM job.

    smim-train --config configs/maskfeat_proxy.yaml optim.lr=2e-3 run_name=mf_proxy

Re-running the same command resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

from smim_dist.config import Config, ConfigError, load_config
from smim_dist.preflight import refuse_missing_files
from smim_dist.data.pretrain_loader import build_pretrain_loader, prepare_demo_data
from smim_dist.engine.checkpoint import (check_resumable, latest_tag, newest_valid_tag, prune_checkpoints,
                                        save_checkpoint)
from smim_dist.engine.deepspeed_setup import build_engine, check_precision, set_fp32_precision
from smim_dist.engine.distributed import DistInfo, barrier, init_distributed
from smim_dist.engine.elastic import resume
from smim_dist.engine.loop import EpochRunner, TrainState
from smim_dist.engine.nonfinite_guard import NonFiniteLossError, training_state_finite
from smim_dist.engine.run_dir import check_run_dir, check_writable, create_run_dir
from smim_dist.engine.run_lock import RunLock
from smim_dist.engine.stop_signals import StopSignals
from smim_dist.eval.jobs import SlurmEvalJobs, pending_evals, submit_eval, wait_for_local_evals
from smim_dist.run_logger import RunLogger, check_wandb_credentials
from smim_dist.models.mim import MIMModel
from smim_dist.targets.build import build_target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="smim-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (may name a base: chain)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-3 model.size=small")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_intermixed_args(argv)


def _should_save(cfg: Config, state: TrainState) -> bool:
    return state.epoch % cfg.checkpoint.every_epochs == 0 or state.epoch == cfg.optim.epochs


def resume_tag(cfg: Config, dist_info: DistInfo) -> tuple[str | None, list[str]]:
    """Rank 0 validates the checkpoints (reading every file once) and tells the other ranks which one to load."""
    choice = [newest_valid_tag(cfg.run_dir) if dist_info.is_main else None]
    torch.distributed.broadcast_object_list(choice, src=0)
    tag, skipped = choice[0]
    check_resumable(cfg.run_dir, tag, skipped, cfg.checkpoint.allow_fresh_start)
    return tag, skipped


def save_and_evaluate(cfg: Config, engine, dist_info: DistInfo, state: TrainState, logger: RunLogger,
                      eval_slurm: SlurmEvalJobs | None, eval_processes: list) -> bool:
    """Checkpoint unless the run is diverging (the last step's loss, or any weight or optimizer moment, is not
    finite): ``latest`` never moves past the last good checkpoint. Then rank 0 starts the evaluation job due at this
    epoch and applies retention, which keeps the checkpoints whose evaluation has not finished. Returns whether the
    checkpoint was written; a local evaluation job's process is appended to ``eval_processes``."""
    problem = ("the last step's loss was not finite" if state.bad_in_row else
               None if training_state_finite(engine) else "some weights or optimizer moments are not finite")
    if problem:
        logger.info(f"checkpoint at step {state.step} not written: {problem}; "
                    f"latest stays {latest_tag(cfg.run_dir) or 'unset (no good checkpoint yet)'}")
        return False
    path = save_checkpoint(engine, cfg.run_dir, dist_info, {"train_state": state.state_dict(),
                                                            "config_hash": cfg.hash(), "wandb_id": logger.wandb_id},
                           tag=f"step_{state.step:08d}", meta=state.state_dict())
    logger.info(f"checkpoint {path}")
    if not dist_info.is_main:
        return True
    epoch_closed = state.batch_in_epoch == 0
    every = cfg.eval.every_epochs
    if every and epoch_closed and (state.epoch % every == 0 or state.epoch == cfg.optim.epochs):
        started = submit_eval(cfg, path.name, eval_slurm)
        logger.info(started.line)
        if started.process is not None:
            eval_processes.append(started.process)
    prune_checkpoints(cfg.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every_epochs,
                      keep=pending_evals(cfg.run_dir, cfg.eval.protocols))
    return True


def train(cfg: Config, dist_info: DistInfo, stop_requested=lambda: False,
          eval_slurm: SlurmEvalJobs | None = None) -> TrainState:
    """Build everything for this rank and train until the configured epochs are done or a stop is requested.
    ``eval_slurm``: how to write evaluation jobs under SLURM; without it they are local processes."""
    check_precision(cfg.engine.precision, dist_info.device)
    set_fp32_precision(cfg.engine.tf32)
    resuming = check_run_dir(cfg)
    lock = RunLock(cfg.run_dir).acquire() if dist_info.is_main else None
    try:
        return _train(cfg, dist_info, stop_requested, eval_slurm, resuming)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, dist_info: DistInfo, stop_requested, eval_slurm: SlurmEvalJobs | None,
           resuming: bool) -> TrainState:
    if dist_info.is_main and cfg.data.demo:
        prepare_demo_data(cfg)
    barrier()
    loader, sampler = build_pretrain_loader(cfg, dist_info.rank, dist_info.world_size, dist_info.device)
    if dist_info.is_main:
        create_run_dir(cfg)
    barrier()
    target = build_target(cfg).to(dist_info.device)
    torch.manual_seed(cfg.seed)
    model = MIMModel(cfg.model, target.out_dim)
    if dist_info.is_main:
        check_writable(cfg, sum(p.numel() for p in model.parameters()))
    torch.manual_seed(cfg.seed + 1 + dist_info.rank)
    engine = build_engine(cfg, model, dist_info.world_size, dist_info.device)
    state = TrainState()
    tag, skipped = resume_tag(cfg, dist_info) if resuming else (None, [])
    if tag is not None:
        state = resume(engine, cfg, dist_info, tag)
    logger = RunLogger(cfg, dist_info.is_main, sampler.steps_per_epoch * cfg.optim.epochs, state.step)
    for line in skipped:
        logger.info(line)
    runner = EpochRunner(cfg, engine, target, dist_info.device, logger, sampler.steps_per_epoch, dist_info.rank)
    logger.info(f"run {cfg.run_dir} ({'resumed from ' + tag if tag else 'new'}): {cfg.model.mode} ViT-{cfg.model.size}"
                f" {cfg.target.kind} target, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                f"{dist_info.world_size} x {dist_info.device.type} ranks, ZeRO-{cfg.engine.zero_stage} "
                f"{cfg.engine.precision}, global batch {cfg.optim.global_batch} = "
                f"{engine.train_micro_batch_size_per_gpu()} x {engine.gradient_accumulation_steps()} accumulation x "
                f"{dist_info.world_size}, "
                f"{sampler.steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs")
    if cfg.engine.zero_stage == 0 and cfg.engine.precision != "fp32":
        logger.info(f"note: ZeRO-0 in {cfg.engine.precision} steps through DeepSpeed's unfused fp16-style optimizer, "
                    "which reads the device once per parameter tensor every step (bench/README.md); "
                    "engine.zero_stage=1 is faster and shards the optimizer state")
    if state.epoch >= cfg.optim.epochs:
        logger.info(f"this run already finished its {cfg.optim.epochs} epochs; nothing to do (pick a new run_name, or "
                    "raise optim.epochs under a new run_name, to train again)")
    eval_processes = []
    try:
        while state.epoch < cfg.optim.epochs:
            sampler.set_epoch(state.epoch, state.batch_in_epoch)
            outcome = runner.run_epoch(loader, state, stop_requested)
            saved = True
            if outcome == "stop" or _should_save(cfg, state):
                saved = save_and_evaluate(cfg, engine, dist_info, state, logger, eval_slurm, eval_processes)
            if not saved and (outcome == "stop" or state.epoch >= cfg.optim.epochs):
                raise NonFiniteLossError(f"the run ends diverged at step {state.step}, so its checkpoint was not "
                                         f"written; {latest_tag(cfg.run_dir) or 'no checkpoint'} is its last good one. "
                                         "Lower optim.lr, raise optim.warmup_epochs or use engine.precision=fp32/bf16")
            if outcome == "stop":
                logger.info(f"stopped at step {state.step} on request; the same command resumes the run")
                break
        if state.epoch >= cfg.optim.epochs:
            wait_for_local_evals(eval_processes, stop_requested, logger.info)
    finally:
        runner.log_trace(runner.profiler.close(state.step))
        logger.close()
    return state


def main(argv: list[str] | None = None) -> int:
    """Exit status 128 + signal number when a SIGTERM / SIGUSR2 stopped the run early (after its checkpoint), on every
    rank, the ones that did not receive it too, so torchrun, Kubernetes and SLURM see an unfinished run rather than a
    finished one."""
    args = parse_args(argv)
    stop = StopSignals().install()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop.watch_parent()
    try:
        cfg = load_config(args.config, args.overrides)
        refuse_missing_files(cfg)
        check_wandb_credentials(cfg)
        dist_info = init_distributed()
        state = train(cfg, dist_info, stop)
    except ConfigError as err:
        print(f"smim-train: config error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"smim-train: stopped: {err}", file=sys.stderr)
        return 3
    if state.epoch >= cfg.optim.epochs:
        return 0
    received = stop_signal_of_any_rank(stop, dist_info)
    return 128 + received if received else 0


def stop_signal_of_any_rank(stop: StopSignals, dist_info: DistInfo) -> signal.Signals | None:
    """The stop signal, the same on every rank, though it may have reached only some of them."""
    received = torch.tensor([int(stop.received or 0)], device=dist_info.device)
    torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
    return signal.Signals(int(received.item())) if received.item() else None


if __name__ == "__main__":
    sys.exit(main())
