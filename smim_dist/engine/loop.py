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
from smim_dist.engine.device_peak import device_peak_tflops
from smim_dist.engine.nonfinite_guard import NonFiniteGuard, NonFiniteLossError
from smim_dist.engine.schedule import cosine_lr
from smim_dist.engine.step_profiler import StepProfiler
from smim_dist.engine.train_step import backward_step, compute_dtype, forward_loss
from smim_dist.run_logger import RunLogger, duration
from smim_dist.loss import image_blind_loss
from smim_dist.models.flops import forward_flops
from smim_dist.targets.build import MIMTarget


@dataclass
class TrainState:
    """Where training stands; everything a checkpoint needs to continue the loop exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0
    """micro-batches of this epoch already consumed"""
    step: int = 0
    """optimizer steps taken, skipped ones included: the LR schedule and the data position follow it"""
    skipped: int = 0
    """steps whose update was skipped because some rank had a non-finite loss in their window"""
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
                 steps_per_epoch: int, rank: int = 0):
        self.cfg, self.engine, self.target, self.logger = cfg, engine, target, logger
        self.device = device
        self.profiler = StepProfiler(cfg.log.profile_from_step, cfg.log.profile_steps, cfg.run_dir / "profile", rank,
                                     device)
        self.normalize = DeviceNormalizer(device, tokenizer_view=target.needs_tokenizer_view)
        self.accumulation = engine.gradient_accumulation_steps()
        self.dtype = compute_dtype(engine)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.optim.epochs
        self.warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
        # Model FLOPs as bench/step.py counts them: forward + backward = 3x the forward, targets not included.
        self.flops_per_image = 3 * forward_flops(cfg.model, cfg.mask.ratio, True, target.out_dim)
        self.peak_tflops = device_peak_tflops(device, cfg.engine.matmul_precision)

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.warmup_steps, self.cfg.optim.lr, self.cfg.optim.min_lr)

    def run_epoch(self, loader, state: TrainState, stop_requested: Callable[[], bool]) -> str:
        """Train until the loader is exhausted ("done") or every rank agreed to stop ("stop"), always at a step
        boundary, where no gradients are half accumulated. Nothing in a step waits for the device: the host reads it
        every ``engine.check_every_steps`` steps, at log steps and at the end of the epoch, and there all ranks
        agree on stopping (a signal on any rank) and on giving up (``engine.max_bad_steps``)."""
        engine, stop_seen = self.engine, False
        guard = NonFiniteGuard(engine, self.device, state.skipped, state.bad_in_row)
        sums = torch.zeros(3, device=self.device)  # loss, image-blind loss, finite micro-batches
        corrupt = torch.zeros((), dtype=torch.long)
        window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
        fetch_start = time.perf_counter()
        for raw in loader:
            data_wait += time.perf_counter() - fetch_start
            corrupt += raw["corrupt_skipped"]
            if state.batch_in_epoch % self.accumulation == 0:
                set_lr(engine, self.lr_at(state.step))
                self.profiler.step_starting(state.step + 1)
            loss, prediction, targets = forward_loss(engine, self.target, self.normalize(raw), self.dtype)
            finite = guard.observe(loss)
            sums += torch.where(finite, torch.stack([loss.detach(), image_blind_loss(prediction, targets),
                                                     torch.ones((), device=self.device)]), 0.0)
            window_done = (state.batch_in_epoch + 1) % self.accumulation == 0
            backward_step(engine, loss, guard.arm if window_done else None)
            state.batch_in_epoch += 1
            if window_done:
                guard.record_step()
                state.step += 1
                self.log_trace(self.profiler.step_done(state.step))
                window_steps += 1
                self.logger.advance(1)
                stop_seen = stop_seen or stop_requested()
                log_due = state.step % self.cfg.log.every_steps == 0 or state.step == self.total_steps
                stop = (log_due or state.step % self.cfg.engine.check_every_steps == 0) \
                    and self._agree_to_stop(state, guard, corrupt, stop_seen)
                if log_due:
                    self._log(state, sums, time.perf_counter() - window_start, data_wait, window_steps)
                    sums.zero_()
                    window_steps, data_wait = 0, 0.0
                    window_start = time.perf_counter()
                if stop:
                    return "stop"
            fetch_start = time.perf_counter()
        state.epoch += 1
        state.batch_in_epoch = 0
        return "stop" if self._agree_to_stop(state, guard, corrupt, stop_seen) else "done"

    def log_trace(self, trace: str | None) -> None:
        if trace is not None:
            self.logger.info(f"profile: rank 0's trace {trace} (Perfetto or chrome://tracing), its operators by self "
                             "time in the .txt beside it; every rank wrote its own")

    def _agree_to_stop(self, state: TrainState, guard: NonFiniteGuard, corrupt: torch.Tensor, stop_seen: bool) -> bool:
        """The loop's one host read between log steps: brings the device counters into ``state`` and decides, the
        same on every rank, whether to stop."""
        flags = torch.cat([guard.counters(), torch.tensor([float(stop_seen)], device=self.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skipped, bad_in_row, worst_in_row, stop = (int(value) for value in flags.tolist())
        if skipped > state.skipped:
            self.logger.info(f"{skipped - state.skipped} step(s) up to step {state.step} skipped on all ranks for a "
                             f"non-finite loss ({skipped} in all)")
        state.skipped, state.bad_in_row = skipped, bad_in_row
        state.corrupt_images += int(corrupt)
        corrupt.zero_()
        if worst_in_row >= self.cfg.engine.max_bad_steps:
            raise NonFiniteLossError(
                f"{worst_in_row} steps in a row had a non-finite loss (engine.max_bad_steps="
                f"{self.cfg.engine.max_bad_steps}) by step {state.step}; the last good checkpoint is left untouched. "
                "Lower optim.lr, raise optim.warmup_epochs or use engine.precision=fp32/bf16")
        return bool(stop)

    def _log(self, state: TrainState, sums: torch.Tensor, elapsed: float, data_wait: float, steps: int) -> None:
        """Metrics over the steps since the last log; the loss is the mean over all ranks' finite micro-batch losses
        (None when there was none)."""
        totals = torch.cat([sums, torch.tensor([state.corrupt_images], dtype=torch.float32, device=self.device)])
        dist.all_reduce(totals)
        loss_sum, blind_sum, finite, corrupt = totals.tolist()
        waits, memories = self._per_rank(data_wait / elapsed)
        grad_norm = self.engine.get_global_grad_norm()
        images_per_s = steps * self.cfg.optim.global_batch / elapsed
        tflops = self.flops_per_image * images_per_s / dist.get_world_size() / 1e12
        metrics = {
            "epoch": state.epoch + state.batch_in_epoch / (self.steps_per_epoch * self.accumulation),
            "loss": loss_sum / finite if finite else None,
            "image_blind_loss": blind_sum / finite if finite else None,
            "lr": self.lr_at(state.step - 1),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "images_per_s": images_per_s,
            "model_tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "step_time_s": elapsed / steps,
            "data_wait_frac": sum(waits) / len(waits),
            "data_wait_frac_max": max(waits),
            "data_wait_max_rank": waits.index(max(waits)),
            "peak_mem_mb": max(memories),
            "skipped_steps": state.skipped,
            "corrupt_images": int(corrupt),
        }
        self.logger.log(state.step, metrics)
        self.logger.advance(0, loss=metrics["loss"], lr=metrics["lr"])
        losses = "no finite loss" if metrics["loss"] is None else \
            f"loss {metrics['loss']:.4f} (image-blind {metrics['image_blind_loss']:.4f})"
        self.logger.info(f"step {state.step}/{self.total_steps} ep {metrics['epoch']:.2f} {losses} "
                         f"lr {metrics['lr']:.2e} {metrics['images_per_s']:.0f} img/s "
                         + ("" if metrics["mfu"] is None else f"MFU {100 * metrics['mfu']:.1f}% ")
                         + f"data-wait {100 * metrics['data_wait_frac']:.0f}%"
                         + (f" (max {100 * max(waits):.0f}% on rank {metrics['data_wait_max_rank']})"
                            if len(waits) > 1 else "")
                         + (f" ETA {duration(eta)}" if (eta := self.logger.eta(state.step)) is not None else ""))

    def _per_rank(self, data_wait_frac: float) -> tuple[list[float], list[float]]:
        """Every rank's share of time waiting for its loader, and its peak memory. The ranks wait for each other in
        every step's collectives, so one slow loader (a node's slow disk or busy cores) slows them all while only its
        own rank waits for data, and one rank's peak memory decides an OOM: rank 0's own figures would hide both."""
        mine = torch.tensor([data_wait_frac, _peak_memory_mb(self.device)], device=self.device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        waits, memories = torch.stack(every).T.tolist()
        return waits, memories
