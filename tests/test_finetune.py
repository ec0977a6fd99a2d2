"""Fine-tuning: timm's layer-wise lr decay groups as BEiT / MAE scale them, RandAugment's strongest posterize,
``smim-eval finetune`` end to end on a tiny pre-training checkpoint beside another protocol's entry, a run stopped
after an epoch that resumes to the very same weights, bad input refused before any compute, and a 2-process torchrun
run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import smim_dist.eval.finetune as finetune
from smim_dist.config import ModelConfig
from smim_dist.eval.cli import main
from smim_dist.eval.finetune import FinetuneRecipe, finetune_model, finetune_optimizer
from smim_dist.eval.finetune_data import train_transform
from smim_dist.eval.results import merge_results, read_results
from smim_dist.models.timm_export import create_timm_encoder

from conftest import run_cli
from test_linear_probe import TAG

FT = ["--epochs", "2", "--warmup-epochs", "1", "--batch-size", "16"]
"""64 demo images at 32 px: 4 steps an epoch"""


def test_layer_decay_scales_each_block_by_its_distance_from_the_head():
    cfg = ModelConfig(size="micro", img_size=32, patch_size=8, num_proxy=4)
    model = finetune_model(cfg, create_timm_encoder(cfg).state_dict(), 6, FinetuneRecipe(layer_decay=0.5))
    optimizer = finetune_optimizer(model, FinetuneRecipe(layer_decay=0.5))
    scale = {name: group["lr_scale"] for group in optimizer.param_groups for name, param in model.named_parameters()
             if any(param is member for member in group["params"])}
    depth = 4
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    for block in range(depth):
        assert scale[f"blocks.{block}.attn.qkv.weight"] == 0.5 ** (depth - block)  # the deepest block: decay ** 1
    for name in ("patch_embed.proj.weight", "pos_embed", "cls_token", "reg_token"):
        assert scale[name] == 0.5 ** (depth + 1)
    decay = {name: group["weight_decay"] for group in optimizer.param_groups for name, param in
             model.named_parameters() if any(param is member for member in group["params"])}
    assert decay["blocks.0.attn.qkv.weight"] == 0.05 and decay["blocks.0.attn.qkv.bias"] == decay["pos_embed"] == 0


def test_randaugment_strongest_posterize_blacks_out_instead_of_failing():
    transform = train_transform(32, FinetuneRecipe.auto_augment, 0.0)
    op = next(op for step in transform.transforms for op in getattr(step, "ops", ()) if op.name.startswith("Posterize"))
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # keeps 0 bits, which Pillow 13 refuses
    assert np.asarray(op(Image.fromarray(np.full((8, 8, 3), 200, np.uint8)))).max() == 0


class Preempted(Exception):
    pass


def test_finetune_cli_writes_results_and_resumes_exactly(run_dir, tmp_path, monkeypatch, capsys):
    folder = run_dir / "eval" / TAG
    merge_results(folder, {"checkpoint": str(run_dir), "tag": TAG, "step": 4}, "other", {"top1": 0.5})
    assert main(["finetune", "--checkpoint", str(run_dir), *FT]) == 0
    assert "fine-tuning epoch 2/2" in capsys.readouterr().out
    results = read_results(folder)
    assert (results["tag"], results["step"], results["protocols"]["other"]) == (TAG, 4, {"top1": 0.5})
    entry = results["protocols"]["finetune"]
    assert (entry["epochs"], entry["batch_size"], entry["lr"], entry["layer_decay"]) == (2, 16, 5e-4 * 16 / 256, 0.65)
    assert (entry["num_classes"], entry["train_samples"], entry["val_samples"], entry["world_size"]) == (6, 64, 16, 1)
    assert 0 <= entry["top1"] <= entry["top5"] <= 1
    whole = torch.load(folder / "finetune" / "state.pt", weights_only=True)
    metrics = [json.loads(line) for line in (folder / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [(record["epoch"], record["step"]) for record in metrics] == [(1, 4), (2, 8)]
    assert (metrics[-1]["top1"], metrics[-1]["top5"]) == (entry["top1"], entry["top5"])
    for group in whole["optimizer"]["param_groups"]:  # the scheduled lr, times the group's layer scale
        assert group["lr"] == pytest.approx(metrics[-1]["lr"] * group["lr_scale"])

    assert main(["finetune", "--checkpoint", str(run_dir), *FT]) == 0
    assert "nothing to do" in capsys.readouterr().out

    save = finetune.save_progress

    def save_then_stop(*args):
        save(*args)
        raise Preempted

    monkeypatch.setattr(finetune, "save_progress", save_then_stop)
    with pytest.raises(Preempted):
        main(["finetune", "--checkpoint", str(run_dir), "--out", str(tmp_path), *FT])
    assert torch.load(tmp_path / "finetune" / "state.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    assert main(["finetune", "--checkpoint", str(run_dir), "--out", str(tmp_path), *FT]) == 0
    out = capsys.readouterr().out
    assert "resumed after epoch 1" in out and "epoch 1/2" not in out
    resumed = torch.load(tmp_path / "finetune" / "state.pt", weights_only=True)
    assert whole["model"].keys() == resumed["model"].keys()
    for name, value in whole["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    assert ([{key: value for key, value in record.items() if key != "seconds"} for record in resumed["history"]]
            == [{key: value for key, value in record.items() if key != "seconds"} for record in whole["history"]])
    assert read_results(tmp_path)["protocols"]["finetune"]["top1"] == entry["top1"]

    assert main(["finetune", "--checkpoint", str(run_dir), *FT, "--epochs", "3"]) == 2
    assert "holds other finetune results (epochs: stored 2, asked 3)" in capsys.readouterr().err


def test_bad_input_is_refused_before_any_compute(run_dir, demo_data, tmp_path, capsys):
    def refused(*argv: str) -> str:
        assert main(["finetune", "--checkpoint", str(run_dir), "--out", str(tmp_path / "out"), *FT, *argv]) == 2
        return capsys.readouterr().err

    assert "--num-classes 5" in refused("--num-classes", "5")
    assert "multiple of 3" in refused("--accum-steps", "3")
    assert "must be even" in refused("--batch-size", "10", "--accum-steps", "2")
    assert "an epoch would have no step" in refused("--batch-size", "128")
    assert "--epochs 0" in refused("--epochs", "0")
    assert "positive peak learning rate" in refused("--lr", "-1")
    assert "--layer-decay 1.5" in refused("--layer-decay", "1.5")
    assert "--auto-augment 'bogus'" in refused("--auto-augment", "bogus")
    assert "reads ImageFolder trees" in refused("data.demo=false", "data.source=ffcv",
                                                f"data.path={demo_data / 'train.beton'}")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_torchrun_two_ranks_fine_tune_together(run_dir, tmp_path):
    proc = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "smim_dist.eval.cli",
                    "finetune", "--checkpoint", str(run_dir), "--out", str(tmp_path), *FT, "--accum-steps", "2"])
    assert proc.stdout.count("fine-tuning epoch 2/2") == 1  # rank 0 speaks
    entry = read_results(tmp_path)["protocols"]["finetune"]
    assert entry["world_size"] == 2 and 0 <= entry["top1"] <= entry["top5"] <= 1
