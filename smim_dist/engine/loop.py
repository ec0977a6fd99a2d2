"""One epoch of pre-training on one rank: batch -> targets -> model -> loss -> backward / step."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist

from smim_dist.config import Config
from smim_dist.data.batch import DeviceNormalizer
from smim_dist.engine.deepspeed_setup import set_lr
from smim_dist.engine.distributed import any_rank
from smim_dist.engine.schedule import cosine_lr
from smim_dist.logging import RunLogger
from smim_dist.loss import gather_masked, image_blind_loss, mim_loss
from smim_dist.targets.build import MIMTarget


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops rather than train on garbage."""


@dataclass
class TrainState:
    """Where training stands; everything a checkpoint needs to continue the loop exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0
    """micro-batches of this epoch already consumed (trained or skipped)"""
    step: int = 0
    """optimizer steps taken"""
    micro_in_window: int = 0
    """good micro-batches accumulated towards the next optimizer step"""
    skipped: int = 0
    bad_in_row: int = 0
    corrupt_images: int = 0
    """undecodable images this rank's loader passed over"""

    def state_dict(self) -> dict:
        return asdict(self)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class EpochRunner:
    """Holds what every epoch reuses; ``run_epoch`` is the training loop itself."""

    def __init__(self, cfg: Config, engine, target: MIMTarget, device: torch.device, logger: RunLogger,
                 steps_per_epoch: int):
        self.cfg, self.engine, self.target, self.logger = cfg, engine, target, logger
        self.device = device
        self.normalize = DeviceNormalizer(device, tokenizer_view=target.needs_tokenizer_view)
        self.accumulation = engine.gradient_accumulation_steps()
        self.dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() \
            else torch.float32
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.optim.epochs
        self.warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.warmup_steps, self.cfg.optim.lr, self.cfg.optim.min_lr)

    def run_epoch(self, loader, state: TrainState, stop_requested: Callable[[], bool],
                  pause_at_next_step: bool = False) -> str:
        """Train until the loader is exhausted ("done"), every rank agreed to stop at a step boundary ("stop"), or,
        with ``pause_at_next_step``, the next optimizer step is taken ("pause"); checkpoints are only ever written at
        step boundaries, where no gradients are half accumulated."""
        engine, flags = self.engine, torch.zeros(2, device=self.device)
        loss_sums, good_micro = torch.zeros(2, device=self.device), 0
        window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
        fetch_start = time.perf_counter()
        for raw in loader:
            data_wait += time.perf_counter() - fetch_start
            state.corrupt_images += int(raw["corrupt_skipped"])
            batch = self.normalize(raw)
            targets = gather_masked(self.target(batch.images, batch.tokenizer_views), batch.mask.masked)
            if state.micro_in_window == 0:
                set_lr(engine, self.lr_at(state.step))
            prediction = engine(batch.images.to(self.dtype), batch.mask)
            loss = mim_loss(prediction, targets)
            state.batch_in_epoch += 1
            flags[0] = ~torch.isfinite(loss.detach())
            flags[1] = float(state.micro_in_window == 0 and stop_requested())
            non_finite, stop = any_rank(flags)
            if stop:
                state.batch_in_epoch -= 1
                return "stop"
            if non_finite:
                state.skipped += 1
                state.bad_in_row += 1
                self.logger.info(f"non-finite loss at step {state.step}, micro-batch {state.batch_in_epoch} of epoch "
                                 f"{state.epoch}: skipped on all ranks ({state.bad_in_row} in a row)")
                if state.bad_in_row >= self.cfg.engine.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{state.bad_in_row} non-finite losses in a row (engine.max_bad_steps="
                        f"{self.cfg.engine.max_bad_steps}) at step {state.step}; the last good checkpoint is left "
                        "untouched. Lower optim.lr, raise optim.warmup_epochs or use engine.precision=fp32/bf16")
                fetch_start = time.perf_counter()
                continue
            state.bad_in_row = 0
            engine.backward(loss)
            engine.step()
            loss_sums += torch.stack([loss.detach(), image_blind_loss(prediction, targets)])
            good_micro += 1
            state.micro_in_window += 1
            if state.micro_in_window == self.accumulation:
                state.micro_in_window = 0
                state.step += 1
                window_steps += 1
                self.logger.advance(1)
                if state.step % self.cfg.log.every_steps == 0 or state.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    self._log(state, loss_sums, good_micro, elapsed, data_wait, window_steps)
                    loss_sums.zero_()
                    good_micro, window_steps, data_wait = 0, 0, 0.0
                    window_start = time.perf_counter()
                if pause_at_next_step:
                    return "pause"
            fetch_start = time.perf_counter()
        state.epoch += 1
        state.batch_in_epoch = 0
        return "done"

    def _log(self, state: TrainState, loss_sums: torch.Tensor, good_micro: int, elapsed: float, data_wait: float,
             steps: int) -> None:
        """Metrics over the steps since the last log; the loss is the mean over all ranks' micro-batches."""
        counts = torch.tensor([good_micro, state.corrupt_images], dtype=torch.float32, device=self.device)
        totals = torch.cat([loss_sums, counts])
        dist.all_reduce(totals)
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "epoch": state.epoch + state.batch_in_epoch / (self.steps_per_epoch * self.accumulation),
            "loss": float(totals[0] / totals[2].clamp(min=1)),
            "image_blind_loss": float(totals[1] / totals[2].clamp(min=1)),
            "lr": self.lr_at(state.step - 1),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "images_per_s": steps * self.cfg.optim.global_batch / elapsed,
            "step_time_s": elapsed / steps,
            "data_wait_frac": data_wait / elapsed,
            "peak_mem_mb": _peak_memory_mb(self.device),
            "skipped_steps": state.skipped,
            "corrupt_images": int(totals[3]),
        }
        self.logger.log(state.step, metrics)
        self.logger.advance(0, loss=metrics["loss"], lr=metrics["lr"])
        self.logger.info(f"step {state.step}/{self.total_steps} ep {metrics['epoch']:.2f} loss {metrics['loss']:.4f} "
                         f"(image-blind {metrics['image_blind_loss']:.4f}) "
                         f"lr {metrics['lr']:.2e} {metrics['images_per_s']:.0f} img/s "
                         f"data-wait {100 * metrics['data_wait_frac']:.0f}%")
