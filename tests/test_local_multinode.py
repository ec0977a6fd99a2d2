"""``launchers/local.py`` across nodes without SLURM: two launchers on this machine play two nodes (1 gloo process each)
and must train, stop on SIGTERM and resume exactly as one node with 2 processes does."""

import contextlib
import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, engine_overrides, losses, train_cli

TINY_CONFIG = "configs/demo_cpu.yaml"
spec = importlib.util.spec_from_file_location("local_launcher", REPO / "launchers" / "local.py")
local_launcher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(local_launcher)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_nodes(overrides, logs):
    """Two launchers, as two machines would start them; each one's output goes to its log file."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    nodes = []
    for rank in (0, 1):
        log = open(logs / f"node{rank}.log", "a")
        nodes.append(subprocess.Popen(
            [sys.executable, "launchers/local.py", "--nnodes", "2", "--node-rank", str(rank), "--nproc", "1",
             "--master-addr", "127.0.0.1", "--master-port", port, "--config", TINY_CONFIG, *overrides],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return nodes


def finish(nodes, logs, timeout=300):
    codes = [node.wait(timeout=timeout) for node in nodes]
    return codes, [(logs / f"node{rank}.log").read_text() for rank in (0, 1)]


@pytest.mark.e2e
def test_two_nodes_train_stop_on_sigterm_and_resume_like_one_node(tmp_path, demo_data):
    """4 epochs x 4 steps, one checkpoint at the end, so the SIGTERM's is the only one before it."""
    common = ["optim.epochs=4", "checkpoint.every_epochs=4"]
    train_cli(2, TINY_CONFIG, engine_overrides(tmp_path, demo_data, "run_name=one_node", *common))
    reference = losses(tmp_path / "one_node")
    assert sorted(reference) == list(range(1, 17))

    overrides = engine_overrides(tmp_path, demo_data, "run_name=two_nodes", *common)
    run = tmp_path / "two_nodes"
    nodes = start_nodes(overrides, tmp_path)
    deadline = time.monotonic() + 600
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), finish(nodes, tmp_path)
        time.sleep(0.05)
    for node in nodes:
        node.send_signal(signal.SIGTERM)
    codes, logs = finish(nodes, tmp_path)
    assert codes == [128 + signal.SIGTERM] * 2, logs
    tag = (run / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.removeprefix("step_"))
    assert 1 <= stopped_at < 16, logs
    assert f"stopped at step {stopped_at} on request" in logs[0]
    assert all("SIGTERM: the workers were given 120 s to checkpoint" in log for log in logs)
    first_leg = losses(run)
    assert first_leg == {step: reference[step] for step in range(1, stopped_at + 1)}, "bit-identical to one node"

    codes, logs = finish(start_nodes(overrides, tmp_path), tmp_path)
    assert codes == [0, 0], logs
    assert f"resumed from {tag}" in logs[0] and "2 x cpu ranks" in logs[0]
    assert losses(run) == reference, "bit-identical to one node, uninterrupted"


def launch(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.chdir(REPO):
        try:
            code = local_launcher.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


@pytest.mark.parametrize("args, env, message", [
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], {},
     "--node-rank 2: must be 0 to 1 with --nnodes 2"),
    (["--nnodes", "2", "--node-rank", "1"], {}, "--nnodes 2 needs --master-addr HOST"),
    (["--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1", "--master-port", "70000"], {},
     "--master-port 70000: a TCP port is 1 to 65535"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1"], {}, "--nnodes 2 needs --node-rank"),
    (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1"], {}, "--rdzv-endpoint 10.0.0.1: expected HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:29400", "--node-rank", "1"], {},
     "--node-rank 1: ranks come from the rendezvous"),
    ([], {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"}, "NODE_RANK=2: must be 0 to 1 with NNODES=2"),
    ([], {"PET_NNODES": "two"}, "PET_NNODES='two' in the environment: expected a whole number"),
    (["--nnodes", "3", "--node-rank", "0", "--master-addr", "10.0.0.1"], {},
     "optim.global_batch=64 is not divisible by 3 processes"),
])
def test_bad_node_options_are_refused_before_anything_starts(args, env, message, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, stderr = launch(*args, "--config", TINY_CONFIG)
    assert code == 2 and message in stderr, stderr


def test_flags_win_over_the_environment_and_one_node_stays_standalone(monkeypatch):
    monkeypatch.setenv("PET_NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    args = local_launcher.parse_args(["--node-rank", "0", "--master-port", "29600", "--config", TINY_CONFIG])
    assert local_launcher.rendezvous(args, "run") == ["--nnodes", "2", "--node-rank", "0", "--master-addr",
                                                      "10.0.0.1", "--master-port", "29600"]
    monkeypatch.setenv("RDZV_ENDPOINT", "10.0.0.1:29400")
    args = local_launcher.parse_args(["--config", TINY_CONFIG])
    assert local_launcher.rendezvous(args, "run") == ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                                      "10.0.0.1:29400", "--rdzv-id", "run"]
    args = local_launcher.parse_args(["--nnodes", "1", "--config", TINY_CONFIG])
    assert local_launcher.rendezvous(args, "run") == ["--standalone"]


def test_more_processes_than_gpus_is_refused_by_name(monkeypatch):
    """One process per GPU: a rank without a GPU of its own is told so before it touches CUDA (this machine has no
    GPU, so its count is stood in for; the real CUDA call would fail with 'invalid device ordinal')."""
    from smim_dist.config import ConfigError
    from smim_dist.engine.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        monkeypatch.setenv(name, value)
    message = r"LOCAL_RANK=3, but this node has 2 visible GPU\(s\) \(CUDA_VISIBLE_DEVICES=0,1\): start one process"
    with pytest.raises(ConfigError, match=message):
        init_distributed()
