"""``smim-convert --shard-size N --slurm``: a sharded .beton written by a SLURM job array on the local cluster."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import REPO, run_cli
from smim_dist.config import load_config
from smim_dist.data.demo import ensure_demo_dataset
from smim_dist.data.pretrain_loader import build_pretrain_loader

pytestmark = pytest.mark.slurm


def epoch_batches(path):
    cfg = load_config(REPO / "configs/demo_cpu.yaml", [
        "data.demo=false", f"data.path={path}", "data.num_workers=1", "model.img_size=32", "model.patch_size=8",
        "optim.global_batch=16", "optim.micro_batch=8"])
    loader, positioner = build_pretrain_loader(cfg, 0, 1)
    positioner.set_epoch(1)
    return [{key: value.clone() for key, value in batch.items()} for batch in loader]


def test_a_job_array_writes_a_sharded_set_that_trains_as_the_single_file(slurm_cluster, tmp_path):
    demo = ensure_demo_dataset(tmp_path / "demo", num_train=64, num_val=12, size=64)
    out = tmp_path / "sharded"
    proc = run_cli(["-m", "smim_dist.data.convert_cli", "imagefolder", str(demo / "train"), str(out), "--shard-size",
                    "24", "--max-side", "64", "--compress-share", "1.0", "--slurm", "--tasks", "2", "--cpus-per-task",
                    "1", "--partition", slurm_cluster.partition, "--time", "15"], timeout=1200)
    array = re.search(r"Submitted job array (\d+): 2 tasks writing 3 shards", proc.stdout)[1]
    assert "Wrote 64 images in 3 shards" in proc.stdout
    tasks = {job: state for job, state in slurm_cluster.sacct(array) if re.fullmatch(rf"{array}_\d", job)}
    assert tasks == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}, slurm_cluster.logs_tail()
    assert run_cli(["-m", "smim_dist.data.convert_cli", "verify", str(out)]).returncode == 0
    for ours, theirs in zip(epoch_batches(out), epoch_batches(demo / "train.beton"), strict=True):
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
