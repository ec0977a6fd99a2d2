"""One task of a SLURM training job, as submitit runs it: distributed setup from the job, training, and the requeue.

SLURM's USR2 (``--signal-delay`` before the time limit, or ``scancel --signal=USR2``) only asks every rank to stop
after the current step (``StopSignals``); submitit's own handler, which would requeue from inside the signal handler
in the middle of a step, is not used. Once the checkpoint is written by all ranks, rank 0 saves the job that the
requeue will start (this one with one more requeue counted) where submitit reads it, and asks the job's batch shell
for the requeue (``smim_dist.slurm_batch``): ``scontrol`` runs there, on the host, so a task inside a container needs
no SLURM client. The requeued job resumes the run from its newest valid checkpoint.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import submitit

from smim_dist.config import config_from_dict
from smim_dist.files import replace_atomically
from smim_dist.preflight import refuse_missing_files
from smim_dist.engine.distributed import init_distributed
from smim_dist.engine.stop_signals import StopSignals
from smim_dist.eval.jobs import SlurmEvalJobs
from smim_dist.slurm_batch import requeue_request


@dataclass(frozen=True)
class TrainJob:
    """``config`` is the resolved config at submission (a dict), so a requeue trains exactly what was submitted even
    if the YAML files changed since."""

    config: dict
    max_requeues: int
    requeues: int = 0
    eval_slurm: SlurmEvalJobs | None = None
    """how the evaluation jobs this run starts (``eval.every_epochs``) are written"""

    def __call__(self) -> str:
        # The trainer (DeepSpeed, FFCV, timm, wandb) is imported on the compute node only: submitting from a login node
        # then takes seconds less and prints none of DeepSpeed's accelerator probing.
        from smim_dist.train import stop_signal_of_any_rank, train

        environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                            overwrite=True)
        stop = StopSignals().install()
        cfg = config_from_dict(self.config)
        refuse_missing_files(cfg)
        dist_info = init_distributed()
        state = train(cfg, dist_info, stop, eval_slurm=self.eval_slurm)
        if state.epoch >= cfg.optim.epochs:
            return f"finished {cfg.run_dir} at step {state.step}"
        received = stop_signal_of_any_rank(stop, dist_info)
        outcome = f"stopped {cfg.run_dir} at step {state.step} on {received.name if received else 'request'}"
        if received == signal.SIGUSR2 and dist_info.is_main:
            outcome += "; " + self.ask_for_requeue(cfg.run_dir)
        print(f"smim_dist: task {environment.rank}: {outcome}", file=sys.stderr, flush=True)
        # not a return: submitit would log "Job completed successfully" for an attempt that did not complete
        raise SystemExit(0)

    def ask_for_requeue(self, run_dir: Path) -> str:
        """Saves this job with one more requeue counted as the one SLURM restarts, then asks for the requeue."""
        if self.requeues >= self.max_requeues:
            return (f"not requeued: {self.requeues} requeues reached --max-requeues {self.max_requeues}; submit the "
                    "same command again to resume")
        env = submitit.JobEnvironment()
        pickle = env.paths.submitted_pickle
        replace_atomically(pickle, submitit.helpers.DelayedSubmission(replace(self, requeues=self.requeues + 1)).dump)
        requeue_request(run_dir, env.job_id).write_text(f"requeue {self.requeues + 1}\n")
        return f"requeue {self.requeues + 1} of --max-requeues {self.max_requeues} asked of the batch shell"
