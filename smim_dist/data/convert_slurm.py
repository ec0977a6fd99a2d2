"""A sharded conversion as a SLURM job array (``smim-convert ... OUT_DIR --shard-size N --slurm``), through submitit.

Array task t writes shards t, t + T, ... of the plan (``smim_dist.data.convert_shards``) with all the CPUs SLURM gave
it. A task that is preempted or reaches its time limit is requeued by submitit and skips the shards it already wrote;
whichever task writes the last shard also writes the index and the manifest, so the data set is finished even when
the submitting shell is gone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import submitit

from smim_dist.data.convert import UsageError
from smim_dist.data.convert_shards import run_task
from smim_dist.slurm_cluster import controller_problem, find_partition

JOB_FOLDER = "slurm"
"""the data set folder's folder for submitit's files and the tasks' logs"""


@dataclass(frozen=True)
class ConvertTasks(submitit.helpers.Checkpointable):
    """Array task ``task`` of ``tasks``; ``settings`` as ``checked_options`` gives them, the workers replaced by the
    CPUs SLURM gave the task."""

    folder: str
    tasks: int
    settings: dict

    def __call__(self, task: int) -> str:
        workers = len(os.sched_getaffinity(0))
        manifest = run_task(self.folder, {**self.settings, "workers": workers}, task, self.tasks)
        return f"task {task}: done; " + ("wrote the manifest" if manifest else "other tasks still writing")


def submit_array(folder: Path, settings: dict, tasks: int, partition: str | None, minutes: int, cpus: int,
                 parallelism: int, setup: list[str]) -> list[submitit.Job]:
    """Submit the array after asking the scheduler whether it can run it; refusals raise ``UsageError``."""
    problem = controller_problem()
    if problem:
        raise UsageError(problem)
    found = find_partition(partition)
    if found and found.max_minutes is not None and minutes > found.max_minutes:
        raise UsageError(f"--time {minutes} min is above partition {found.name}'s limit of {found.max_minutes} min; "
                         "tasks are requeued at their limit, so a shorter --time only costs restarts")
    executor = submitit.SlurmExecutor(folder=folder / JOB_FOLDER / "%j")
    executor.update_parameters(job_name=f"smim-convert-{folder.name}", time=minutes, cpus_per_task=cpus,
                               ntasks_per_node=1, nodes=1, array_parallelism=parallelism,
                               **({"partition": partition} if partition else {}), **({"setup": setup} if setup else {}))
    work = ConvertTasks(str(folder), tasks, settings)
    return executor.map_array(work, range(tasks))
