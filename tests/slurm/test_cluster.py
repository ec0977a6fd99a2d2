"""Smoke tests of the local SLURM cluster through submitit: results, accounting, multi-task ranks, requeue."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

pytestmark = pytest.mark.slurm

# the job processes cannot import this test module: ship its functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def wait_done(job: submitit.Job, cluster, timeout: float = 300) -> None:
    """job.result() would block forever on a stuck job; fail with the logs instead."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout} s (state {job.state})\n"
                        f"--- job stderr\n{job.stderr()}\n{cluster.logs_tail()}")
        time.sleep(0.5)


def wait_for_state(cluster, job_id: str, state: str, timeout: float = 120) -> list[list[str]]:
    """sacct hears of a job's end from slurmctld a little after its result file appears."""
    deadline = time.monotonic() + timeout
    while True:
        rows = cluster.sacct(job_id, "JobID", "State", "Partition")
        if [job_id, state, cluster.partition] in rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def whoami(x: int) -> tuple[int, str, str]:
    return x * x, os.environ["SLURM_JOB_ID"], sys.executable


def global_rank() -> int:
    return submitit.JobEnvironment().global_rank


class RequeueOnce(submitit.helpers.Checkpointable):
    """Records each start in `workdir/starts`; the first start waits to be preempted, the second returns."""

    def __call__(self, workdir: str) -> tuple[int, str]:
        starts = Path(workdir) / "starts"
        with starts.open("a") as f:
            f.write(f"{os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        if len(starts.read_text().splitlines()) >= 2:
            return len(starts.read_text().splitlines()), os.environ.get("SLURM_RESTART_COUNT", "0")
        time.sleep(120)  # submitit's USR2 handler checkpoints, requeues and exits from here
        raise RuntimeError("never preempted")


def test_job_result_and_accounting(slurm_cluster, submitit_folder):
    executor = submitit.AutoExecutor(folder=submitit_folder / "%j", cluster="slurm")
    executor.update_parameters(slurm_partition=slurm_cluster.partition, timeout_min=2, cpus_per_task=1,
                               name="smoke_result")
    job = executor.submit(whoami, 7)
    wait_done(job, slurm_cluster)
    assert job.result() == (49, job.job_id, sys.executable)
    rows = wait_for_state(slurm_cluster, job.job_id, "COMPLETED")
    assert [job.job_id, "COMPLETED", slurm_cluster.partition] in rows, rows


def test_two_tasks_get_ranks_0_and_1(slurm_cluster, submitit_folder):
    executor = submitit.AutoExecutor(folder=submitit_folder / "%j", cluster="slurm")
    executor.update_parameters(slurm_partition=slurm_cluster.partition, timeout_min=2, nodes=1,
                               tasks_per_node=2, cpus_per_task=1, name="smoke_ranks")
    job = executor.submit(global_rank)
    wait_done(job, slurm_cluster)
    assert job.results() == [0, 1]


def test_usr2_requeues_checkpointable(slurm_cluster, submitit_folder, tmp_path):
    executor = submitit.SlurmExecutor(folder=submitit_folder / "%j")
    # time > 10 min: with less, submitit takes every USR2 for a timeout rather than a preemption
    # the cluster runs with JobRequeue=0, like sites whose jobs are not requeueable unless they ask
    executor.update_parameters(partition=slurm_cluster.partition, time=15, cpus_per_task=1, job_name="smoke_requeue",
                               additional_parameters={"requeue": True})
    job = executor.submit(RequeueOnce(), str(tmp_path))
    starts = tmp_path / "starts"
    deadline = time.monotonic() + 180
    while not starts.exists():  # running, with submitit's signal handlers installed
        assert time.monotonic() < deadline, f"job never started\n{slurm_cluster.logs_tail()}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    # the accounting, not job.done(): submitit's handler runs `scontrol requeue` on its own job, and the requeue may
    # kill it before it returns (seen under load), leaving that error as the result until the second start replaces it
    rows = wait_for_state(slurm_cluster, job.job_id, "COMPLETED", timeout=180 + 3 * slurm_cluster.cred_expire)
    states = [state for job_id, state, _ in rows if job_id == job.job_id]
    assert states == ["REQUEUED", "COMPLETED"], rows
    assert job.result() == (2, "1")  # started twice, the second time as SLURM's restart 1
