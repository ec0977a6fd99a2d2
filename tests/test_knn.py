"""kNN evaluation: the weighted-vote classifier itself, ``smim-eval knn`` end to end on a tiny pre-training
checkpoint (one process and two), and refusal of bad input before any compute."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from smim_dist.config import load_config
from smim_dist.eval.cli import main
from smim_dist.eval.data import centre_crop_loader, eval_splits
from smim_dist.eval.knn import knn_accuracy, knn_scores

from conftest import REPO, run_cli, tiny_overrides

TAG = "step_00000004"
"""one epoch of the tiny config: 64 images / global batch 16"""


def test_separable_features_are_classified_perfectly():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=generator) * 3

    def sample(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(6).repeat_interleave(per_class)
        return centres[labels] + 0.3 * torch.randn(len(labels), 16, generator=generator), labels

    (train, train_labels), (val, val_labels) = sample(30), sample(10)
    assert knn_accuracy(train, train_labels, val, val_labels) == {"top1": 1.0, "top5": 1.0}


def test_random_labels_give_chance():
    generator = torch.Generator().manual_seed(1)
    train, val = torch.randn(3000, 32, generator=generator), torch.randn(2000, 32, generator=generator)
    train_labels, val_labels = torch.randint(0, 10, (3000,), generator=generator), torch.randint(0, 10, (2000,),
                                                                                                 generator=generator)
    result = knn_accuracy(train, train_labels, val, val_labels, k=20)
    assert abs(result["top1"] - 0.1) < 0.03 and abs(result["top5"] - 0.5) < 0.05
    assert "top5" not in knn_accuracy(train, train_labels % 4, val, val_labels % 4)


def test_votes_are_weighted_by_similarity_and_chunking_changes_nothing():
    """One neighbour at similarity 1 (class 0) against two at cos 0.6 (class 1): a sharp temperature trusts the
    closest, a flat one counts heads."""
    train = torch.tensor([[1.0, 0.0], [math.cos(0.6), math.sin(0.6)], [math.cos(0.6), -math.sin(0.6)]])
    labels, query = torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]])
    assert knn_scores(train, labels, query, k=3, temperature=0.07, num_classes=2).argmax().item() == 0
    assert knn_scores(train, labels, query, k=3, temperature=10.0, num_classes=2).argmax().item() == 1

    generator = torch.Generator().manual_seed(2)
    bank = torch.nn.functional.normalize(torch.randn(500, 8, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=1)
    bank_labels = torch.randint(0, 7, (500,), generator=generator)
    whole = knn_scores(bank, bank_labels, queries, 20, 0.07, 7)
    chunked = knn_scores(bank, bank_labels, queries, 20, 0.07, 7, max_elements=500 * 7)
    torch.testing.assert_close(chunked, whole)


def test_image_tree_and_beton_give_the_same_centre_crops(tmp_path, demo_data):
    """The image-file loader is the FFCV decoder's twin: same samples in the same order, nearly the same pixels."""
    splits = {}
    for source in ("imagefolder", "ffcv"):
        cfg = load_config(REPO / "configs/demo_cpu.yaml", tiny_overrides(tmp_path, demo_data, f"data.source={source}"))
        splits[source] = eval_splits(cfg)[1]
    images = {}
    for source, split in splits.items():
        images[source] = torch.zeros(split.num_samples, 3, 32, 32)
        for batch, indices in centre_crop_loader(split, 32, batch_size=5, num_workers=0, rank=1, world_size=2):
            images[source][indices] = batch.float()
    assert (splits["ffcv"].labels == splits["imagefolder"].labels).all()
    shared = images["ffcv"][1::2]
    assert shared.mean() > 20 and (shared - images["imagefolder"][1::2]).abs().mean() < 4
    assert images["ffcv"][0::2].abs().sum() == 0 == images["imagefolder"][0::2].abs().sum()


@pytest.fixture(scope="module")
def first_eval(run_dir) -> Path:
    """``smim-eval knn`` on the run directory, in this process; batches of 8 so FFCV reuses its buffers."""
    assert main(["knn", "--checkpoint", str(run_dir), "--batch-size", "8"]) == 0
    return run_dir / "eval" / TAG / "results.json"


def test_knn_cli_writes_results_once(run_dir, first_eval, capsys):
    stored = json.loads(first_eval.read_text())
    assert (stored["tag"], stored["step"], list(stored["protocols"])) == (TAG, 4, ["knn"])
    results = stored["protocols"]["knn"]
    assert (results["k"], results["temperature"]) == (20, 0.07)
    assert (results["train_samples"], results["val_samples"]) == (64, 16)
    for kind in ("cls", "patch"):
        assert set(results[kind]) == {"top1", "top5"} and all(0 <= v <= 1 for v in results[kind].values())
        assert results[kind]["top1"] <= results[kind]["top5"]

    written = first_eval.stat().st_mtime_ns
    assert main(["knn", "--checkpoint", str(run_dir / "checkpoints" / TAG), "--feature", "cls"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert first_eval.stat().st_mtime_ns == written


@pytest.mark.e2e
def test_two_processes_give_the_one_process_results(run_dir, first_eval, tmp_path):
    run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "smim_dist.eval.cli",
             "knn", "--checkpoint", str(run_dir), "--batch-size", "3", "--out", str(tmp_path)])
    one, two = (json.loads(path.read_text())["protocols"]["knn"] for path in (first_eval, tmp_path / "results.json"))
    assert (two["cls"], two["patch"], two["train_samples"]) == (one["cls"], one["patch"], one["train_samples"])


def _refused(capsys, *argv: str) -> str:
    assert main(["knn", *argv]) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_any_compute(run_dir, tmp_path, capsys):
    assert "is not a smim_dist checkpoint" in _refused(capsys, "--checkpoint", str(tmp_path))
    assert "--k 0" in _refused(capsys, "--checkpoint", str(run_dir), "--k", "0")
    assert "--temperature -1.0" in _refused(capsys, "--checkpoint", str(run_dir), "--temperature", "-1")
    assert "--k 65" in _refused(capsys, "--checkpoint", str(run_dir), "--k", "65", "--out", str(tmp_path))
    assert "'model.size=base'" in _refused(capsys, "--checkpoint", str(run_dir), "model.size=base")

    unlabelled = tmp_path / "no_val"
    (unlabelled / "train" / "circle").mkdir(parents=True)
    Image.new("RGB", (48, 48)).save(unlabelled / "train" / "circle" / "0.png")
    err = _refused(capsys, "--checkpoint", str(run_dir), "--out", str(tmp_path), "data.demo=false",
                   "data.source=imagefolder", f"data.path={unlabelled}")
    assert str(unlabelled / "val") in err
    assert not (tmp_path / "results.json").exists()
