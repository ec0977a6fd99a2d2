"""Evaluation jobs that run beside training: one per evaluated checkpoint, submitted by rank 0 and never waited for.

Under SLURM the job is a one-task submitit job with the training job's partition and account; anywhere else it is a
background process in its own session. A marker, ``eval/<tag>/submitted.json``, is written before training goes on,
so a requeued training job never submits the same evaluation twice, whether it finished, failed or still runs. The
job runs the run's ``eval.protocols`` (kNN by default) through ``smim-eval``, each storing its entry in
``eval/<tag>/results.json``, and logs the numbers to the run's wandb group.

    python -m smim_dist.eval.jobs runs/beit_proxy/checkpoints/step_00150000   # what each job runs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import submitit
import wandb
import yaml

from smim_dist.config import Config
from smim_dist.engine.checkpoint import checkpoint_root
from smim_dist.engine.run_dir import CONFIG_FILE
from smim_dist.eval.results import read_results

SUBMITTED = "submitted.json"
SCORES = ("top1", "top5", "miou", "pixel_acc")


def eval_dir(run_dir: Path, tag: str) -> Path:
    return run_dir / "eval" / tag


def pending_evals(run_dir: Path, protocols: Sequence[str]) -> set[str]:
    """Tags whose evaluation was submitted and has not stored every one of ``protocols`` yet: retention keeps their
    checkpoints."""
    root = run_dir / "eval"
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir()
            if (p / SUBMITTED).exists() and not set(protocols) <= set(read_results(p)["protocols"])}


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
    """The job's body: each of the run's ``eval.protocols`` on the checkpoint (one failing does not stop the next),
    then every protocol's numbers in ``eval/<tag>/results.json`` to the run's wandb group. Raises at the end if a
    protocol failed, so the job shows as failed."""
    from smim_dist.eval.cli import main as smim_eval  # the evaluation stack loads in the job, not in training

    checkpoint = Path(checkpoint)
    run_dir, tag = checkpoint.parent.parent, checkpoint.name
    eval_cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text())["eval"]
    failed = []
    for protocol in eval_cfg["protocols"]:
        options = Path(eval_cfg["config_dir"] or "") / f"{protocol}.yaml"
        config = ["--config", str(options)] if eval_cfg["config_dir"] and options.is_file() else []
        if smim_eval([protocol, "--checkpoint", str(checkpoint), *config]) != 0:
            failed.append(protocol)
    results = read_results(eval_dir(run_dir, tag))
    _log_to_wandb(run_dir, tag, results)
    if failed:
        raise RuntimeError(f"evaluation of {checkpoint}: {', '.join(failed)} failed (the reason is above)")
    return results


def wandb_metrics(results: dict) -> dict[str, float]:
    """The scores in a results file as flat wandb keys: ``eval/knn_cls_top1``, ``eval/seg_miou``, ..."""
    metrics = {}
    for protocol, entry in results["protocols"].items():
        for key, value in entry.items():
            if key in SCORES and isinstance(value, (int, float)):
                metrics[f"eval/{protocol}_{key}"] = value
            elif isinstance(value, dict) and set(value) & set(SCORES):
                metrics.update({f"eval/{protocol}_{key}_{name}": value[name] for name in SCORES if name in value})
    return metrics


def _log_to_wandb(run_dir: Path, tag: str, results: dict) -> None:
    log_cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text())["log"]
    if log_cfg["wandb_mode"] == "disabled":
        return
    metrics = wandb_metrics(results)
    run = wandb.init(project=log_cfg["wandb_project"], entity=log_cfg["wandb_entity"],
                     group=log_cfg["wandb_group"] or run_dir.name, name=f"{run_dir.name}-eval-{tag}",
                     job_type="eval", mode=log_cfg["wandb_mode"], dir=str(eval_dir(run_dir, tag)),
                     config={"checkpoint": tag, "step": results.get("step")})
    run.log(metrics)
    run.finish()


if __name__ == "__main__":
    print(json.dumps(evaluate(Path(sys.argv[1])), indent=1))
