"""The pre-training micro-step, written once for the training loop and the benchmarks, so that a benchmark's plain
torch and DeepSpeed rows run what the trainer runs: targets of the masked patches without gradients, the forward on
the batch cast to the model's compute dtype (its weights' dtype: no autocast), the loss, backward, optimizer step.

The loop runs its non-finite guard between the pieces (``forward_loss``, then ``backward_step`` with the guard armed in
between at a window's end). Nothing here reads the device from the host, so on a GPU the host keeps queueing ahead.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import Tensor, nn

from smim_dist.data.batch import DeviceBatch
from smim_dist.loss import gather_masked, mim_loss

Target = Callable[[Tensor, Tensor | None], Tensor]
"""per-patch targets from the normalised images and BEiT's tokenizer views: ``targets.build.MIMTarget``"""
Phase = Callable[[str], ContextManager]
"""wraps each part of a step by its name (target, forward, backward, optimizer): bench/profile_step.py's ranges"""


def unmarked(name: str) -> ContextManager:
    return contextlib.nullcontext()


def compute_dtype(engine) -> torch.dtype:
    """The dtype a DeepSpeed engine holds its module's weights in, which its input must be cast to."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32


def masked_targets(target: Target, batch: DeviceBatch) -> Tensor:
    with torch.no_grad():
        return gather_masked(target(batch.images, batch.tokenizer_views), batch.mask.masked)


def forward_loss(model, target: Target, batch: DeviceBatch, dtype: torch.dtype,
                 phase: Phase = unmarked) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, prediction, targets): the loop's metrics read all three."""
    with phase("target"):
        targets = masked_targets(target, batch)
    with phase("forward"):
        prediction = model(batch.images.to(dtype), batch.mask)
        loss = mim_loss(prediction, targets)
    return loss, prediction, targets


def backward_step(engine, loss: Tensor, before_step: Callable[[], None] | None = None,
                  phase: Phase = unmarked) -> None:
    """``before_step`` runs after the backward, before ``engine.step()``: where the loop hands its non-finite flag to
    AdamW at the end of an accumulation window."""
    with phase("backward"):
        engine.backward(loss)
    if before_step is not None:
        before_step()
    with phase("optimizer"):
        engine.step()


def train_step(engine, target: Target, batch: DeviceBatch, dtype: torch.dtype, phase: Phase = unmarked) -> Tensor:
    """A whole micro-step without the loop's guard, as the benchmarks time it; the loss comes back detached."""
    loss, _, _ = forward_loss(engine, target, batch, dtype, phase)
    backward_step(engine, loss, phase=phase)
    return loss.detach()


class PlainEngine:
    """A model and a torch optimizer behind the DeepSpeed engine's step interface (call, ``backward``, ``step``), so
    the same step runs without DeepSpeed. Every ``step`` is an optimizer step (no accumulation) and zeroes the
    gradients after it, as the engine does at a window's end; ``clip_grad`` clips the global gradient norm first.

    The model computes in the dtype its weights have: cast it to bf16 for a bf16 step, as DeepSpeed's bf16 engine
    holds bf16 weights. The optimizer then updates those bf16 weights directly, where DeepSpeed updates an fp32 master
    copy and rounds it to bf16, so an update below a weight's bf16 rounding step is lost here and kept there."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float = 0.0):
        self.model, self.optimizer, self.clip_grad = model, optimizer, clip_grad

    def __call__(self, *args) -> Tensor:
        return self.model(*args)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
