"""Runs interrupted at a random step in a random way end exactly where an uninterrupted run ends: bit-identical
final weights and the same loss at every step, each step recorded once.

Every way of interrupting a run of 2 processes runs once: SIGTERM (a checkpoint, then exit 143), SIGKILL of every
process, and SIGKILL of one rank (torchrun's agent then ends the other), each at a step drawn from a seed;
``SMIM_INTERRUPTION_TRIALS=N`` adds N trials drawn whole (way and step). The same command then runs once more and
must finish the run. One process: tests/test_preemption.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import REPO, engine_overrides, losses, train_cli

pytestmark = pytest.mark.e2e  # subprocesses: the end-to-end tier (pytest --full)

TINY_CONFIG = "configs/demo_cpu.yaml"
RUN = ["optim.epochs=3", "checkpoint.every_epochs=1", "checkpoint.keep_last=2"]
STEPS = 12
KINDS = {2: ("sigterm", "sigkill all", "sigkill one rank")}
DRAWN = [(nproc, kind) for nproc, kinds in KINDS.items() for kind in kinds]
for trial in range(int(os.environ.get("SMIM_INTERRUPTION_TRIALS", "0"))):
    draw = random.Random(f"extra/{trial}")
    nproc = draw.choice(list(KINDS))
    DRAWN.append((nproc, draw.choice(KINDS[nproc])))


def final_weights(run_dir) -> dict:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)["module"]


def command(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "launchers/local.py", "--nproc", str(nproc), "--config", TINY_CONFIG, *overrides]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_data):
    """The reference run for a process count, trained once per module."""
    runs = {}

    def run(nproc: int):
        if nproc not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted{nproc}")
            train_cli(nproc, TINY_CONFIG, engine_overrides(out, demo_data, "run_name=straight", *RUN))
            runs[nproc] = out / "straight"
        return runs[nproc]

    return run


@pytest.mark.parametrize("trial, nproc, kind", [(trial, *case) for trial, case in enumerate(DRAWN)],
                         ids=[f"{nproc} process(es), {kind}" for nproc, kind in DRAWN])
def test_an_interrupted_run_ends_bit_identical_to_an_uninterrupted_one(uninterrupted, trial, nproc, kind, tmp_path,
                                                                        demo_data):
    straight = uninterrupted(nproc)
    draw = random.Random(f"{trial}/{nproc}/{kind}")
    step = draw.randint(2, STEPS - 2)
    run = tmp_path / "interrupted"
    argv = command(nproc, engine_overrides(tmp_path, demo_data, "run_name=interrupted", *RUN))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= step):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    if kind == "sigterm":
        process.send_signal(signal.SIGTERM)
    elif kind == "sigkill all":
        os.killpg(process.pid, signal.SIGKILL)
    else:
        workers = [child for child in psutil.Process(process.pid).children(recursive=True)
                   if "smim_dist.train" in " ".join(child.cmdline())]
        draw.choice(workers).kill()
    process.communicate(timeout=300)
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, f"{kind} at step {step}: {again.stderr[-3000:]}"
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, STEPS + 1)), f"{kind} at step {step}"
    assert losses(run) == pytest.approx(losses(straight), rel=1e-6), f"{kind} at step {step}"
    expected, found = final_weights(straight), final_weights(run)
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[key], found[key]) for key in expected), f"{kind} at step {step}: bit-identical"
