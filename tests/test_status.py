"""``smim-status``: a run's state from its directory alone: the tiny run (finished, evaluated, copied out of the place
that trained it), a run another process is training, damaged checkpoints, an output directory of runs, the plot and
bad input. The SLURM job's state, requeues and evaluation jobs: tests/slurm/test_journeys.py."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from smim_dist.eval.cli import main as smim_eval
from smim_dist.status_cli import main

from conftest import REPO

TAG = "step_00000004"


@pytest.fixture(scope="module")
def evaluated(run_dir):
    """The tiny run with its kNN scores, and a second checkpoint's evaluation whose local job died unfinished."""
    assert smim_eval(["knn", "--checkpoint", str(run_dir), "--batch-size", "8"]) == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stopped = run_dir / "eval" / "step_00000002"
    stopped.mkdir(parents=True)
    (stopped / "submitted.json").write_text(json.dumps({"tag": stopped.name, "pid": int(dead.stdout),
                                                        "log": str(stopped / "log.txt")}))
    return run_dir


def status_json(path, capsys) -> dict:
    assert main([str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_finished_run_with_its_progress_checkpoint_and_scores(evaluated, capsys):
    status = status_json(evaluated, capsys)
    assert (status["state"], status["where"], status["step"], status["total_steps"]) == ("finished", "no process", 4, 4)
    assert status["epochs"] == 1 and status["eta_s"] is None
    rows = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    assert status["last"]["loss"] == rows[-1]["loss"] and status["last"]["image_blind_loss"] > 0
    assert status["checkpoint"] == TAG and status["checkpoints"][TAG] > 0 and status["damaged"] == []
    knn = json.loads((evaluated / "eval" / TAG / "results.json").read_text())["protocols"]["knn"]
    by_tag = {entry["tag"]: entry for entry in status["evaluations"]}
    assert by_tag[TAG]["state"] == "done" and by_tag[TAG]["scores"]["knn_cls_top1"] == knn["cls"]["top1"]
    assert by_tag["step_00000002"]["state"] == "stopped", "its process is gone and it wrote no results"
    assert by_tag["step_00000002"]["log"].endswith("eval/step_00000002/log.txt")

    assert main([str(evaluated)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{evaluated}: finished (no process)")
    assert "step 4 of 4, epoch 1.00 of 1" in text and f"newest valid {TAG}" in text
    assert f"{knn['cls']['top1']:.4f}" in text and "knn_cls_top1" in text


def test_a_copied_run_reads_the_same(evaluated, tmp_path, capsys):
    copy = tmp_path / "laptop" / "tiny"
    shutil.copytree(evaluated, copy)
    original, copied = status_json(evaluated, capsys), status_json(copy, capsys)
    for key in ("state", "step", "total_steps", "last", "checkpoint", "checkpoints"):
        assert copied[key] == original[key], key


def test_a_run_another_process_trains_is_running(evaluated, tmp_path, capsys):
    run = tmp_path / "live"
    shutil.copytree(evaluated, run)
    (run / "train.lock").unlink()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from smim_dist.engine.run_lock import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        now = time.time()
        rows = [{**row, "time": now - 4 + row["step"], "epoch": row["step"] / 8} for row in rows]  # 1 s a step
        (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        status = status_json(run, capsys)
        assert status["state"] == "running" and status["where"].startswith(f"pid {holder.pid} on ")
        assert status["total_steps"] == 8 and status["eta_s"] == pytest.approx(4.0)
    finally:
        holder.kill()
        holder.wait()
    assert status_json(run, capsys)["state"] == "stopped", "its holder is gone, half-way: the same command resumes it"


def test_a_damaged_checkpoint_is_named_and_passed_over(evaluated, tmp_path, capsys):
    run = tmp_path / "damaged"
    shutil.copytree(evaluated, run)
    model = next((run / "checkpoints" / TAG).glob("*model_states.pt"))
    model.write_bytes(model.read_bytes()[:100])
    status = status_json(run, capsys)
    assert status["checkpoint"] is None and len(status["damaged"]) == 1 and model.name in status["damaged"][0]
    assert main([str(run)]) == 0
    assert "newest valid none" in capsys.readouterr().out


def test_an_output_directory_gets_one_line_per_run(evaluated, tmp_path, capsys):
    for name in ("first", "second"):
        shutil.copytree(evaluated, tmp_path / name)
    (tmp_path / "not_a_run").mkdir()
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [["first", "finished", "step"], ["second", "finished", "step"]]
    assert "evaluations 1 stopped, 1 done" in lines[0]
    listed = status_json(tmp_path, capsys)
    assert [Path(entry["run_dir"]).name for entry in listed] == ["first", "second"]


def test_the_plot_draws_the_run(evaluated, tmp_path, capsys):
    out = tmp_path / "figures" / "tiny.png"
    assert main([str(evaluated), "--plot", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1200, 800)
        assert len(image.convert("L").getcolors(256)) > 20, "curves, not a blank canvas"


@pytest.mark.parametrize("args, message", [
    (["{empty}"], "is neither a run directory"),
    (["{run}", "--plot", "{tmp}/figure.jpg"], "name it .png"),
    (["{parent}", "--plot", "{tmp}/figure.png"], "--plot draws one run"),
])
def test_bad_input_is_refused(evaluated, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    values = {"empty": tmp_path / "empty", "run": evaluated, "parent": evaluated.parent, "tmp": tmp_path}
    with pytest.raises(SystemExit) as exit_:
        main([arg.format(**values) for arg in args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob("figure.*"))
