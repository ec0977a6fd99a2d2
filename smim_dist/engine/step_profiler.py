"""A torch.profiler trace of a window of the training loop's own steps, on every rank.

``bench/profile_step.py`` profiles a step in isolation; this profiles the run itself, on the cluster's GPUs, with its
loader, DeepSpeed engine, collectives and stragglers, which is where a slow run's time has to be found. Each rank writes
its trace (Chrome / Perfetto JSON, gzipped) and a table of its operators by self time to ``<run>/profile/``. Each
profiled step is a range named ``step N`` in the trace; the gap before one is the wait for its first micro-batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


class StepProfiler:
    """Profiles optimizer steps ``first`` .. ``first + count - 1`` (numbered as the log numbers them), or the part of
    that window this process runs (a run resumed inside it, or stopped inside it)."""

    def __init__(self, first: int, count: int, out_dir: Path, rank: int, device: torch.device):
        self.first, self.last = first, first + count - 1
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self.profiler: profile | None = None
        self.step_range: record_function | None = None
        self.started_at = 0

    def step_starting(self, step: int) -> None:
        if self.profiler is None and self.first <= step <= self.last:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()
            self.started_at = step
        if self.profiler is not None:
            self.step_range = record_function(f"step {step}")
            self.step_range.__enter__()

    def step_done(self, step: int) -> str | None:
        """Closes the step's range; after the window's last step, writes the files and returns where."""
        if self.profiler is None:
            return None
        self._end_step_range()
        return self.close(step) if step >= self.last else None

    def _end_step_range(self) -> None:
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None

    def close(self, last_step: int) -> str | None:
        """Stops profiling and writes the trace of the steps profiled so far, if any."""
        if self.profiler is None:
            return None
        self._end_step_range()
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        self.first = self.last + 1
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"rank{self.rank:05d}_steps{self.started_at}-{last_step}"
        profiler.export_chrome_trace(f"{stem}.json.gz")
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        Path(f"{stem}.txt").write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
        return f"{stem}.json.gz"
