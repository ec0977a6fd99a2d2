"""Run metrics to ``metrics.jsonl``, wandb (offline by default) and a progress bar, all from rank 0 only; messages
through the standard ``logging`` module (logger ``smim_dist``), timestamped on stderr and kept clear of the bar. The
bar is drawn on a terminal only: under SLURM or with the output redirected its carriage returns would fill the log
with fragments, and the periodic line carries the progress and the ETA instead.

``metrics.jsonl`` is the record of truth (one JSON object per line, appended and flushed, so a preempted run loses at
most the line being written); wandb mirrors it and resumes the same wandb run after a restart, through the id kept
in the run directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

import wandb
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from smim_dist.config import Config, ConfigError
from smim_dist.files import write_atomic

WANDB_ID_FILE = "wandb_run_id"
METRICS_FILE = "metrics.jsonl"
LOG = logging.getLogger("smim_dist")


def duration(seconds: float | None) -> str:
    """``42s``, ``7m05s``, ``3h20m``, ``2d04h``: an ETA at a glance."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m{seconds % 60:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes < 1440 else f"{minutes // 1440}d{minutes // 60 % 24:02d}h"


def _wandb_id(run_dir: Path) -> str:
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def keep_rows_up_to(metrics: Path, step: int) -> None:
    """A resumed run trains again the steps after its checkpoint; their old rows (and a line cut off by a kill) go,
    so every reader sees each step once."""
    if not metrics.exists():
        return
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_atomic(metrics, "".join(rows))


def check_wandb_credentials(cfg: Config) -> None:
    """An online run needs a key; say so before training instead of hanging at a login prompt on a compute node."""
    if cfg.log.wandb_mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists() and "api.wandb.ai" in netrc.read_text():
        return
    raise ConfigError("log.wandb_mode=online but no wandb key was found (WANDB_API_KEY or `wandb login`); set the key, "
                      "or use log.wandb_mode=offline and `wandb sync` the run directory later")


class RunLogger:
    def __init__(self, cfg: Config, is_main: bool, total_steps: int, start_step: int):
        self.is_main = is_main
        self.metrics_path = cfg.run_dir / METRICS_FILE
        self.wandb_run = None
        self.bar = None
        self.total_steps = total_steps
        self.first_logged: tuple[int, float] | None = None
        if not is_main:
            return
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        LOG.addHandler(self.handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
        keep_rows_up_to(self.metrics_path, start_step)
        self.metrics_file = self.metrics_path.open("a", buffering=1)
        if cfg.log.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.log.wandb_project, entity=cfg.log.wandb_entity, group=cfg.log.wandb_group or cfg.run_name,
                name=cfg.run_name, id=_wandb_id(cfg.run_dir), resume="allow", mode=cfg.log.wandb_mode,
                dir=str(cfg.run_dir), config=cfg.to_dict())
        if cfg.log.progress and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                            smoothing=0.05, mininterval=0.5)
            self.redirect = logging_redirect_tqdm([LOG])
            self.redirect.__enter__()

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def info(self, message: str) -> None:
        if self.is_main:
            LOG.info(message)

    def advance(self, steps: int, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items() if v is not None}, refresh=False)

    def eta(self, step: int) -> float | None:
        """Seconds left at the pace since the first step this process logged (past compilation and warm-up)."""
        if self.first_logged is None or step <= self.first_logged[0]:
            return None
        first_step, first_time = self.first_logged
        return (time.time() - first_time) / (step - first_step) * max(self.total_steps - step, 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        self.first_logged = self.first_logged or (step, time.time())
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.metrics_file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.redirect.__exit__(None, None, None)
            self.bar.close()
        LOG.removeHandler(self.handler)
        self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

