"""Evaluation jobs that run beside training: one per evaluated checkpoint, started by rank 0; training never waits
for them.

Outside SLURM the job is a background process in its own session (``eval/<tag>/submitted.json`` names its pid); a run
that finishes waits for the ones still running before it exits, because in a container or a pod the end of the main
process ends every other process in it.
Under SLURM rank 0 writes the job's batch script, ``eval/<tag>/job.sbatch``, and the training job's batch shell
submits it (``smim_dist.slurm_batch``): that shell runs on the host, so a task inside a container needs no SLURM
client. Either marker, written before training goes on, keeps a requeued training job from starting the same
evaluation twice, whether it finished, failed or still runs. The job runs the run's ``eval.protocols`` (kNN by
default) through ``smim-eval``, each storing its entry in ``eval/<tag>/results.json``, logs the numbers to the run's
wandb group, and records how it ended in ``eval/<tag>/finished.json``.

    python -m smim_dist.eval.jobs runs/beit_proxy/checkpoints/step_00150000   # what each job runs
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from submitit.slurm.slurm import _make_sbatch_string

from smim_dist.config import Config
from smim_dist.engine.checkpoint import checkpoint_root
from smim_dist.engine.run_dir import CONFIG_FILE
from smim_dist.eval.results import read_results
from smim_dist.files import write_atomic

SUBMITTED = "submitted.json"
"""written when the job was started: its pid, or its SLURM job id"""
SBATCH_SCRIPT = "job.sbatch"
"""under SLURM: the job's batch script, waiting for the training job's batch shell to submit it"""
REFUSED = "job.sbatch.refused"
"""the batch script sbatch refused (its message is in the training job's log)"""
FINISHED = "finished.json"
"""written by the job as it ends: ok, the protocols that failed, the error"""
SCORES = ("top1", "top5", "miou", "pixel_acc")


def eval_dir(run_dir: Path, tag: str) -> Path:
    return run_dir / "eval" / tag


def pending_evals(run_dir: Path, protocols: Sequence[str]) -> set[str]:
    """Tags whose evaluation was started and has not stored every one of ``protocols`` yet: retention keeps their
    checkpoints."""
    root = run_dir / "eval"
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir()
            if ((p / SUBMITTED).exists() or (p / SBATCH_SCRIPT).exists())
            and not set(protocols) <= set(read_results(p)["protocols"])}


@dataclass(frozen=True)
class SlurmEvalJobs:
    """How the evaluation jobs of a SLURM training job are written: the python that runs ``smim_dist.eval.jobs``
    (the image's, in a container) and submitit's sbatch parameters (partition, time, GPUs, setup lines, srun's
    container arguments)."""

    python: str
    sbatch: dict


def eval_job_script(checkpoint: Path, slurm: SlurmEvalJobs) -> str:
    """One task, stdout and stderr in one log, ``eval/<tag>/<job id>_0_log.out``."""
    folder = eval_dir(checkpoint.parent.parent, checkpoint.name)
    command = f"{slurm.python} -u -m smim_dist.eval.jobs {shlex.quote(str(checkpoint))}"
    return _make_sbatch_string(command=command, folder=folder, stderr_to_stdout=True, **slurm.sbatch)


@dataclass(frozen=True)
class EvalStart:
    line: str
    """for the training log"""
    process: subprocess.Popen | None = None
    """the local background process, when one was started"""


def submit_eval(cfg: Config, tag: str, eval_slurm: SlurmEvalJobs | None) -> EvalStart:
    """Start the evaluation of checkpoint ``tag`` unless it was started before. Any failure to start it is reported
    in the log line and never reaches training."""
    folder = eval_dir(cfg.run_dir, tag)
    for marker in (SUBMITTED, SBATCH_SCRIPT, REFUSED):
        if (folder / marker).exists():
            return EvalStart(f"evaluation of {tag} was started before ({folder / marker}); not started again")
    checkpoint = (checkpoint_root(cfg.run_dir) / tag).absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if eval_slurm is not None:
            write_atomic(folder / SBATCH_SCRIPT, eval_job_script(checkpoint, eval_slurm))
            return EvalStart(f"evaluation of {tag} requested: the job's batch shell submits {folder / SBATCH_SCRIPT} "
                             f"(job id in {folder / SUBMITTED}, log {folder}/<job id>_0_log.out)")
        log = (folder / "log.txt").open("ab")
        process = subprocess.Popen([sys.executable, "-m", "smim_dist.eval.jobs", str(checkpoint)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        log.close()
    except Exception as err:  # an evaluation must never stop training
        return EvalStart(f"evaluation of {tag} could not be started ({type(err).__name__}: {err}); training goes on")
    where = {"pid": process.pid, "host": socket.gethostname(), "log": str(folder / "log.txt")}
    (folder / SUBMITTED).write_text(json.dumps({"tag": tag, "time": time.time(), **where}) + "\n")
    return EvalStart(f"evaluation of {tag} started: {where}", process)


def wait_for_local_evals(processes: Sequence[subprocess.Popen], stop_requested, log) -> None:
    """Wait for the evaluation processes still running; a stop request ends the wait and leaves them running."""
    running = [p for p in processes if p.poll() is None]
    if not running:
        return
    log(f"training finished; waiting for {len(running)} evaluation job(s) to end (pids "
        f"{', '.join(str(p.pid) for p in running)}): a run's evaluations end before it exits, in a container too; "
        "a SIGTERM ends the wait and leaves them running")
    while any(p.poll() is None for p in running) and not stop_requested():
        time.sleep(1)


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
    import wandb

    log_cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text())["log"]
    if log_cfg["wandb_mode"] == "disabled":
        return
    # a job started from the training process inherits its wandb service address, which this process cannot use
    os.environ.pop(wandb.env.SERVICE, None)
    metrics = wandb_metrics(results)
    run = wandb.init(project=log_cfg["wandb_project"], entity=log_cfg["wandb_entity"],
                     group=log_cfg["wandb_group"] or run_dir.name, name=f"{run_dir.name}-eval-{tag}",
                     job_type="eval", mode=log_cfg["wandb_mode"], dir=str(eval_dir(run_dir, tag)),
                     config={"checkpoint": tag, "step": results.get("step")})
    run.log(metrics)
    run.finish()


def main(checkpoint: Path) -> int:
    """Runs the job and records how it ended, for a local job whose exit status nobody waits for."""
    folder = eval_dir(checkpoint.parent.parent, checkpoint.name)
    try:
        print(json.dumps(evaluate(checkpoint), indent=1))
    except Exception as err:
        traceback.print_exc()
        write_atomic(folder / FINISHED, json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}",
                                                    "time": time.time()}) + "\n")
        return 1
    write_atomic(folder / FINISHED, json.dumps({"ok": True, "time": time.time()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
