"""A new user's first hour, from a clean checkout, with the shipped defaults (wandb offline, the progress bar, the
demo config as shipped): the quick start's demo command, then a run with evaluation jobs beside it whose jobs end
well with their scores in the offline wandb run. Sizes are shrunk through overrides, nothing is switched off."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, wandb_offline_groups, wandb_offline_history

pytestmark = pytest.mark.e2e  # subprocesses: the end-to-end tier (pytest --full)

DEMO_COMMAND = "bash launchers/quickstart.sh demo"
"""the README's quick-start command (tests/test_docs.py checks that it is)"""
SHRUNK = ["data.demo_images=128", "optim.epochs=2", "optim.global_batch=32", "optim.micro_batch=32"]


def clean_checkout(folder: Path) -> Path:
    """The files of this checkout that git knows (committed or not, ignored ones left out), with its installed
    environment: a clone whose setup has run. An environment installed for other requirements would be reinstalled
    by the quick start from the copy, pointing this checkout's editable install at a folder about to be deleted."""
    requirements = (REPO / "pyproject.toml").read_bytes() + (REPO / "constraints.txt").read_bytes()
    stamp = REPO / ".venv" / f".installed-{hashlib.sha256(requirements).hexdigest()[:16]}"
    assert stamp.exists(), "the environment is older than pyproject.toml: run `bash launchers/quickstart.sh test` first"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes((REPO / name).read_bytes())
    (folder / ".venv").symlink_to(REPO / ".venv")
    return folder


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_the_demo_then_a_run_with_evaluation_jobs_from_a_clean_checkout(tmp_path):
    checkout = clean_checkout(tmp_path / "checkout")
    demo = run(f"{DEMO_COMMAND} {' '.join(SHRUNK)}", checkout)
    assert "building the demo data set in data_cache/demo" in demo.stderr and "built the demo data set" in demo.stderr
    run_dir = checkout / "runs" / "demo_cpu"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert [row["_step"] for row in wandb_offline_history(run_dir) if "loss" in row] == [8]
    assert "\r" not in demo.stderr, "no progress-bar fragments when the output is not a terminal"
    assert "step 8/8 ep 2.00 " in demo.stderr, "the log line carries the progress instead"
    again = run(f"{DEMO_COMMAND} {' '.join(SHRUNK)}", checkout)
    assert "already finished its 2 epochs; nothing to do" in again.stderr
    status = run(".venv/bin/smim-status runs/demo_cpu --plot demo.png", checkout)
    assert status.stdout.startswith("runs/demo_cpu: finished (no process)") and "step 8 of 8" in status.stdout
    assert (checkout / "demo.png").read_bytes().startswith(b"\x89PNG")

    evaluated = run(".venv/bin/smim-train --config configs/demo_cpu.yaml run_name=demo_eval eval.every_epochs=1 "
                    f"checkpoint.every_epochs=1 {' '.join(SHRUNK)}", checkout)
    for tag in ("step_00000004", "step_00000008"):
        assert f"evaluation of {tag} started" in evaluated.stderr
        folder = checkout / "runs" / "demo_eval" / "eval" / tag
        deadline = time.monotonic() + 300
        while not (folder / "finished.json").exists():
            assert time.monotonic() < deadline, f"the evaluation of {tag} did not end in 300 s"
            time.sleep(1)
        assert json.loads((folder / "finished.json").read_text())["ok"], (folder / "log.txt").read_text()[-3000:]
        knn = json.loads((folder / "results.json").read_text())["protocols"]["knn"]
        assert [row["eval/knn_cls_top1"] for row in wandb_offline_history(folder)] == [knn["cls"]["top1"]]
        assert wandb_offline_groups(folder) == wandb_offline_groups(folder.parent.parent) == {"demo_eval"}
    listed = run(".venv/bin/smim-status runs", checkout).stdout.splitlines()
    assert [line.split()[:2] for line in listed] == [["demo_cpu", "finished"], ["demo_eval", "finished"]]
    assert "evaluations 2 done" in listed[1]
