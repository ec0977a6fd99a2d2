"""Evaluation jobs that run beside training: one per evaluated checkpoint, submitted by rank 0 and never waited for.

Under SLURM the job is a one-task submitit job with the training job's partition and account; anywhere else it is a
background process in its own session. A marker, ``eval/<tag>/submitted.json``, is written before training goes on,
so a requeued training job never submits the same evaluation twice, whether it finished, failed or still runs. The
job itself stores its kNN entry in ``eval/<tag>/results.json`` (shared with any other protocol run on that checkpoint)
and logs the numbers to the run's wandb group.

    python -m smim_dist.eval.jobs runs/beit_proxy/checkpoints/step_00150000   # what each job runs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import submitit
import wandb
import yaml

from smim_dist.config import Config
from smim_dist.engine.checkpoint import checkpoint_root
from smim_dist.engine.run_dir import CONFIG_FILE
from smim_dist.eval.results import read_results

SUBMITTED = "submitted.json"


def eval_dir(run_dir: Path, tag: str) -> Path:
    return run_dir / "eval" / tag


def pending_evals(run_dir: Path) -> set[str]:
    """Tags whose evaluation was submitted and has stored no kNN results yet (another protocol's, run by hand, does
    not count): retention keeps their checkpoints."""
    root = run_dir / "eval"
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir()
            if (p / SUBMITTED).exists() and "knn" not in read_results(p)["protocols"]}


def submit_eval(cfg: Config, tag: str, eval_slurm: dict | None) -> str:
    """Start the evaluation of checkpoint ``tag`` unless it was started before; returns a line for the training log.
    Any failure to start it is reported in that line and never reaches training."""
    folder = eval_dir(cfg.run_dir, tag)
    if (folder / SUBMITTED).exists():
        return f"evaluation of {tag} was submitted before ({folder / SUBMITTED}); not submitted again"
    checkpoint = checkpoint_root(cfg.run_dir) / tag
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if eval_slurm is not None:
            executor = submitit.SlurmExecutor(folder=folder / "slurm")
            executor.update_parameters(**eval_slurm)
            with submitit.helpers.clean_env():  # the training job's SLURM_* variables must not shape this job
                job = executor.submit(evaluate, checkpoint)
            where = {"slurm_job": job.job_id, "log": str(folder / "slurm" / f"{job.job_id}_0_log.out")}
        else:
            log = (folder / "log.txt").open("ab")
            process = subprocess.Popen([sys.executable, "-m", "smim_dist.eval.jobs", str(checkpoint)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            log.close()
            where = {"pid": process.pid, "log": str(folder / "log.txt")}
    except Exception as err:  # an evaluation must never stop training
        return f"evaluation of {tag} could not be started ({type(err).__name__}: {err}); training goes on"
    (folder / SUBMITTED).write_text(json.dumps({"tag": tag, "time": time.time(), **where}) + "\n")
    return f"evaluation of {tag} started: {where}"


def evaluate(checkpoint: Path) -> dict:
    """The job's body: kNN on the checkpoint, its entry into ``eval/<tag>/results.json``, and every protocol's
    numbers in that file to the run's wandb group."""
    from smim_dist.eval.knn import run_knn  # the evaluation stack loads in the job, not in every training process

    checkpoint = Path(checkpoint)
    run_dir, tag = checkpoint.parent.parent, checkpoint.name
    results = run_knn(checkpoint, out=eval_dir(run_dir, tag))
    _log_to_wandb(run_dir, tag, results)
    return results


def _log_to_wandb(run_dir: Path, tag: str, results: dict) -> None:
    log_cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text())["log"]
    if log_cfg["wandb_mode"] == "disabled":
        return
    metrics = {f"eval/{protocol}_{feature}_{key}": value for protocol, entry in results["protocols"].items()
               for feature in ("cls", "patch") for key, value in (entry.get(feature) or {}).items()}
    run = wandb.init(project=log_cfg["wandb_project"], entity=log_cfg["wandb_entity"],
                     group=log_cfg["wandb_group"] or run_dir.name, name=f"{run_dir.name}-eval-{tag}",
                     job_type="eval", mode=log_cfg["wandb_mode"], dir=str(eval_dir(run_dir, tag)),
                     config={"checkpoint": tag, "step": results.get("step")})
    run.log(metrics)
    run.finish()


if __name__ == "__main__":
    print(json.dumps(evaluate(Path(sys.argv[1])), indent=1))
