"""Skipping the update of a step with a non-finite loss on any rank, without the host ever waiting for the device.

The loop cannot ask "was that loss finite?" before the backward without stalling the host until the GPU has caught up,
once per micro-step. Instead every micro-batch goes through its backward, and at the end of the accumulation window
the ranks all-reduce one flag, "some loss of this window was not finite", into the ``found_inf`` input of torch's
fused AdamW inside DeepSpeed (the input ``torch.amp.GradScaler`` uses): when it is 1 the kernel leaves weights, moments
and step count as they were (``deepspeed_setup.clip_inside_adamw`` raises the same flag for a non-finite gradient
norm). So a non-finite loss costs its whole window, on every rank, and the counters (steps skipped, skipped in a row)
stay on the device until the loop reads them with its other decisions every ``engine.check_every_steps`` steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from smim_dist.engine.deepspeed_setup import fused_adamw


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row skipped for non-finite losses: the run stops rather than train on garbage."""


class NonFiniteGuard:
    """Device-side: this rank's flag for the current window, and the counters every rank holds identically because
    they are built from the all-reduced flag."""

    def __init__(self, engine, device: torch.device, skipped: int, bad_in_row: int):
        self.optimizer = fused_adamw(engine)
        self.window_bad = torch.zeros((), device=device)
        self.skipped = torch.tensor(float(skipped), device=device)
        self.bad_in_row = torch.tensor(float(bad_in_row), device=device)
        self.worst_in_row = self.bad_in_row.clone()
        """longest run of skipped steps since the last read, so a run that recovered in between is still caught"""

    def observe(self, loss: torch.Tensor) -> torch.Tensor:
        """Note a micro-batch's loss; returns whether it is finite (for the metrics)."""
        finite = torch.isfinite(loss.detach())
        self.window_bad.logical_or_(~finite)
        return finite

    def arm(self) -> None:
        """Before the ``engine.step()`` that ends the window: agree over the ranks and hand the flag to AdamW."""
        bad = self.window_bad.clone()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.optimizer.found_inf = bad
        self.window_bad.zero_()

    def record_step(self) -> None:
        """After that ``engine.step()``: count the step as skipped if AdamW was told to skip it, for a non-finite loss
        or, where the clipping runs inside AdamW, a non-finite gradient norm."""
        skipped = self.optimizer.found_inf
        self.skipped += skipped
        self.bad_in_row.add_(1).mul_(skipped)
        torch.maximum(self.worst_in_row, self.bad_in_row, out=self.worst_in_row)

    def counters(self) -> torch.Tensor:
        """[skipped, bad_in_row, worst_in_row] as one device tensor, for the loop's periodic read."""
        counts = torch.stack([self.skipped, self.bad_in_row, self.worst_in_row])
        self.worst_in_row.copy_(self.bad_in_row)
        return counts


def training_state_finite(engine) -> bool:
    """Whether every weight, master weight and optimizer moment of every rank is finite: one device reduction and one
    read, made before a checkpoint is written (never inside a step)."""
    optimizer = fused_adamw(engine)
    tensors = [*engine.module.parameters(), *(p for group in optimizer.param_groups for p in group["params"]),
               *(value for state in optimizer.state.values() for value in state.values()
                 if torch.is_tensor(value) and value.is_floating_point())]
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all().float()
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())
