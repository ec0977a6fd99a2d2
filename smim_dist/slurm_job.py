"""One task of a SLURM training job, as submitit runs it: distributed setup from the job, training, and the requeue.

submitit's own USR2 handler checkpoints and requeues from inside the signal handler, on rank 0 alone, in the middle
of a step. Here the signal only asks every rank to stop after the current step (``StopSignals``); once the DeepSpeed
checkpoint is written by all ranks, rank 0 hands over to submitit's handler, which calls ``checkpoint()`` below,
requeues the job with ``scontrol requeue`` and exits. The requeued job starts the same ``TrainJob``, which resumes the
run from its newest valid checkpoint.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, replace

import submitit

from smim_dist.config import config_from_dict
from smim_dist.engine.distributed import init_distributed
from smim_dist.engine.stop_signals import StopSignals


@dataclass(frozen=True)
class TrainJob:
    """``config`` is the resolved config at submission (a dict), so a requeue trains exactly what was submitted even
    if the YAML files changed since."""

    config: dict
    max_requeues: int
    requeues: int = 0
    eval_slurm: dict | None = None
    """submitit parameters for the evaluation jobs this run submits (``eval.every_epochs``)"""

    def __call__(self) -> str:
        # The trainer (DeepSpeed, FFCV, timm, wandb) is imported on the compute node only: submitting from a login node
        # then takes seconds less and prints none of DeepSpeed's accelerator probing.
        from smim_dist.train import train

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        stop = StopSignals().install()
        cfg = config_from_dict(self.config)
        dist_info = init_distributed()
        state = train(cfg, dist_info, stop, eval_slurm=self.eval_slurm)
        if state.epoch >= cfg.optim.epochs:
            return f"finished {cfg.run_dir} at step {state.step}"
        if stop.received == signal.SIGUSR2 and dist_info.is_main and callable(submitit_handler):
            submitit_handler(signal.SIGUSR2, None)
        return f"stopped {cfg.run_dir} at step {state.step} on {stop.received.name if stop.received else 'request'}"

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """The training state is already on disk; what is requeued is this job with one more requeue counted, or
        nothing once ``max_requeues`` is reached (submitit then ends the job and says why)."""
        if self.requeues >= self.max_requeues:
            print(f"smim_dist: not requeued: {self.requeues} requeues reached --max-requeues {self.max_requeues}; "
                  "submit the same command again to resume", file=sys.stderr, flush=True)
            return None
        return submitit.helpers.DelayedSubmission(replace(self, requeues=self.requeues + 1))
