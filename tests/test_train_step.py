"""The one training step the loop and the benchmarks share: on a plain model it trains as the DeepSpeed engine does, so
a benchmark's plain-torch row and its engine row compute the same thing."""

import copy

import pytest
import torch
from deepspeed.accelerator import get_accelerator

from smim_dist.data.batch import DeviceBatch
from smim_dist.engine.deepspeed_setup import build_engine, param_groups
from smim_dist.engine.train_step import PlainEngine, compute_dtype, train_step
from smim_dist.loss import gather_masked, mim_loss
from smim_dist.models.mim import MIMModel
from smim_dist.targets.build import MIMTarget
from smim_dist.targets.pixels import PixelTarget
from test_deepspeed_setup import micro_batch, micro_config


@pytest.fixture
def device(process_group) -> torch.device:
    return process_group.device


def engines(precision: str, device: torch.device):
    """A DeepSpeed engine as ``smim-train`` builds it and a plain one with the same weights, optimizer and clipping."""
    torch.manual_seed(0)
    cfg = micro_config(precision)
    cfg.optim.clip_grad = 0.05  # below the micro model's gradient norm: the clip is active
    target = MIMTarget("pixels", PixelTarget(8), PixelTarget(8).out_dim)
    model = MIMModel(cfg.model, target.out_dim)
    plain = copy.deepcopy(model).to(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    optimizer = torch.optim.AdamW(param_groups(plain, cfg.optim.weight_decay, cfg.optim.decayed_tokens),
                                  lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)
    return build_engine(cfg, model, 1, device), PlainEngine(plain, optimizer, cfg.optim.clip_grad), target


def batch(seed: int) -> DeviceBatch:
    images, mask, _ = micro_batch(PixelTarget(8), seed=seed)
    return DeviceBatch(images, mask)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().float().clone() for name, value in module.state_dict().items()}


def test_a_plain_model_steps_as_the_deepspeed_engine_in_fp32(device):
    """Two steps on two batches: the same losses and the same weights after each (the second step also fails if the
    plain engine keeps the first step's gradients)."""
    deepspeed_engine, plain, target = engines("fp32", device)
    before = weights(plain.model)
    first = batch(1)
    with torch.no_grad():
        expected = mim_loss(plain.model(first.images, first.mask),
                            gather_masked(target(first.images), first.mask.masked))
    torch.testing.assert_close(train_step(plain, target, first, torch.float32), expected)
    torch.testing.assert_close(train_step(deepspeed_engine, target, first, compute_dtype(deepspeed_engine)),
                               expected)
    assert not any(param.grad is not None for param in plain.model.parameters()), "step() leaves no gradient behind"
    second = batch(2)
    torch.testing.assert_close(train_step(plain, target, second, torch.float32),
                               train_step(deepspeed_engine, target, second, torch.float32))
    after = weights(plain.model)
    assert any(not torch.allclose(before[name], after[name]) for name in before), "the steps changed no weight"
    for name, value in weights(deepspeed_engine.module).items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_plain_bf16_model_computes_the_deepspeed_bf16_engines_loss(device):
    """bf16 weights on both sides, no autocast: the same forward to the bit. The updates then differ by rounding only
    (DeepSpeed steps an fp32 master copy, the plain optimizer the bf16 weights)."""
    if not get_accelerator().is_bf16_supported():
        pytest.skip("DeepSpeed's accelerator here has no bf16")
    deepspeed_engine, plain, target = engines("bf16", device)
    assert compute_dtype(deepspeed_engine) == torch.bfloat16
    assert torch.equal(train_step(plain, target, batch(1), torch.bfloat16),
                       train_step(deepspeed_engine, target, batch(1), torch.bfloat16))
    after = weights(plain.model)
    for name, value in weights(deepspeed_engine.module).items():
        torch.testing.assert_close(after[name], value, rtol=1e-2, atol=1e-3, msg=name)
