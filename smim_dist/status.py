"""``smim-status``: a run's state at a glance, read from its run directory alone.

Everything comes from the files a run writes (``config.yaml``, ``metrics.jsonl``, ``train.lock``, ``checkpoints/``,
``eval/<tag>/``, ``slurm/job_id``), so it works on a live run (it only reads: no lock taken, no checkpoint hashed)
and on a run directory copied to a laptop; SLURM is asked about the job only where its client is installed.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from smim_dist.engine.checkpoint import checkpoint_root, newest_valid_tag
from smim_dist.engine.run_dir import CONFIG_FILE, read_saved_config
from smim_dist.engine.run_lock import LOCK_FILE, STALE_AFTER, read_holder
from smim_dist.eval.jobs import FINISHED, REFUSED, SBATCH_SCRIPT, SUBMITTED, wandb_metrics
from smim_dist.eval.results import read_results
from smim_dist.run_logger import METRICS_FILE
from smim_dist.slurm_cluster import JOB_FOLDER, JOB_ID_FILE, job_history, job_state

RECENT_STEPS = 50
"""the logged steps the throughput behind the ETA is measured over"""


@dataclass
class Evaluation:
    tag: str
    step: int
    state: str
    """done, running, queued, waiting (for the training job's batch shell to submit it), failed, refused, stopped"""
    scores: dict[str, float] = field(default_factory=dict)
    """flat: ``knn_cls_top1``, ``seg_miou``, ..."""
    job: str | None = None
    log: str | None = None
    error: str | None = None


@dataclass
class RunStatus:
    run_dir: str
    state: str
    """running, queued, requeued, stopped (the same command resumes it), finished, not started"""
    where: str
    """what runs it: a SLURM job, a process, or nothing"""
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    epochs: int | None = None
    eta_s: float | None = None
    last: dict[str, float | None] = field(default_factory=dict)
    """the newest metrics row: loss, image_blind_loss, lr, images_per_s, mfu, data_wait_frac, skipped_steps, ..."""
    last_logged: float | None = None
    checkpoint: str | None = None
    """the newest valid checkpoint (sizes against its manifest; the training checks the hashes)"""
    checkpoints: dict[str, int] = field(default_factory=dict)
    """every checkpoint folder and its bytes"""
    damaged: list[str] = field(default_factory=list)
    slurm_job: str | None = None
    requeues: int | None = None
    evaluations: list[Evaluation] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() or (path / METRICS_FILE).is_file()


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``; a row cut short by a crash mid-write is left out."""
    path = run_dir / METRICS_FILE
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def lock_holder(run_dir: Path) -> dict | None:
    """The process training the run, if one is: the lock is held here, or its lease is renewed from another node."""
    path = run_dir / LOCK_FILE
    if not path.exists():
        return None
    holder = read_holder(path)
    if holder and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
        return holder  # this process trains it: probing its own lock would drop it
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        held = False
    except OSError:
        held = True
    finally:
        os.close(fd)
    fresh = holder is not None and time.time() - holder["heartbeat"] < STALE_AFTER
    if held or (fresh and holder["host"] != socket.gethostname()):
        return holder or {"host": "?", "pid": "?"}
    return None


def progress(status: RunStatus, rows: list[dict], epochs: int | None) -> None:
    if not rows:
        return
    last = rows[-1]
    status.step, status.epoch, status.last_logged = last["step"], last.get("epoch", 0.0), last.get("time")
    status.epochs = epochs
    status.last = {key: value for key, value in last.items() if key not in ("step", "time", "epoch")}
    if epochs and status.epoch > 0:
        status.total_steps = round(status.step / status.epoch * epochs)
    recent = rows[-RECENT_STEPS:]
    if status.state == "running" and status.total_steps and len(recent) > 1 and recent[-1]["step"] > recent[0]["step"]:
        per_step = (recent[-1]["time"] - recent[0]["time"]) / (recent[-1]["step"] - recent[0]["step"])
        status.eta_s = max(status.total_steps - status.step, 0) * per_step


def checkpoints(status: RunStatus, run_dir: Path) -> None:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        status.checkpoints[folder.name] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    status.checkpoint, status.damaged = newest_valid_tag(run_dir, hashes=False)


def evaluation(folder: Path, protocols: list[str]) -> Evaluation:
    results = read_results(folder)
    tag = folder.name
    entry = Evaluation(tag=tag, step=int(tag.rsplit("_", 1)[-1]) if tag.rsplit("_", 1)[-1].isdigit() else 0,
                       state="done", scores={key.removeprefix("eval/"): value
                                             for key, value in wandb_metrics(results).items()})
    submitted = json.loads((folder / SUBMITTED).read_text()) if (folder / SUBMITTED).exists() else {}
    finished = json.loads((folder / FINISHED).read_text()) if (folder / FINISHED).exists() else None
    if "slurm_job" in submitted:
        entry.job, entry.log = f"slurm {submitted['slurm_job']}", str(folder / f"{submitted['slurm_job']}_0_log.out")
    elif "pid" in submitted:
        entry.job, entry.log = f"pid {submitted['pid']}", submitted.get("log")
    if finished is not None and not finished.get("ok"):
        entry.state, entry.error = "failed", finished.get("error")
    elif set(protocols) <= set(results["protocols"]):
        entry.state = "done"
    elif (folder / REFUSED).exists():
        entry.state, entry.log = "refused", str(folder / REFUSED)
    elif "slurm_job" in submitted:
        entry.state = (job_state(submitted["slurm_job"]) or "unknown").lower()
    elif "pid" in submitted:
        here = submitted.get("host", socket.gethostname()) == socket.gethostname()
        alive = here and Path(f"/proc/{submitted['pid']}").exists()
        entry.state = "running" if alive and finished is None else "stopped"
    elif (folder / SBATCH_SCRIPT).exists():
        entry.state = "waiting"
    return entry


def run_status(run_dir: Path) -> RunStatus:
    run_dir = Path(run_dir)
    config = read_saved_config(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).exists() else {}
    rows = read_metrics(run_dir)
    status = RunStatus(run_dir=str(run_dir), state="not started", where="no process")
    id_file = run_dir / JOB_FOLDER / JOB_ID_FILE
    if id_file.exists():
        status.slurm_job = id_file.read_text().strip()
        history = job_history(status.slurm_job)
        status.requeues = history.count("REQUEUED") + history.count("PREEMPTED") if history else None
        state = job_state(status.slurm_job)
        status.where = f"slurm job {status.slurm_job} ({state or 'not in the queue'})"
        if state in ("PENDING", "REQUEUED", "CONFIGURING"):
            status.state = "queued"
    holder = lock_holder(run_dir)
    if holder is not None:
        status.state = "running"
        status.where = (f"{status.where}, " if status.slurm_job else "") + f"pid {holder['pid']} on {holder['host']}"
    epochs = config.get("optim", {}).get("epochs")
    if status.state == "not started" and rows:
        status.state = "stopped"
    progress(status, rows, epochs)
    if status.state == "stopped" and status.total_steps and status.step >= status.total_steps:
        status.state = "finished"
    checkpoints(status, run_dir)
    protocols = config.get("eval", {}).get("protocols", [])
    if (run_dir / "eval").is_dir():
        status.evaluations = sorted((evaluation(folder, protocols) for folder in (run_dir / "eval").iterdir()
                                     if folder.is_dir()), key=lambda e: e.step)
    return status
