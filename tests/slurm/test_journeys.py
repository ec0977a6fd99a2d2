"""What a user does with the demo on a SLURM cluster, with the shipped defaults (wandb offline, the progress bar):
submit with evaluation jobs, be refused a second submission of the same run, get preempted, resume, find every job
COMPLETED and the scores in wandb; and the jobs a cluster could never start, refused before anything is queued."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import REPO, run_cli, wandb_offline_history
from slurm.test_training import job_states, status, wait_for_steps, wait_until_gone
from test_slurm_launcher import launch as launch_here

pytestmark = pytest.mark.slurm

CONFIG = "configs/demo_cpu.yaml"
SHRUNK = ["model.img_size=32", "data.demo_images=128", "optim.global_batch=32", "optim.micro_batch=16",
          "optim.epochs=4", "data.num_workers=1", "log.every_steps=1"]
"""the demo's sizes made smaller (4 steps an epoch), nothing switched off"""
CPU_NODES = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1"]


def launch(*args: str) -> subprocess.CompletedProcess:
    return run_cli(["launchers/slurm.py", *args], check=False)


def test_the_demo_is_preempted_resumed_and_evaluated_and_every_job_completes(slurm_cluster, tmp_path, capsys):
    command = ["--config", CONFIG, *CPU_NODES, "--time", "30", "--eval-time", "15", f"output_dir={tmp_path}",
               f"data.path={tmp_path / 'data'}", *SHRUNK, "checkpoint.every_epochs=2", "eval.every_epochs=2"]
    proc = launch(*command)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout)[1]
    # in this process, whose imports are done, so that it runs while the job is still queued or starting, before the
    # job has written the run's config: a queued job must be refused too
    twice = launch_here(*command)
    assert twice.returncode == 2 and f"not submitted: job {job_id} (" in twice.stderr, twice.stderr
    assert "is already training" in twice.stderr and "config error" not in twice.stderr
    run = tmp_path / "demo_cpu"
    wait_for_steps(run, 6)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_until_gone(job_id, slurm_cluster, timeout=900)
    assert job_states(slurm_cluster, job_id) == ["REQUEUED", "COMPLETED"]
    log = (run / "slurm" / f"{job_id}_0_log.err").read_text()
    assert re.search(r"resumed from step_\d{8}", log), log[-3000:]
    assert "evaluation of step_00000008 requested" in log and "evaluation of step_00000016 requested" in log
    for tag in ("step_00000008", "step_00000016"):
        folder = run / "eval" / tag
        submitted = json.loads((folder / "submitted.json").read_text())
        wait_until_gone(submitted["slurm_job"], slurm_cluster, timeout=900)
        assert job_states(slurm_cluster, submitted["slurm_job"]) == ["COMPLETED"], \
            (folder / f"{submitted['slurm_job']}_0_log.out").read_text()[-3000:]
        assert json.loads((folder / "finished.json").read_text())["ok"]
        assert not list(folder.glob("*.err")), "one log per evaluation job, stdout and stderr together"
        knn = json.loads((folder / "results.json").read_text())["protocols"]["knn"]
        logged = wandb_offline_history(folder)
        assert [row["eval/knn_cls_top1"] for row in logged] == [knn["cls"]["top1"]]
    assert {row["_step"] for row in wandb_offline_history(run)} >= {16}, "training's own wandb run goes to the end"
    report = status(str(run), "--plot", str(tmp_path / "demo.png"), capsys=capsys)
    assert report.startswith(f"{run}: finished (slurm job {job_id} (COMPLETED))"), report
    assert "step 16 of 16" in report and "requeued 1 time(s)" in report
    assert (tmp_path / "demo.png").read_bytes().startswith(b"\x89PNG")
    final = json.loads(status(str(run), "--json", capsys=capsys))
    assert [(e["tag"], e["state"], e["job"]) for e in final["evaluations"]] == [
        (tag, "done", f"slurm {json.loads((run / 'eval' / tag / 'submitted.json').read_text())['slurm_job']}")
        for tag in ("step_00000008", "step_00000016")]
    assert final["evaluations"][-1]["scores"]["knn_cls_top1"] == knn["cls"]["top1"]
    again = launch(*command)
    assert again.returncode == 0 and "already finished its 4 epochs" in again.stdout, again.stderr
    assert (run / "slurm" / "job_id").read_text().strip() == job_id, "nothing new submitted"


def test_jobs_the_cluster_could_never_start_are_refused_with_what_it_offers(slurm_cluster, tmp_path, demo_data):
    common = ["--config", CONFIG, f"output_dir={tmp_path}", f"data.path={demo_data}"]
    too_wide = launch(*common, "--gpus-per-node", "0", "--tasks-per-node", "2")
    assert too_wide.returncode == 2, too_wide.stderr
    assert "sbatch --test-only refuses the training job (2 tasks x 10 CPUs per node" in too_wide.stderr
    assert f"nodes with {slurm_cluster_cpus()} CPUs" in too_wide.stderr
    too_long = launch(*common, *CPU_NODES, "--partition", "short", "--time", "20")
    assert too_long.returncode == 2
    assert "--time 20 min is above the 10 min limit of partition short" in too_long.stderr
    assert "--eval-time 60 min is above the 10 min limit" in too_long.stderr, "every problem at once"
    no_gpus = launch(*common, "--cpus-per-task", "1")
    assert no_gpus.returncode == 2 and "on nodes without GPUs use --gpus-per-node 0" in no_gpus.stderr
    assert not (tmp_path / "demo_cpu").exists()
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout
    assert "demo_cpu" not in queued


def slurm_cluster_cpus() -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, cwd=REPO).stdout.split()[0]
