"""UperNet: the pyramid's strides and BEiT's layer-wise learning rates, a fine-tuned encoder + decoder that learns a
segmentation, ``smim-eval upernet`` end to end on a tiny pre-training checkpoint (demo masks and an ADE20K tree),
resumed exactly, and refusing bad input before any compute."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smim_dist.config import ConfigError, ModelConfig
from smim_dist.eval.cli import main
from smim_dist.eval.data import ADE_CLASSES, IGNORE_INDEX, read_label_map, segmentation_splits
from smim_dist.eval.seg_metrics import confusion_matrix, segmentation_scores
from smim_dist.eval.upernet import UperNetOptions, UperNetRecipe, run_upernet, seg_loss, slide_logits, upernet_optimizer
from smim_dist.eval.upernet_data import normalise
from smim_dist.models.timm_export import create_timm_encoder
from smim_dist.models.upernet import UperNet, pyramid_blocks

from test_linear_probe import TAG


def micro_upernet(num_classes: int, seed: int = 0) -> UperNet:
    torch.manual_seed(seed)
    return UperNet(create_timm_encoder(ModelConfig(size="micro", img_size=32, patch_size=8, num_proxy=4)), num_classes)


def test_pyramid_strides_output_shape_and_layer_decay():
    assert (pyramid_blocks(12), pyramid_blocks(24), pyramid_blocks(4)) == ((4, 6, 8, 12), (8, 12, 16, 24), (1, 2, 3, 4))
    model = micro_upernet(5).train()
    pixels = torch.randn(2, 3, 32, 32)
    maps = model.encoder.forward_intermediates(pixels, indices=model.blocks, output_fmt="NCHW", intermediates_only=True)
    levels = model.neck(maps)
    assert [32 // level.shape[-1] for level in levels] == [2, 4, 8, 16]  # patch 8: strides patch/4 .. 2 * patch
    assert all(level.shape[:2] == (2, 96) for level in levels)
    logits, aux = model(pixels)
    assert logits.shape == (2, 5, 16, 16) and aux.shape == (2, 5, 4, 4)
    assert model.eval()(pixels)[1] is None

    scales = {}
    for group in upernet_optimizer(model, UperNetRecipe(layer_decay=0.5)).param_groups:
        for param in group["params"]:
            scales[param] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert scales[named["decode_head.classifier.1.weight"]] == (1.0, 0.05)
    assert scales[named["encoder.blocks.3.attn.qkv.weight"]] == (0.5, 0.05)
    assert scales[named["encoder.blocks.0.attn.qkv.bias"]] == (0.5 ** 4, 0.0)
    assert scales[named["encoder.pos_embed"]] == (0.5 ** 5, 0.0)  # BEiT: the embeddings at decay ** (depth + 1)


def quadrants(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose four quadrants are painted in the colours of four classes, in a random arrangement each."""
    colours = torch.tensor([[230, 30, 30], [30, 200, 30], [30, 30, 230], [220, 220, 40]], dtype=torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randperm(4, generator=generator).view(2, 2) for _ in range(count)])
    labels = labels.repeat_interleave(16, 1).repeat_interleave(16, 2)
    return colours[labels].permute(0, 3, 1, 2), labels.to(torch.uint8)


def test_encoder_and_decoder_learn_a_segmentation():
    images, labels = quadrants(4, seed=1)
    model = micro_upernet(4).train()
    first_weights = model.encoder.patch_embed.proj.weight.detach().clone()
    optimizer = upernet_optimizer(model, UperNetRecipe(layer_decay=1.0, weight_decay=0.0))
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    for _ in range(40):
        loss = seg_loss(model, normalise(images), labels, aux_weight=0.4)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert not torch.equal(model.encoder.patch_embed.proj.weight, first_weights)  # the encoder is fine-tuned
    model.eval()
    confusion = sum(confusion_matrix(slide_logits(model, normalise(image), 32).argmax(0), label, 4)
                    for image, label in zip(images, labels))
    assert segmentation_scores(confusion)["miou"] > 0.9


UPERNET = ["--iters", "4", "--batch-size", "4", "--crop-size", "32", "--warmup-iters", "1", "--log-every", "1",
           "--save-every", "2"]


def test_upernet_cli_on_the_demo_masks_writes_results_and_metrics(run_dir, tmp_path, capsys):
    args = ["upernet", "--checkpoint", str(run_dir), "--out", str(tmp_path), "--eval-every", "2", *UPERNET]
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    entry = results["protocols"]["upernet"]
    assert (results["tag"], entry["iters"], entry["crop_size"], entry["num_classes"]) == (TAG, 4, 32, 7)
    assert (entry["train_samples"], entry["val_samples"], entry["world_size"]) == (64, 16, 1)
    assert 0 <= entry["miou"] <= 1 and 0 <= entry["pixel_acc"] <= 1 and len(entry["per_class_iou"]) == 7
    records = [json.loads(line) for line in (tmp_path / "upernet" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["iteration"] for r in records if "miou" in r] == [2, 4] and records[-1]["miou"] == entry["miou"]
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main([*args, "--lr", "2e-4"]) == 2
    assert "holds other upernet results (lr: stored 0.0001, asked 0.0002)" in capsys.readouterr().err


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(run_dir, tmp_path):
    class Preempted(Exception):
        pass

    def preempt(message: str) -> None:
        if message.startswith("UperNet iteration 3/4"):
            raise Preempted

    options = UperNetOptions(iters=4, batch_size=4, crop_size=32, warmup_iters=1, save_every=2, log_every=1)
    whole = run_upernet(run_dir, tmp_path / "whole", options, log=lambda _: None)
    with pytest.raises(Preempted):
        run_upernet(run_dir, tmp_path / "parted", options, log=preempt)
    assert torch.load(tmp_path / "parted" / "upernet" / "state.pt", weights_only=True)["iteration"] == 2
    messages: list[str] = []
    parted = run_upernet(run_dir, tmp_path / "parted", options, log=messages.append)
    assert "UperNet resumed after iteration 2" in messages[0] and not any("iteration 1/4" in m for m in messages)
    for key in ("miou", "pixel_acc", "per_class_iou"):
        assert parted["protocols"]["upernet"][key] == whole["protocols"]["upernet"][key]
    states = [torch.load(tmp_path / name / "upernet" / "state.pt", weights_only=True)["model"]
              for name in ("whole", "parted")]
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=0, msg=name)
    metrics = (tmp_path / "parted" / "upernet" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in metrics] == [1, 2, 3, 4, 4]  # 3 once; 4: loss, then mIoU


def ade_tree(root: Path, demo: Path) -> Path:
    """An ADEChallengeData2016-layout tree from demo images, with ADE's ids: 0 "other" on the top rows, shapes 1..7."""
    manifest = json.loads((demo / "manifest.json").read_text())
    for split, folder, count in (("train", "training", 4), ("val", "validation", 2)):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for sample in manifest[split][:count]:
            stem = f"ADE_{split}_{Path(sample['image']).stem}"
            Image.open(demo / sample["image"]).convert("RGB").save(root / "images" / folder / f"{stem}.jpg")
            mask = np.array(Image.open(demo / sample["mask"])) + 1
            mask[:4] = 0
            Image.fromarray(mask).save(root / "annotations" / folder / f"{stem}.png")
    return root


def test_the_ade20k_layout_ignores_other_and_counts_from_zero(demo_data, run_dir, tmp_path):
    ade = ade_tree(tmp_path / "ADEChallengeData2016", demo_data)
    train, val, classes = segmentation_splits(ade)
    assert (classes, len(train.pairs), len(val.pairs), train.reduce_zero_label) == (ADE_CLASSES, 4, 2, True)
    mask = val.pairs[0][1]
    Image.fromarray(np.array([[0, 1, 2], [150, 0, 7]], dtype=np.uint8)).save(mask)
    assert read_label_map(val, mask).tolist() == [[IGNORE_INDEX, 0, 1], [149, IGNORE_INDEX, 6]]
    assert main(["upernet", "--checkpoint", str(run_dir), "--data", str(ade), "--out", str(tmp_path / "out"),
                 *UPERNET, "--iters", "2"]) == 0
    entry = json.loads((tmp_path / "out" / "results.json").read_text())["protocols"]["upernet"]
    assert (entry["num_classes"], entry["train_samples"], entry["val_samples"]) == (150, 4, 2)
    assert 0 <= entry["miou"] <= 1
    next(iter((ade / "annotations" / "training").glob("*.png"))).unlink()
    with pytest.raises(ConfigError, match="label maps missing"):
        segmentation_splits(ade)


def test_bad_input_is_refused_before_any_compute(run_dir, tmp_path, capsys):
    def refused(*argv: str) -> str:
        assert main(["upernet", "--checkpoint", str(run_dir), "--out", str(tmp_path / "out"), *UPERNET, *argv]) == 2
        return capsys.readouterr().err

    err = refused("--data", str(tmp_path))
    assert "neither a demo set" in err and "ADE20K" in err and "PascalVOC" in err
    assert "class id 6" in refused("--num-classes", "3")
    assert "multiple of the patch size 8" in refused("--crop-size", "36")
    assert "--batch-size 1" in refused("--batch-size", "1")
    assert "--warmup-iters 4" in refused("--warmup-iters", "4")
    assert "only override data.*" in refused("model.size=small")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="multiple of the 4 processes"):
        UperNetRecipe(batch_size=6).check(patch_size=16, world_size=4)
