"""Evaluation jobs beside training outside SLURM: background processes, results per checkpoint, never submitted twice."""

import json
import time

from conftest import losses, tiny_overrides, train_cli
from smim_dist.config import load_config
from smim_dist.eval.jobs import pending_evals, submit_eval

TINY_CONFIG = "configs/demo_cpu.yaml"


def wait_for(path, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.5)
    return json.loads(path.read_text())


def test_each_evaluated_checkpoint_gets_one_background_knn_job(tmp_path, demo_data):
    overrides = tiny_overrides(tmp_path, demo_data, "run_name=evaluated", "checkpoint.every_epochs=1",
                               "checkpoint.keep_last=1", "eval.every_epochs=1", "log.wandb_mode=offline")
    proc = train_cli(1, TINY_CONFIG, overrides)
    run = tmp_path / "evaluated"
    assert len(losses(run)) == 8, "training did not wait for the evaluations"
    for tag in ("step_00000004", "step_00000008"):
        assert f"evaluation of {tag} started" in proc.stderr
        submitted = json.loads((run / "eval" / tag / "submitted.json").read_text())
        assert submitted["pid"] > 0
        results = wait_for(run / "eval" / tag / "results.json")
        knn = results["protocols"]["knn"]
        assert results["tag"] == tag and knn["k"] == 20
        for feature in ("cls", "patch"):
            assert 0 <= knn[feature]["top1"] <= knn[feature]["top5"] <= 1
    assert list((run / "eval" / "step_00000004" / "wandb").glob("offline-run-*")), "results logged to wandb"
    assert pending_evals(run) == set()
    cfg = load_config(TINY_CONFIG, overrides)
    again = submit_eval(cfg, "step_00000004", eval_slurm=None)
    assert "was submitted before" in again and "not submitted again" in again


def test_an_evaluation_that_cannot_start_never_stops_training(tmp_path, demo_data):
    overrides = tiny_overrides(tmp_path, demo_data, "run_name=unlucky", "optim.epochs=1", "eval.every_epochs=1",
                               "checkpoint.every_epochs=1")
    cfg = load_config(TINY_CONFIG, overrides)
    (cfg.run_dir / "eval").mkdir(parents=True)
    (cfg.run_dir / "eval" / "step_00000004").write_text("a file where the evaluation folder should be")
    proc = train_cli(1, TINY_CONFIG, overrides)
    assert "evaluation of step_00000004 could not be started" in proc.stderr and "training goes on" in proc.stderr
    assert (cfg.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
