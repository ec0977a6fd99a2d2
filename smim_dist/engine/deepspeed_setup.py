"""The DeepSpeed engine for a config: ZeRO stage, precision, batch arithmetic, AdamW groups, gradient clipping."""

from __future__ import annotations

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

from smim_dist.config import Config, ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision this device cannot train in, before any model is built."""
    accelerator = get_accelerator()
    supported = ["fp32"]
    if accelerator.is_bf16_supported():
        supported.append("bf16")
    if accelerator.is_fp16_supported():
        supported.append("fp16")
    if precision not in supported:
        raise ConfigError(f"engine.precision={precision} is not supported on this {device.type} device "
                          f"({accelerator.device_name()}); supported here: {', '.join(supported)}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases (every tensor of rank <= 1), tokens and position embeddings."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """bf16 runs without DeepSpeed's per-gradient overflow checks: bf16 has fp32's range, and the loop's non-finite
    guard already skips the update of every step with a non-finite loss on any rank. On an H200 those checks (six small
    kernels per parameter tensor and a host read) made a ViT-B/16 step 40% longer; see bench/README.md."""
    optim, engine = cfg.optim, cfg.engine
    ds = {
        "train_batch_size": optim.global_batch,
        "train_micro_batch_size_per_gpu": optim.micro_batch,
        "gradient_accumulation_steps": optim.accumulation_steps(world_size),
        "gradient_clipping": optim.clip_grad,
        "zero_optimization": {"stage": engine.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if engine.precision == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
    elif engine.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds


def build_engine(cfg: Config, model: nn.Module, world_size: int, device: torch.device):
    """Wrap the model in a DeepSpeed engine with torch's fused AdamW (one kernel over all tensors, CPU and GPU: 7.7x
    the default per-tensor loop on a ViT-S CPU step, bench/README.md); the LR is set per step by the loop."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  eps=cfg.optim.eps, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size))
    if cfg.engine.compile:
        engine.compile()
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
