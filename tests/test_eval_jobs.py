"""Evaluation jobs beside training outside SLURM: background processes, results per checkpoint, never submitted
twice."""

import json
import re
import time

import pytest

from conftest import losses, tiny_overrides, train_cli, wandb_offline_history
from smim_dist.config import ConfigError, load_config
from smim_dist.eval.jobs import pending_evals, submit_eval, wandb_metrics
from smim_dist.preflight import refuse_missing_files

TINY_CONFIG = "configs/demo_cpu.yaml"


def wait_for_job(folder, timeout=300):
    """The job's results once it has ended (``finished.json``), after checking that it ended well."""
    deadline = time.monotonic() + timeout
    while not (folder / "finished.json").exists():
        assert time.monotonic() < deadline, f"the evaluation job of {folder} did not end in {timeout} s"
        time.sleep(0.5)
    finished = json.loads((folder / "finished.json").read_text())
    assert finished["ok"], f"{finished}\n{(folder / 'log.txt').read_text()[-3000:]}"
    return json.loads((folder / "results.json").read_text())


@pytest.mark.e2e
def test_each_evaluated_checkpoint_gets_one_background_job_running_the_configured_protocols(tmp_path, demo_data):
    options = tmp_path / "eval_options"
    options.mkdir()
    (options / "knn.yaml").write_text("k: 5\n")
    (options / "attention.yaml").write_text("images: 4\nlayer: 1\n")
    overrides = tiny_overrides(tmp_path, demo_data, "run_name=evaluated", "checkpoint.every_epochs=1",
                               "checkpoint.keep_last=1", "eval.every_epochs=1", "eval.protocols=[knn,attention]",
                               f"eval.config_dir={options}")
    proc = train_cli(1, TINY_CONFIG, overrides)
    run = tmp_path / "evaluated"
    assert len(losses(run)) == 8, "training did not wait for the evaluations"
    assert "evaluation job(s) to end" in proc.stderr
    assert all((run / "eval" / tag / "finished.json").exists() for tag in ("step_00000004", "step_00000008")), \
        "the finished run exited before its evaluations ended (in a container they would be killed with it)"
    for tag in ("step_00000004", "step_00000008"):
        assert f"evaluation of {tag} started" in proc.stderr
        submitted = json.loads((run / "eval" / tag / "submitted.json").read_text())
        assert submitted["pid"] > 0
        results = wait_for_job(run / "eval" / tag)
        knn, attention = results["protocols"]["knn"], results["protocols"]["attention"]
        assert results["tag"] == tag and knn["k"] == 5 and (attention["images"], attention["layer"]) == (4, 1)
        for feature in ("cls", "patch"):
            assert 0 <= knn[feature]["top1"] <= knn[feature]["top5"] <= 1
        logged = wandb_offline_history(run / "eval" / tag)
        assert [row["eval/knn_cls_top1"] for row in logged] == [knn["cls"]["top1"]], "scores in the offline wandb run"
    assert pending_evals(run, ("knn", "attention")) == set()
    assert pending_evals(run, ("knn", "linear")) == {"step_00000004", "step_00000008"}
    cfg = load_config(TINY_CONFIG, overrides)
    again = submit_eval(cfg, "step_00000004", eval_slurm=None)
    assert "was started before" in again.line and "not started again" in again.line and again.process is None


@pytest.mark.e2e
def test_an_evaluation_that_cannot_start_never_stops_training(tmp_path, demo_data):
    overrides = tiny_overrides(tmp_path, demo_data, "run_name=unlucky", "optim.epochs=1", "eval.every_epochs=1",
                               "checkpoint.every_epochs=1")
    cfg = load_config(TINY_CONFIG, overrides)
    (cfg.run_dir / "eval").mkdir(parents=True)
    (cfg.run_dir / "eval" / "step_00000004").write_text("a file where the evaluation folder should be")
    proc = train_cli(1, TINY_CONFIG, overrides)
    assert "evaluation of step_00000004 could not be started" in proc.stderr and "training goes on" in proc.stderr
    assert (cfg.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_scores_reach_wandb_under_flat_names():
    results = {"protocols": {"knn": {"k": 20, "cls": {"top1": 0.5, "top5": 0.9}, "patch": {"top1": 0.4}},
                             "seg": {"block": 6, "miou": 0.3, "pixel_acc": 0.8, "per_class_iou": [0.1, None]},
                             "attention": {"layer": 3, "mean_distance_px": [1.0, 2.0]}}}
    assert wandb_metrics(results) == {"eval/knn_cls_top1": 0.5, "eval/knn_cls_top5": 0.9, "eval/knn_patch_top1": 0.4,
                                      "eval/seg_miou": 0.3, "eval/seg_pixel_acc": 0.8}


def test_eval_protocols_are_checked_when_the_config_loads(tmp_path):
    for value, expected in (("[knn,finetune]", "eval.protocols=['knn', 'finetune']"),
                            ("[knn,knn]", "list each once"), ("[]", "list each once")):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_config(TINY_CONFIG, [f"eval.protocols={value}"])
    with pytest.raises(ConfigError, match="eval.config_dir=.*no such folder"):
        refuse_missing_files(load_config(TINY_CONFIG, [f"eval.config_dir={tmp_path / 'missing'}"]))
