"""What the SLURM cluster will run, asked of the scheduler before a job is submitted.

sbatch accepts a job that no node can ever hold (more CPUs per task than a node has, a time limit above the
partition's) and leaves it PENDING forever. ``sbatch --test-only`` refuses the first kind without submitting; the
partition's time limit is read from ``scontrol``. Each refusal says what the partition offers.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

JOB_FOLDER = "slurm"
"""a run directory's folder for its SLURM training job: submitit's files and logs, and ``JOB_ID_FILE``"""
JOB_ID_FILE = "job_id"
"""the training job's id, written by the launcher at submission"""

TIME_FORMATS = (
    (r"(\d+)", (60,)),
    (r"(\d+):(\d+)", (60, 1)),
    (r"(\d+):(\d+):(\d+)", (3600, 60, 1)),
    (r"(\d+)-(\d+)", (86400, 3600)),
    (r"(\d+)-(\d+):(\d+)", (86400, 3600, 60)),
    (r"(\d+)-(\d+):(\d+):(\d+)", (86400, 3600, 60, 1)),
)
"""SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) and the seconds each field counts"""


def slurm_minutes(text: str) -> int | None:
    """A SLURM time in whole minutes, rounded up; None if it is not one."""
    for pattern, seconds in TIME_FORMATS:
        match = re.fullmatch(pattern, text)
        if match:
            return -(-sum(int(value) * unit for value, unit in zip(match.groups(), seconds)) // 60)
    return None


@dataclass(frozen=True)
class Partition:
    name: str
    max_minutes: int | None
    """None: no limit"""
    nodes: tuple[str, ...]
    """each distinct kind of node: CPUs, memory and GRES"""

    def offers(self) -> str:
        limit = "no time limit" if self.max_minutes is None else f"a time limit of {self.max_minutes} min"
        return f"partition {self.name} has {limit} and nodes with {'; '.join(self.nodes)}"


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def controller_problem() -> str | None:
    """Why the scheduler cannot be asked (``scontrol ping`` answers at once; sbatch and sinfo retry for seconds)."""
    proc = _run(["scontrol", "ping"])
    if proc.returncode == 0:
        return None
    return (f"the SLURM controller does not answer (`scontrol ping`: {' '.join(proc.stdout.split()[:4])}); run this "
            "on a login node of a working cluster")


def find_partition(name: str | None) -> Partition | None:
    """The named partition, or the cluster's default one; None when scontrol does not know it (sbatch then names
    the problem)."""
    proc = _run(["scontrol", "show", "partition", "-o", *([name] if name else [])])
    if proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        fields = dict(token.split("=", 1) for token in line.split() if "=" in token)
        if name is None and fields.get("Default") != "YES":
            continue
        nodes = _run(["sinfo", "-h", "-p", fields["PartitionName"], "-o", "%c|%m|%G"]).stdout.split()
        described = tuple(dict.fromkeys(
            f"{cpus} CPUs, {memory} MB, {'no GPUs' if gres == '(null)' else 'GRES ' + gres}"
            for cpus, memory, gres in (node.split("|") for node in nodes)))
        limit = fields.get("MaxTime", "UNLIMITED")
        return Partition(fields["PartitionName"], None if limit == "UNLIMITED" else slurm_minutes(limit), described)
    return None


def test_only(script: str) -> str | None:
    """sbatch's reason for refusing ``script`` as it would be submitted (``--test-only`` submits nothing), or None
    when the job could start."""
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch") as handle:
        handle.write(script)
        handle.flush()
        proc = _run(["sbatch", "--test-only", handle.name])
    if proc.returncode == 0:
        return None
    return " ".join(line.removeprefix("sbatch: error: ").strip() for line in proc.stderr.splitlines() if line.strip())


def queued_state(job_id: str) -> str | None:
    """The job's state while the controller holds it (PENDING, RUNNING, REQUEUED, ...); None once it has left the
    queue, or where no SLURM client is installed."""
    if not shutil.which("squeue"):
        return None
    return _run(["squeue", "-h", "-j", job_id, "-o", "%T"]).stdout.strip() or None


def job_history(job_id: str) -> list[str]:
    """The state of each attempt of the job, oldest first (sacct: a requeued attempt is REQUEUED, a preempted one
    PREEMPTED); empty where accounting does not answer."""
    if not shutil.which("sacct"):
        return []
    proc = _run(["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "State"])
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []


def job_state(job_id: str) -> str | None:
    """The queue's state while the controller holds the job, else its newest attempt's in the accounting; None where
    neither answers."""
    history = job_history(job_id)
    return queued_state(job_id) or (history[-1] if history else None)
