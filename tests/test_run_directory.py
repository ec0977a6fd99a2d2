"""A damaged, read-only or full run directory: refused by name before any work, never a traceback, nothing changed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, engine_overrides, run_cli, tiny_overrides, train_cli
from smim_dist.config import ConfigError, load_config
from smim_dist.engine.checkpoint import newest_valid_tag
from smim_dist.engine.run_dir import check_run_dir

TINY_CONFIG = "configs/demo_cpu.yaml"


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """This test's own copy of the tiny run, to damage."""
    shutil.copytree(run_dir, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "1m", read_only: bool = False):
    """A small file system of its own at ``folder`` (root only: the tests that need one say so)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small or read-only file system needs root")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_latest_pointer_that_is_not_a_file_is_passed_over(run_copy):
    tag = (run_copy / "checkpoints" / "latest").read_text().strip()
    (run_copy / "checkpoints" / "latest").unlink()
    (run_copy / "checkpoints" / "latest").mkdir()
    assert newest_valid_tag(run_copy) == (tag, [])


@pytest.mark.parametrize("manifest, reason", [
    ({}, "its manifest does not list meta.json"),
    ([], "its manifest is not a table of files (list)"),
])
def test_a_checkpoint_whose_manifest_lists_too_little_is_skipped(run_copy, manifest, reason):
    junk = run_copy / "checkpoints" / "step_99999999"
    junk.mkdir()
    (junk / "manifest.json").write_text(json.dumps(manifest))
    (run_copy / "checkpoints" / "latest").unlink()  # so the newest folder is looked at first
    found, skipped = newest_valid_tag(run_copy)
    assert found != junk.name and skipped == [f"checkpoint {junk} skipped: {reason}"]


def test_a_checkpoint_missing_a_rank_s_files_is_skipped(run_copy):
    copy = run_copy
    tag = (copy / "checkpoints" / "latest").read_text().strip()
    meta = copy / "checkpoints" / tag / "meta.json"
    manifest = copy / "checkpoints" / tag / "manifest.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "world_size": 2}))  # as if rank 1 had written too
    listed = json.loads(manifest.read_text())
    listed["meta.json"] = {"bytes": meta.stat().st_size, "sha256": hashlib.sha256(meta.read_bytes()).hexdigest()}
    manifest.write_text(json.dumps(listed))
    assert newest_valid_tag(copy) == (None, [f"checkpoint {copy / 'checkpoints' / tag} skipped: its manifest does not "
                                             "list rng_rank00001.pt, zero_pp_rank_1_mp_rank_00_optim_states.pt"])


def test_the_login_node_checks_sizes_and_rank_0_checks_hashes(run_copy, monkeypatch):
    """The SLURM launcher reads no checkpoint file (sizes and the manifest: a 10 GB checkpoint costs nothing on a
    login node) and rank 0 hashes before it reads; validating writes nothing, not even an fsync."""
    import launchers.slurm as slurm

    def no_fsync(fd):
        raise AssertionError("fsync while only reading a checkpoint")

    monkeypatch.setattr(os, "fsync", no_fsync)
    tag = (run_copy / "checkpoints" / "latest").read_text().strip()
    states = next((run_copy / "checkpoints" / tag).glob("*model_states.pt"))
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0x01
    states.write_bytes(bytes(data))
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(self) or real_open(self, *a, **k))
    assert newest_valid_tag(run_copy, hashes=False) == (tag, [])
    assert not [path for path in opened if path.name.endswith(".pt")], "no checkpoint file read for its bytes"
    found, skipped = newest_valid_tag(run_copy)
    assert found != tag and f"{states.name} does not match its checksum" in skipped[0]
    states.write_bytes(bytes(data[:-1]))
    assert newest_valid_tag(run_copy, hashes=False)[0] != tag, "a truncated file is caught by its size"
    states.write_bytes(bytes(data))
    calls = []
    monkeypatch.setattr(slurm, "newest_valid_tag",
                        lambda run_dir, hashes=True: calls.append(hashes) or newest_valid_tag(run_dir, hashes))
    assert "already finished" in slurm.check_run(load_config(run_copy / "config.yaml"), 1)
    assert calls == [False]


@pytest.mark.parametrize("text, reason", [("", "it lacks checkpoint, data, engine"), ("run_name: x\nmodel: {size:",
                                                                                      "is damaged (while parsing")])
def test_a_damaged_saved_config_is_refused_by_name(run_copy, tmp_path, text, reason):
    copy = run_copy
    saved = load_config(copy / "config.yaml")
    (copy / "config.yaml").write_text(text)
    saved.output_dir = str(tmp_path)
    saved.run_name = "run"
    with pytest.raises(ConfigError, match="config.yaml is damaged") as err:
        check_run_dir(saved)
    assert reason in str(err.value) and "nothing was changed" in str(err.value)


@pytest.mark.e2e
def test_a_read_only_checkpoint_folder_stops_the_run_before_its_first_step(tmp_path, demo_data):
    with tmpfs(tmp_path / "ro" / "checkpoints", read_only=True):
        proc = train_cli(1, TINY_CONFIG, tiny_overrides(tmp_path, demo_data, "run_name=ro"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cannot write checkpoints into {tmp_path / 'ro' / 'checkpoints'} (Read-only file system)" in proc.stderr
    assert not (tmp_path / "ro" / "metrics.jsonl").exists(), "refused before the first step"


@pytest.mark.e2e
def test_a_disk_without_room_for_one_checkpoint_stops_the_run_before_its_first_step(tmp_path, demo_data):
    with tmpfs(tmp_path / "small", size="2m") as small:
        proc = train_cli(1, TINY_CONFIG, tiny_overrides(small, demo_data, "run_name=full"), check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert re.search(r"MiB free, less than one checkpoint needs \(about [\d.]+ MiB for [\d.]+M parameters\)",
                         proc.stderr), proc.stderr[-3000:]
        assert not (small / "full" / "metrics.jsonl").exists()


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_rows(run: Path, rows: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= rows):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)


@pytest.mark.e2e
def test_a_second_training_of_the_same_run_directory_is_refused_with_the_holder(tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=busy", "optim.epochs=100")
    first = start(["tests/scripts/train_with_faults.py", "--slow-loader-rank", "0", "--loader-delay", "0.5",
                   "--config", TINY_CONFIG, *overrides])
    wait_for_rows(tmp_path / "busy", 1, first)
    holder = f"is being trained by pid {first.pid} on {socket.gethostname()}"
    second = train_cli(1, TINY_CONFIG, overrides, check=False)
    assert second.returncode == 2 and holder in second.stderr, second.stderr[-3000:]
    launcher = run_cli(["launchers/local.py", "--nproc", "2", "--config", TINY_CONFIG, *overrides], check=False)
    assert launcher.returncode == 2 and holder in launcher.stderr, "refused before any worker starts"
    assert first.poll() is None, "the first training held the run directory throughout"
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    rows = [json.loads(line)["step"] for line in (tmp_path / "busy" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, len(rows) + 1)), "one writer"


@pytest.mark.e2e
def test_workers_stop_with_a_checkpoint_when_their_launcher_is_killed(tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=orphans", "optim.epochs=15",
                                 "checkpoint.every_epochs=15", "log.every_steps=1")
    launcher = start(["launchers/local.py", "--nproc", "2", "--config", TINY_CONFIG, *overrides])
    run = tmp_path / "orphans"
    wait_for_rows(run, 3, launcher)
    workers = psutil.Process(launcher.pid).children(recursive=True)
    launcher.kill()
    launcher.communicate()
    gone, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive, "the workers outlived their launcher"
    stopped = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= stopped < 60, "they stopped mid-run, with a checkpoint"
    run_cli(["launchers/local.py", "--nproc", "2", "--config", TINY_CONFIG, *overrides])
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 61))


def test_a_lease_renewed_from_another_node_is_refused_and_a_stale_one_taken_over(tmp_path):
    """Where the file system keeps locks per node, the lock file's heartbeat stands in for the lock."""
    from smim_dist.engine.run_lock import LOCK_FILE, RunLock

    lease = tmp_path / LOCK_FILE
    other = {"host": "node-b", "pid": 4242, "started": time.time()}
    lease.write_text(json.dumps({**other, "heartbeat": time.time()}))
    renewing = threading.Event()

    def renew():
        while not renewing.wait(0.2):
            lease.write_text(json.dumps({**other, "heartbeat": time.time()}))

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        with pytest.raises(ConfigError, match="being trained by pid 4242 on node-b .*its lease is renewed"):
            RunLock(tmp_path).acquire(stale_after=2.0)
    finally:
        renewing.set()
        renewer.join()  # a renewal already under way would overwrite the stale lease written next
    lease.write_text(json.dumps({**other, "heartbeat": time.time() - 10}))
    lock = RunLock(tmp_path).acquire(stale_after=2.0)
    assert json.loads(lease.read_bytes())["host"] == socket.gethostname()
    lock.release()
