"""The DeepSpeed engine as the training loop builds it: what its bf16 step does and does not run."""

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero import stage_1_and_2

from smim_dist.config import Config, ModelConfig
from smim_dist.engine.deepspeed_setup import build_engine
from smim_dist.engine.distributed import init_distributed
from smim_dist.loss import gather_masked, mim_loss
from smim_dist.masking import RandomMaskGenerator
from smim_dist.models.mask_index import MaskIndices
from smim_dist.models.mim import MIMModel
from smim_dist.targets.pixels import PixelTarget


@pytest.fixture
def process_group(monkeypatch):
    """A group of one in this process, torn down after, so no other test inherits its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    yield init_distributed()
    dist.destroy_process_group()


def test_bf16_step_runs_no_per_gradient_overflow_check(process_group, monkeypatch):
    if not get_accelerator().is_bf16_supported():
        pytest.skip("DeepSpeed's accelerator here has no bf16")
    checks = []
    real_check = stage_1_and_2.DeepSpeedZeroOptimizer._has_inf_or_nan
    monkeypatch.setattr(stage_1_and_2.DeepSpeedZeroOptimizer, "_has_inf_or_nan",
                        staticmethod(lambda x, j=None: checks.append(1) or real_check(x)))
    cfg = Config()
    cfg.model = ModelConfig(size="micro", img_size=32, patch_size=8, drop_path=0.0)
    cfg.optim.global_batch = cfg.optim.micro_batch = 4
    cfg.engine.precision = "bf16"
    target = PixelTarget(8)
    model = MIMModel(cfg.model, target.out_dim)
    engine = build_engine(cfg, model, 1, process_group.device)
    before = copy.deepcopy(engine.module.state_dict())
    images = torch.randn(4, 3, 32, 32)
    mask = MaskIndices.from_bool(torch.stack([torch.from_numpy(RandomMaskGenerator((4, 4), 8).mask_for(0, 0, i))
                                              for i in range(4)]))
    loss = mim_loss(engine(images.to(torch.bfloat16), mask), gather_masked(target(images), mask.masked))
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)
    assert not checks, f"{len(checks)} per-gradient overflow checks ran in one bf16 step"
    after = engine.module.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before), "the step changed no weight"
