"""Preemption and time-limit signals turned into a request the training loop honours at its next step boundary.

A signal arrives in the middle of a step, on some ranks and not others; saving from the handler would start a
collective checkpoint while other ranks are inside a forward pass. The handler only records the signal; every rank
looks at the record after each step, and at the loop's periodic check (``engine.check_every_steps``) they agree, so all
stop after the same step and write the checkpoint together.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
"""SIGUSR2: SLURM's warning before a time limit or preemption (``--signal=USR2@delay``, ``scancel --signal=USR2``);
SIGTERM: SLURM's cancellation or kill at the time limit, torchrun's and Kubernetes' shutdown."""


class StopSignals:
    """Callable as ``stop_requested``; ``received`` is the first stop signal seen."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.previous: dict[signal.Signals, object] = {}

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def watch_parent(self, interval: float = 1.0) -> StopSignals:
        """A worker of an agent (torchrun, launchers/local.py) stops as on SIGTERM when the agent dies without
        sending one (SIGKILL, OOM): left running, it would train on beside the workers a relaunch starts."""
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(interval)
            self._record(signal.SIGTERM, None)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
        return self

    def __call__(self) -> bool:
        return self.received is not None
