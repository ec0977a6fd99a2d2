"""Stopping on SIGTERM / SIGUSR2 at a step boundary with a checkpoint, and what a restart finds in the run directory."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, engine_overrides, losses, train_cli, train_in_a_fresh_process

pytestmark = pytest.mark.e2e  # subprocesses: the end-to-end tier (pytest --full)

TINY_CONFIG = "configs/demo_cpu.yaml"


def final_weights(run_dir):
    checkpoints = run_dir / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    states = checkpoints / tag / "mp_rank_00_model_states.pt"
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


def train_in_a_process(overrides):
    """The legs whose final weights are compared bit for bit each run in a process of their own: a pytest worker's
    earlier in-process runs once left the in-process leg's last bits different (CI, 2026-12-06)."""
    return train_in_a_fresh_process(overrides, TINY_CONFIG)


def start_training(overrides):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "smim_dist.train", "--config", TINY_CONFIG, *overrides], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir, step, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_ends_identical(tmp_path, demo_data):
    """SIGTERM is what torchrun, Kubernetes and SLURM's scancel send; SIGUSR2 takes the same path (tests/slurm)."""
    sig = signal.SIGTERM
    common = ["optim.epochs=6", "checkpoint.every_epochs=6"]
    train_in_a_process(engine_overrides(tmp_path, demo_data, "run_name=straight", *common))
    overrides = engine_overrides(tmp_path, demo_data, "run_name=signalled", *common)
    run = tmp_path / "signalled"
    process = start_training(overrides)
    wait_for_step(run, 3, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, stderr[-3000:]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.removeprefix("step_"))
    assert 3 <= stopped_at < 24, "stopped mid-run, after the step it had logged"
    assert f"stopped at step {stopped_at} on request" in stderr
    resumed = train_in_a_process(overrides)
    assert f"resumed from {tag}" in resumed.stderr
    assert losses(run) == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    straight, again = final_weights(tmp_path / "straight"), final_weights(run)
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[key], again[key]) for key in straight), "bit-identical final weights"


def test_steps_trained_again_after_a_kill_are_recorded_once(tmp_path, demo_data):
    """SIGKILL at step 6 or later, the checkpoint at step 4: the resumed run trains steps 5-6 again, and
    metrics.jsonl (like anything that reads it) has each step once, with the uninterrupted run's values."""
    common = ["optim.epochs=3", "checkpoint.every_epochs=1"]
    train_in_a_process(engine_overrides(tmp_path, demo_data, "run_name=straight", *common))
    overrides = engine_overrides(tmp_path, demo_data, "run_name=killed", *common)
    run = tmp_path / "killed"
    process = start_training(overrides)
    wait_for_step(run, 6, process)
    process.kill()
    process.communicate()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    logged = len((run / "metrics.jsonl").read_text().splitlines())
    assert int(latest.removeprefix("step_")) < logged, "the kill came after steps the checkpoint does not hold"
    train_in_a_process(overrides)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert losses(run) == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    straight, again = final_weights(tmp_path / "straight"), final_weights(run)
    assert all(torch.equal(straight[key], again[key]) for key in straight), "bit-identical final weights"


def files_and_times(run):
    """Every file of the run with its modification time; train.lock is left out because each training
    records itself in it while holding the run (docs/checkpoints.md), and folders because the writability
    probe adds and removes a file in checkpoints/."""
    return sorted((p, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file() and p.name != "train.lock")


def test_only_damaged_checkpoints_stop_the_run_unless_a_fresh_start_is_asked_for(tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=ruined", "optim.epochs=1")
    train_cli(1, TINY_CONFIG, overrides)
    run = tmp_path / "ruined"
    for manifest in (run / "checkpoints").glob("*/manifest.json"):
        manifest.write_text("{")
    before = files_and_times(run)
    refused = train_cli(1, TINY_CONFIG, overrides, check=False)
    assert refused.returncode == 2
    assert "no checkpoint of" in refused.stderr and "unreadable manifest" in refused.stderr
    assert "checkpoint.allow_fresh_start=true" in refused.stderr
    assert files_and_times(run) == before, "nothing touched"
    again = train_cli(1, TINY_CONFIG, [*overrides, "checkpoint.allow_fresh_start=true"])
    assert "(new)" in again.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
