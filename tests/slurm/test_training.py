"""Pre-training through ``launchers/slurm.py`` on the local cluster: preemption, the time limit, a rank killed while a
checkpoint is written (evaluation jobs beside training are tests/slurm/test_journeys.py's)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import cloudpickle
import pytest
import submitit
import torch

from conftest import assert_same_weights, engine_overrides, final_weights, losses, run_cli, train_cli
from smim_dist.engine.checkpoint import newest_valid_tag

pytestmark = pytest.mark.slurm
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CONFIG = "configs/demo_cpu.yaml"
TWO_CPU_TASKS = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--partition", "debug"]
RUN = ["optim.epochs=6", "checkpoint.every_epochs=3", "checkpoint.keep_last=5"]


def submit(*args: str) -> str:
    proc = run_cli(["launchers/slurm.py", *args])
    return re.search(r"submitted job (\d+)", proc.stdout)[1]


def wait_until_gone(job_id: str, cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still queued after {timeout} s\n{cluster.logs_tail()}")
        time.sleep(1)


def wait_for_steps(run_dir, steps: int, timeout: float = 900) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"no step {steps} in {metrics} after {timeout} s"
        time.sleep(0.2)


def job_states(cluster, job_id: str, settle: float = 30) -> list[str]:
    """The job's accounting records once they are final: slurmdbd can still say RUNNING a moment after squeue has
    dropped the job (seen once in CI)."""
    deadline = time.monotonic() + settle
    while True:
        states = [state for jid, state in cluster.sacct(job_id) if jid == job_id]
        if not {"RUNNING", "PENDING", "COMPLETING"} & set(states) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def status(*args: str, capsys) -> str:
    """``smim-status``, in this process."""
    from smim_dist.status_cli import main

    assert main([*args]) == 0
    return capsys.readouterr().out


def rank0_log(run_dir, job_id: str) -> str:
    return (run_dir / "slurm" / f"{job_id}_0_log.err").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_data):
    """The reference: the same run on 2 processes outside SLURM, never stopped."""
    out = tmp_path_factory.mktemp("reference")
    train_cli(2, CONFIG, engine_overrides(out, demo_data, "run_name=straight", *RUN))
    return out / "straight"


def test_preempted_job_is_requeued_and_ends_with_the_uninterrupted_weights(slurm_cluster, tmp_path, demo_data,
                                                                           uninterrupted, monkeypatch):
    """SBATCH_NO_REQUEUE=1, as a site whose jobs are not requeueable by default may set it: the job asks for its
    requeue on sbatch's command line, which wins (the cluster itself runs with JobRequeue=0)."""
    monkeypatch.setenv("SBATCH_NO_REQUEUE", "1")
    overrides = engine_overrides(tmp_path, demo_data, "run_name=preempted", *RUN)
    job_id = submit("--config", CONFIG, *TWO_CPU_TASKS, "--time", "30", *overrides)
    run = tmp_path / "preempted"
    wait_for_steps(run, 5)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_until_gone(job_id, slurm_cluster, timeout=900)
    assert job_states(slurm_cluster, job_id) == ["REQUEUED", "COMPLETED"]
    log = rank0_log(run, job_id)
    stopped = int(re.search(r"stopped at step (\d+) on request", log)[1])
    assert 5 <= stopped < 24
    assert f"resumed from step_{stopped:08d}" in log
    task1 = (run / "slurm" / f"{job_id}_1_log.out").read_text()
    assert task1.count("Starting with JobEnvironment") == 2
    assert task1.count("Job completed successfully") == 1, "task 1's preempted attempt is not reported as completed"
    assert losses(run) == pytest.approx(losses(uninterrupted), rel=1e-6)
    assert_same_weights(final_weights(run), final_weights(uninterrupted))


def test_time_limit_checkpoints_requeues_and_stops_at_the_requeue_cap(slurm_cluster, tmp_path, demo_data, capsys):
    """--time 2 --signal-delay 60: USR2 30 to 60 s in (slurmctld looks at time limits every 30 s and may send it up
    to 60 s early), twice; the second time --max-requeues 1 is spent. smim-status sees the job train. One task: it
    trains until the limit, and the signal reaching every task is the preemption test's."""
    overrides = engine_overrides(tmp_path, demo_data, "run_name=limited", "optim.epochs=5000", "log.every_steps=10",
                                 "checkpoint.every_epochs=5000")
    one_task = ["--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1", "--partition", "debug"]
    job_id = submit("--config", CONFIG, *one_task, "--time", "2", "--signal-delay", "60", "--max-requeues", "1",
                    *overrides)
    run = tmp_path / "limited"
    wait_for_steps(run, 2)
    live = json.loads(status(str(run), "--json", capsys=capsys))
    assert (live["state"], live["slurm_job"], live["total_steps"]) == ("running", job_id, 20000), live
    assert live["where"].startswith(f"slurm job {job_id} (RUNNING), pid ") and live["eta_s"] > 0
    wait_until_gone(job_id, slurm_cluster, timeout=900)
    log = rank0_log(run, job_id)
    first, second = (int(step) for step in re.findall(r"stopped at step (\d+) on request", log))
    assert 0 < first < second
    assert f"resumed from step_{first:08d}" in log
    assert "not requeued: 1 requeues reached --max-requeues 1" in log
    assert job_states(slurm_cluster, job_id)[0] == "REQUEUED"
    assert newest_valid_tag(run) == (f"step_{second:08d}", [])


def train_and_kill_rank1_in_second_save(job):
    """Rank 1 dies (SIGKILL) right after writing its share of the second checkpoint, before rank 0 finishes it."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original, saves = DeepSpeedEngine.save_checkpoint, []

    def save_then_die(engine, *args, **kwargs):
        result = original(engine, *args, **kwargs)
        saves.append(kwargs.get("tag"))
        if len(saves) == 2 and torch.distributed.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    DeepSpeedEngine.save_checkpoint = save_then_die
    return job()


def test_rank_killed_while_writing_a_checkpoint_then_the_rerun_resumes_from_the_previous_one(
        slurm_cluster, tmp_path, demo_data, uninterrupted):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=killed", *RUN)
    launcher_args = ["--config", CONFIG, *TWO_CPU_TASKS, "--time", "30", *overrides]
    dry = run_cli(["launchers/slurm.py", *launcher_args, "--dry-run"]).stdout
    assert "--kill-on-bad-exit=1" in dry
    from smim_dist.config import load_config
    from smim_dist.slurm_job import TrainJob

    cfg = load_config(CONFIG, overrides)
    executor = submitit.SlurmExecutor(folder=tmp_path / "killed_job")
    # one thread, as the jobs submitted through run_cli inherit it: the reference's augmentations ran on one
    executor.update_parameters(partition="debug", nodes=1, ntasks_per_node=2, cpus_per_task=1, time=30,
                               srun_args=["--kill-on-bad-exit=1"], setup=["export OMP_NUM_THREADS=1"])
    job = executor.submit(train_and_kill_rank1_in_second_save, TrainJob(config=cfg.to_dict(), max_requeues=0))
    wait_until_gone(job.job_id, slurm_cluster, timeout=900)
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000012"
    assert (checkpoints / "step_00000024.partial").is_dir(), "the second checkpoint was cut off mid-write"
    job_id = submit(*launcher_args)
    wait_until_gone(job_id, slurm_cluster, timeout=900)
    assert "resumed from step_00000012" in rank0_log(tmp_path / "killed", job_id)
    assert losses(tmp_path / "killed") == pytest.approx(losses(uninterrupted), rel=1e-6)
    assert_same_weights(final_weights(tmp_path / "killed"), final_weights(uninterrupted))


def test_a_partition_the_cluster_rejects_is_reported_and_nothing_is_left(slurm_cluster, tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=rejected")
    proc = run_cli(["launchers/slurm.py", "--config", CONFIG, "--gpus-per-node", "0", "--partition", "nope",
                    "--time", "5", *overrides], check=False)
    assert proc.returncode == 2
    assert "not submitted: sbatch --test-only refuses the training job" in proc.stderr
    assert proc.stderr.count("Invalid partition name specified") == 1, "sbatch's refusal is printed once"
    assert not (tmp_path / "rejected").exists()
    assert "rejected" not in subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout
