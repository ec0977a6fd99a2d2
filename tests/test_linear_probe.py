"""Linear probe: the heads learn what is there and nothing that is not, training resumes exactly, ``smim-eval linear``
end to end on a tiny pre-training checkpoint beside kNN in one results file, and the shared file under racing
writers."""

import json
import multiprocessing
from copy import deepcopy
from pathlib import Path

import pytest
import torch

from smim_dist.config import ConfigError
from smim_dist.eval.cli import main
from smim_dist.eval.linear_probe import ProbeRecipe, head_accuracy, train_heads
from smim_dist.eval.results import merge_results, read_results


TAG = "step_00000004"
"""one epoch of the tiny config: 64 images / global batch 16"""


def clusters(per_class: int, seed: int, classes: int = 6, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian clusters, with features on a scale BatchNorm has to undo."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return 50 * (centres[labels] + 0.3 * noise), labels


def test_separable_features_are_learned_perfectly():
    (train, train_labels), (val, val_labels) = clusters(40, seed=1), clusters(10, seed=2)
    recipe = ProbeRecipe(epochs=10, warmup_epochs=1, batch_size=32)
    heads = train_heads({"cls": train}, train_labels, 6, recipe, say=lambda _: None)
    assert head_accuracy(heads, {"cls": val}, val_labels) == {"cls": {"top1": 1.0, "top5": 1.0}}


def test_random_labels_stay_near_chance():
    generator = torch.Generator().manual_seed(3)
    train, val = torch.randn(2000, 32, generator=generator), torch.randn(2000, 32, generator=generator)
    train_labels = torch.randint(0, 10, (2000,), generator=generator)
    val_labels = torch.randint(0, 10, (2000,), generator=generator)
    heads = train_heads({"patch": train}, train_labels, 10, ProbeRecipe(epochs=5, warmup_epochs=1, batch_size=64),
                        say=lambda _: None)
    result = head_accuracy(heads, {"patch": val}, val_labels)["patch"]
    assert abs(result["top1"] - 0.1) < 0.03 and abs(result["top5"] - 0.5) < 0.05


def test_a_resumed_probe_ends_where_an_uninterrupted_one_does():
    (train, labels), recipe = clusters(20, seed=4), ProbeRecipe(epochs=4, warmup_epochs=1, batch_size=16)
    saved: list[dict] = []  # copies, as torch.save takes them: state_dict() tensors are the live ones
    whole = train_heads({"cls": train}, labels, 6, recipe, seed=7, save=lambda state: saved.append(deepcopy(state)),
                        say=lambda _: None)
    assert [state["epoch"] for state in saved] == [1, 2, 3, 4]
    resumed = train_heads({"cls": train}, labels, 6, recipe, seed=7, resume=saved[1], say=lambda _: None)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def _merge_many(folder: Path, writer: int) -> None:
    for round_ in range(25):
        merge_results(folder, {"checkpoint": "/c", "tag": TAG, "step": 4}, f"p{writer}-{round_}", {"round": round_})


@pytest.mark.e2e
def test_racing_protocols_keep_each_others_entries(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_merge_many, args=(tmp_path, i)) for i in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert [writer.exitcode for writer in writers] == [0] * 4
    assert read_results(tmp_path)["protocols"] == {f"p{i}-{r}": {"round": r} for i in range(4) for r in range(25)}


def test_a_results_file_of_another_layout_is_refused_not_overwritten(tmp_path):
    flat = json.dumps({"protocol": "knn", "tag": TAG, "step": 4, "checkpoint": "/c", "k": 20, "cls": {"top1": 0.5}})
    (tmp_path / "results.json").write_text(flat)
    with pytest.raises(ConfigError, match="not a smim-eval results file"):
        read_results(tmp_path)
    assert (tmp_path / "results.json").read_text() == flat


PROBE = ["--block", "2", "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "16", "--encode-batch-size", "8"]


def test_linear_cli_joins_knn_in_results_and_resumes(run_dir, capsys):
    assert main(["knn", "--checkpoint", str(run_dir), "--batch-size", "8"]) == 0
    folder = run_dir / "eval" / TAG
    knn = read_results(folder)["protocols"]["knn"]
    capsys.readouterr()
    assert main(["linear", "--checkpoint", str(run_dir), *PROBE]) == 0
    out = capsys.readouterr().out
    assert "linear probe epoch 3/3" in out and "encoded after block 2" in out
    results = json.loads((folder / "results.json").read_text())
    assert (results["tag"], results["step"], results["protocols"]["knn"]) == (TAG, 4, knn)
    linear = results["protocols"]["linear"]
    assert (linear["block"], linear["epochs"], linear["lr"]) == (2, 3, 0.1 * 16 / 256)
    assert (linear["train_samples"], linear["val_samples"]) == (64, 16)
    for kind in ("cls", "patch"):
        assert set(linear[kind]) == {"top1", "top5"} and 0 <= linear[kind]["top1"] <= linear[kind]["top5"] <= 1
    metrics = [json.loads(line) for line in (folder / "linear" / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in metrics] == [1, 2, 3]
    assert all(record["train_loss_cls"] > 0 and record["train_loss_patch"] > 0 for record in metrics)

    written = (folder / "results.json").stat().st_mtime_ns
    assert main(["linear", "--checkpoint", str(run_dir), *PROBE]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (folder / "results.json").stat().st_mtime_ns == written

    (folder / "results.json").unlink()  # as if the probe had stopped after its last epoch
    assert main(["linear", "--checkpoint", str(run_dir), *PROBE]) == 0
    out = capsys.readouterr().out
    assert "read from" in out and "resumed after epoch 3" in out and "encoded" not in out and "epoch 1/3" not in out
    again = read_results(folder)["protocols"]["linear"]
    assert (again["cls"], again["patch"]) == (linear["cls"], linear["patch"])

    assert main(["linear", "--checkpoint", str(run_dir), *PROBE, "--epochs", "4"]) == 2
    assert "holds other linear results (epochs: stored 3, asked 4)" in capsys.readouterr().err


def test_bad_input_is_refused_before_any_compute(run_dir, tmp_path, capsys):
    def refused(*argv: str) -> str:
        assert main(["linear", "--checkpoint", str(run_dir), "--out", str(tmp_path), *argv]) == 2
        return capsys.readouterr().err

    err = refused("--block", "5")
    assert "--block 5" in err and "depth 4" in err
    assert "--block 0" in refused("--block", "0")
    assert "--warmup-epochs 3" in refused("--epochs", "3", "--warmup-epochs", "3")
    assert "--lr -0.1" in refused("--lr", "-0.1")
    assert not any(tmp_path.iterdir())
