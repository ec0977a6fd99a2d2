"""The DeepSpeed engine for a config: ZeRO stage, precision, batch arithmetic, AdamW groups, gradient clipping."""

from __future__ import annotations

import deepspeed
import torch
from timm.optim import param_groups_weight_decay
import torch.distributed as dist
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


def set_fp32_precision(tf32: bool) -> None:
    """torch computes float32 matrix products in IEEE float32 by default, and convolutions in TF32; ``engine.tf32``
    sets both, for this process. CPUs are left alone: their reduced-precision float32 modes are not TF32. These are
    the flags every torch since 1.7 reads; torch 2.9's per-backend ``fp32_precision`` settings would make
    ``torch.get_float32_matmul_precision()`` raise, and inductor's autotuning calls it."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def param_groups(model: nn.Module, weight_decay: float, decayed_tokens: tuple[str, ...] = ()) -> list[dict]:
    """AdamW groups: no decay on norms, biases (every tensor of rank <= 1), tokens and position embeddings, except
    the tokens named in ``decayed_tokens`` (the authors' recipes decay some)."""
    skip = [name for name in model.no_weight_decay() if not name.endswith(tuple(decayed_tokens))]
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


DEEPSPEED_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size``, in elements"""
OVERLAP_BUCKET = 40_000_000
"""the largest bucket of an overlapped all-reduce (80 MB of bf16, enough to reach NCCL's bandwidth; Megatron-LM's
default)"""


def deepspeed_config(cfg: Config, world_size: int, num_params: int) -> dict:
    """bf16 runs without DeepSpeed's per-gradient overflow checks: bf16 has fp32's range, and the loop's non-finite
    guard already skips the update of every step with a non-finite loss on any rank, and those checks cost six small
    kernels per parameter tensor and a host read every step (measured in bench/README.md). Where the fused
    AdamW takes the gradient norm (``norm_inside_adamw``), DeepSpeed neither clips nor computes it.

    ZeRO 1-3 allocate their gradient reduction bucket at ``reduce_bucket_size`` elements whatever the model's size:
    500M by default, 1 GB in bf16 and 2 GB in fp32 for a model of 0.1B (every backward under ZeRO 1/2). A bucket of
    ``num_params`` holds every gradient, so the reductions are the same ones, from a buffer no larger than needed.
    With ``engine.overlap_comm`` (ZeRO 1/2) a bucket holds a quarter of the model, at most ``OVERLAP_BUCKET``
    elements, so the first buckets are reduced while the backward computes the rest."""
    optim, engine = cfg.optim, cfg.engine
    norm_in_adamw = norm_inside_adamw(cfg)
    ds = {
        "train_batch_size": optim.global_batch,
        "train_micro_batch_size_per_gpu": optim.micro_batch_size(world_size),
        "gradient_accumulation_steps": optim.accumulation_steps(world_size),
        "gradient_clipping": 0.0 if norm_in_adamw else optim.clip_grad,
        "zero_optimization": {"stage": engine.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if engine.zero_stage in (1, 2):
        ds["zero_optimization"]["compute_grad_norm"] = not norm_in_adamw
    if engine.zero_stage > 0:
        ds["zero_optimization"]["reduce_bucket_size"] = min(num_params, DEEPSPEED_REDUCE_BUCKET)
    if engine.overlap_comm:
        ds["zero_optimization"].update(overlap_comm=True, reduce_bucket_size=min(-(-num_params // 4), OVERLAP_BUCKET))
    if engine.precision == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
    elif engine.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds


def build_engine(cfg: Config, model: nn.Module, world_size: int, device: torch.device):
    """Wrap the model in a DeepSpeed engine with torch's fused AdamW (one kernel over all tensors, on CPUs and
    GPUs, rather than a loop over them; bench/README.md compares the two); the LR is set per step by the loop."""
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decayed_tokens)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  eps=cfg.optim.eps, fused=True)
    num_params = sum(param.numel() for param in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, world_size, num_params))
    if norm_inside_adamw(cfg):
        clip_inside_adamw(engine, cfg.optim.clip_grad)
    if cfg.engine.compile:
        engine.compile()
    return engine


def fused_adamw(engine) -> torch.optim.AdamW:
    """The torch optimizer DeepSpeed steps: the engine's own (ZeRO 0 in fp32) or the one its ZeRO / mixed-precision
    wrapper holds."""
    optimizer = engine.optimizer if isinstance(engine.optimizer, torch.optim.Optimizer) else engine.optimizer.optimizer
    if not (isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused")):
        raise TypeError(f"expected torch's fused AdamW inside DeepSpeed, got {type(optimizer)}")
    return optimizer


def norm_inside_adamw(cfg: Config) -> bool:
    """ZeRO 1/2 in fp32 or bf16, and ZeRO 0 in fp32 (where DeepSpeed steps AdamW itself), take the gradient norm (and
    clip, when ``optim.clip_grad`` is on) in AdamW's pre-step hook, with or without clipping, so the logged norm costs
    no sync either (DeepSpeed's ZeRO 0 clipping does not report its norm at all). fp16 keeps DeepSpeed's clipping,
    which its loss scaling needs anyway; ZeRO 0 in bf16 steps through DeepSpeed's unfused mixed-precision wrapper,
    which clips on its own; ZeRO 3 gathers its norm over partitioned parameters itself."""
    stage, precision = cfg.engine.zero_stage, cfg.engine.precision
    return (stage in (1, 2) and precision != "fp16") or (stage == 0 and precision == "fp32")


def clip_inside_adamw(engine, max_norm: float) -> None:
    """ZeRO 0/1/2 clipping without a host sync and without per-tensor kernels. DeepSpeed's own clipping norms each
    gradient tensor separately and then syncs twice a step (its invalid-norm check reads the norm; its NaN masking
    fills from a 0-dim device tensor, which CUDA reads back). So DeepSpeed's config turns its norm off
    (``compute_grad_norm: false``), and a pre-step hook on the fused AdamW computes the global norm on the device:
    one multi-tensor norm over this rank's gradient partition and one all-reduce, at the first param group's update,
    before any weight moves. It hands AdamW the clip factor as its ``grad_scale`` (the kernel divides the gradients by
    it, as for ``torch.amp.GradScaler``), or ``found_inf`` when the norm is not finite, which skips the update as the
    non-finite guard skips one. The norm is also left where DeepSpeed's ``get_global_grad_norm`` reports it.
    ``max_norm`` 0 computes and reports the norm without clipping.

    ZeRO 1/2 step the param groups one at a time; when the first one steps, its gradient is the flat fp32 partition
    AdamW sees and the others still wait in ``averaged_gradients`` (private, as is ``_global_grad_norm``:
    tests/test_deepspeed_setup.py fails if an upgrade moves either). ZeRO partitions are disjoint and cover the model
    in the data-parallel group, which is the whole world in ``smim-train``. Under ZeRO 0 AdamW steps every group at
    once on gradients DeepSpeed has already averaged over the ranks, so the norm needs no all-reduce; the engine
    reports it from the optimizer's ``_global_grad_norm``."""
    adamw = fused_adamw(engine)
    sharded = engine.optimizer is not adamw
    norm_holder = engine.optimizer
    first_partition = adamw.param_groups[0]["params"][0]

    def global_grad_norm(optimizer) -> torch.Tensor:
        stepping = [param.grad for group in optimizer.param_groups for param in group["params"]
                    if param.grad is not None]
        waiting = [grad for grads in norm_holder.averaged_gradients.values() if grads is not None for grad in grads] \
            if sharded else []
        squares = torch.stack(torch._foreach_norm(stepping + waiting, 2, dtype=torch.float32)).square().sum()
        if sharded:
            dist.all_reduce(squares)
        return squares.sqrt()

    def before_update(optimizer, args, kwargs) -> None:
        if optimizer.param_groups[0]["params"][0] is first_partition:
            norm_holder._global_grad_norm = global_grad_norm(optimizer)
        norm = norm_holder._global_grad_norm
        invalid = (~torch.isfinite(norm)).float()
        if max_norm > 0:
            optimizer.grad_scale = torch.where(invalid > 0, 1.0, ((norm + 1e-6) / max_norm).clamp(min=1.0))
        found_inf = getattr(optimizer, "found_inf", None)
        optimizer.found_inf = invalid if found_inf is None else torch.maximum(found_inf, invalid)

    adamw.register_step_pre_hook(before_update)


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
