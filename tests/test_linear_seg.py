"""Linear segmentation: the mIoU of a known confusion, a head that learns a segmentation its features spell out, and
``smim-eval seg`` end to end on a tiny pre-training checkpoint and the demo set's masks, resumed, and refusing bad
input before any compute."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smim_dist.eval.cli import main
from smim_dist.eval.data import IGNORE_INDEX
from smim_dist.eval.linear_seg import SegRecipe, evaluate_head, train_seg_head
from smim_dist.eval.seg_metrics import confusion_matrix, segmentation_scores

from test_linear_probe import TAG


def test_miou_of_a_known_prediction():
    labels = torch.tensor([[0, 0, 0, 0], [1, 1, IGNORE_INDEX, IGNORE_INDEX]])
    predictions = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 0]])  # the ignored pixels count for nothing
    confusion = confusion_matrix(predictions, labels, 3)
    assert confusion.tolist() == [[3, 1, 0], [0, 2, 0], [0, 0, 0]]
    scores = segmentation_scores(confusion)
    # class 0: 3 / (4 + 3 - 3); class 1: 2 / (2 + 3 - 2); class 2 occurs nowhere and is left out of the mean
    assert scores["per_class_iou"][:2] == pytest.approx([3 / 4, 2 / 3]) and scores["per_class_iou"][2] is None
    assert scores["miou"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert scores["pixel_acc"] == pytest.approx(5 / 6)


def class_maps(count: int, seed: int, classes: int = 4, grid: int = 4, dim: int = 8, scale: int = 2):
    """Feature maps whose patches carry their class (a one-hot direction on a large scale, plus noise), and label
    maps at ``scale`` pixels a patch, with some pixels ignored."""
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randint(0, classes, (count, grid, grid), generator=generator)
    directions = torch.eye(classes, dim)
    maps = 30 * directions[patches].permute(0, 3, 1, 2) + torch.randn(count, dim, grid, grid, generator=generator)
    labels = patches.repeat_interleave(scale, 1).repeat_interleave(scale, 2).to(torch.uint8)
    labels[:, 0, 0] = IGNORE_INDEX
    return maps, labels


def test_a_segmentation_the_features_spell_out_is_learned():
    (train, train_labels), (val, val_labels) = class_maps(64, seed=1), class_maps(16, seed=2)
    recipe = SegRecipe(epochs=15, batch_size=8, lr=0.1, label_size=8)
    head = train_seg_head(train, train_labels, 4, recipe, say=lambda _: None)
    scores = evaluate_head(head, val, val_labels, 4, 8, torch.device("cpu"))
    assert scores["miou"] > 0.99 and scores["pixel_acc"] > 0.99


SEG = ["--block", "2", "--epochs", "2", "--img-size", "48", "--batch-size", "8", "--encode-batch-size", "8"]
"""48 px input on a model pre-trained at 32: the position embedding is resampled"""


def test_seg_cli_on_the_demo_masks_writes_results_and_resumes(run_dir, capsys):
    assert main(["seg", "--checkpoint", str(run_dir), *SEG]) == 0
    assert "encoded after block 2" in capsys.readouterr().out
    folder = run_dir / "eval" / TAG
    results = json.loads((folder / "results.json").read_text())
    seg = results["protocols"]["seg"]
    assert (results["tag"], seg["block"], seg["epochs"], seg["img_size"], seg["label_size"]) == (TAG, 2, 2, 48, 100)
    assert (seg["num_classes"], seg["train_samples"], seg["val_samples"]) == (7, 64, 16)
    assert 0 <= seg["miou"] <= 1 and 0 <= seg["pixel_acc"] <= 1 and len(seg["per_class_iou"]) == 7
    assert all(iou is None or 0 <= iou <= 1 for iou in seg["per_class_iou"])
    metrics = [json.loads(line) for line in (folder / "seg" / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in metrics] == [1, 2]
    assert [record["lr"] for record in metrics] == pytest.approx([0.01, 0.001])  # x0.1 from 2/3 of the epochs

    assert main(["seg", "--checkpoint", str(run_dir), *SEG]) == 0
    assert "nothing to do" in capsys.readouterr().out

    (folder / "results.json").unlink()  # as if the run had stopped after its last epoch
    assert main(["seg", "--checkpoint", str(run_dir), *SEG]) == 0
    out = capsys.readouterr().out
    assert "read from" in out and "resumed after epoch 2" in out and "encoded" not in out and "epoch 1/2" not in out
    again = read_seg(folder)
    assert (again["miou"], again["per_class_iou"]) == (seg["miou"], seg["per_class_iou"])


def read_seg(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())["protocols"]["seg"]


def test_bad_input_is_refused_before_any_compute(run_dir, tmp_path, capsys):
    def refused(*argv: str) -> str:
        assert main(["seg", "--checkpoint", str(run_dir), "--out", str(tmp_path / "out"), "--block", "2", *argv]) == 2
        return capsys.readouterr().err

    err = refused("--block", "5")
    assert "--block 5" in err and "depth 4" in err
    assert "neither a demo set" in refused("--data", str(tmp_path))
    (tmp_path / "JPEGImages").mkdir()
    assert "SegmentationClass" in refused("--data", str(tmp_path))
    assert "outside 0..2" in refused("--num-classes", "3")
    assert "multiple of the patch size" in refused("--img-size", "30")
    assert not (tmp_path / "out").exists()


def voc_tree(root: Path, demo: Path) -> Path:
    """A PascalVOC-layout tree from demo images (as JPEG) and masks (mode P, with a 255 border like VOC's)."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    manifest = json.loads((demo / "manifest.json").read_text())
    for split, count in (("train", 6), ("val", 4)):
        ids = []
        for sample in manifest[split][:count]:
            id_ = f"{split}_{Path(sample['image']).stem}"
            Image.open(demo / sample["image"]).convert("RGB").save(root / "JPEGImages" / f"{id_}.jpg")
            mask = np.array(Image.open(demo / sample["mask"]))
            mask[0, :] = IGNORE_INDEX
            Image.fromarray(mask).convert("P").save(root / "SegmentationClass" / f"{id_}.png")
            ids.append(id_)
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_seg_cli_reads_a_voc_tree(run_dir, demo_data, tmp_path):
    voc = voc_tree(tmp_path / "VOC2012", demo_data)
    assert main(["seg", "--checkpoint", str(run_dir), "--data", str(voc), "--out", str(tmp_path / "out"), *SEG]) == 0
    seg = read_seg(tmp_path / "out")
    assert (seg["num_classes"], seg["train_samples"], seg["val_samples"]) == (21, 6, 4)
    assert len(seg["per_class_iou"]) == 21 and 0 <= seg["miou"] <= 1
    (voc / "JPEGImages" / f"{(voc / 'ImageSets/Segmentation/val.txt').read_text().split()[0]}.jpg").unlink()
    assert main(["seg", "--checkpoint", str(run_dir), "--data", str(voc), "--out", str(tmp_path / "x"), *SEG]) == 2
