"""The image as users run it: the podman commands of docs/launching.md ("Containers") with the image these tests
built; a demo stopped by `podman stop` resumes with the same command to the uninterrupted run's losses and its
evaluation job ends inside the container; export and kNN in the image; a read-only root, the user smim, writes only
to the mounted folders; the Apptainer definition's run script in the image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_same_weights, final_weights, losses
from container.conftest import BUILD, Image

PAGE = "docs/launching.md"
DOCS_IMAGE = "smim_dist:0.1.0"
PROJECT = "/opt/smim_dist"


def documented(prefix: str) -> list[list[str]]:
    """The page's commands that start with ``prefix``, as argument lists."""
    from test_docs import documented_commands

    return [command.argv for command in documented_commands()
            if command.source.startswith(PAGE + ":") and command.text.startswith(prefix)]


def as_user_types(argv: list[str], image: Image, cwd: Path) -> list[str]:
    """What the shell would run in ``cwd``, with the tests' image for the page's."""
    return [arg.replace("$PWD", str(cwd)).replace(DOCS_IMAGE, image.tag) for arg in argv]


def demo_command() -> list[str]:
    [demo] = [argv for argv in documented("podman run ") if "smim-train" in argv]
    return demo


def in_the_image(image: Image, cwd: Path, *command: str) -> list[str]:
    """The documented demo's `podman run` (mounts, read-only root) with another command."""
    demo = as_user_types(demo_command(), image, cwd)
    return [*demo[:demo.index(image.tag) + 1], *command]


@pytest.fixture(scope="module")
def user_dir(image, tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """A folder where the page's commands after the build ran, as typed (the page's image name swapped)."""
    cwd = tmp_path_factory.mktemp("user")
    outputs = []
    for argv in documented("mkdir ") + documented("podman run "):
        proc = subprocess.run(as_user_types(argv, image, cwd), cwd=cwd, env=image.env, capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, f"{argv}: {proc.returncode}\n{proc.stderr[-4000:]}"
        outputs.append(proc)
    return cwd, outputs


def test_the_documented_build_is_the_one_the_tests_make():
    [build] = documented("podman build ")
    assert build[:7] == ["podman", "build", "--format", "docker", "-f", "docker/Dockerfile", "-t"]
    # build_image.sh adds only this machine's needs: the local base image, PyPI as torch's index, the host's CA bundle
    assert "podman build --pull=never --format docker -f docker/Dockerfile -t" in BUILD.read_text()


def test_the_documented_commands_run_the_demo_as_user_smim_with_a_read_only_root(image, user_dir):
    cwd, outputs = user_dir
    assert any(proc.stdout.startswith("usage:") for proc in outputs), "the image without a command prints its usage"
    demo = demo_command()
    assert "--read-only" in demo, "the page's demo runs with a read-only root: it writes only to the mounted folders"
    run = cwd / "runs" / "demo_cpu"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000032"
    assert sorted(losses(run)) == [8, 16, 24, 32]
    for path in (run, run / "metrics.jsonl", cwd / "data_cache" / "demo"):
        assert path.stat().st_uid == 1000, f"{path} is not written by the image's user smim (uid 1000)"
    who = image.podman("run", "--rm", image.tag, "id", "-un").stdout.strip()
    assert who == "smim"
    assert image.podman("run", "--rm", image.tag, "smim-train", "--help").stdout.startswith("usage: smim-train")


def test_podman_stop_checkpoints_and_the_same_command_resumes_to_the_uninterrupted_losses(image, user_dir):
    cwd, _ = user_dir
    name = f"smim-sigterm-{os.getpid()}"
    command = demo_command() + ["run_name=stopped", "checkpoint.every_epochs=1", "eval.every_epochs=1"]
    resume = as_user_types(command, image, cwd)
    detached = [*resume[:2], "-d", "--name", name, *[arg for arg in resume[2:] if arg != "--rm"]]
    image.podman(*detached[1:])
    try:
        deadline = time.monotonic() + 600
        while "step 16/" not in (log := image.podman("logs", name).stderr):
            state = image.podman("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
            assert state == "running" and time.monotonic() < deadline, f"{state}\n{log[-3000:]}"
            time.sleep(2)
        image.podman("stop", "-t", "120", name)
        exit_code = image.podman("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        log = image.podman("logs", name).stderr
    finally:
        image.podman("rm", "-f", name, check=False)
    assert exit_code == "143", log[-3000:]
    stopped = re.search(r"stopped at step (\d+) on request", log)
    assert stopped, log[-3000:]
    run = cwd / "runs" / "stopped"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{int(stopped[1]):08d}"

    proc = subprocess.run(resume, cwd=cwd, env=image.env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from step_{int(stopped[1]):08d}" in proc.stderr
    whole, step = cwd / "runs" / "demo_cpu", int(stopped[1])
    # the row that closes the logging window the stop cut averages the steps trained since the resume
    every = yaml.safe_load((REPO / "configs" / "demo_cpu.yaml").read_text())["log"]["every_steps"]
    cut = {-(-step // every) * every} if step % every else set()
    resumed, uninterrupted = losses(run), losses(whole)
    assert sorted(resumed) == sorted(uninterrupted)
    assert {k: v for k, v in resumed.items() if k not in cut} == {k: uninterrupted[k] for k in resumed if k not in cut}
    assert_same_weights(final_weights(run), final_weights(whole))
    # the finished run waited for its evaluation job, which the container's end would otherwise have killed
    folder = run / "eval" / "step_00000032"
    finished = json.loads((folder / "finished.json").read_text())
    assert finished["ok"], (folder / "log.txt").read_text()[-3000:]
    knn = json.loads((folder / "results.json").read_text())["protocols"]["knn"]
    assert 0 <= knn["cls"]["top1"] <= knn["cls"]["top5"] <= 1


def test_export_and_knn_run_in_the_image(image, user_dir):
    cwd, _ = user_dir
    exported = subprocess.run(in_the_image(image, cwd, "smim-export", "runs/demo_cpu", "runs/demo_cpu.safetensors"),
                              env=image.env, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (cwd / "runs" / "demo_cpu.safetensors").stat().st_size > 1_000_000
    knn = subprocess.run(in_the_image(image, cwd, "smim-eval", "knn", "--checkpoint", "runs/demo_cpu"),
                         env=image.env, capture_output=True, text=True, timeout=600)
    assert knn.returncode == 0, knn.stderr[-3000:]
    results = json.loads((cwd / "runs" / "demo_cpu" / "eval" / "step_00000032" / "results.json").read_text())
    assert 0 <= results["protocols"]["knn"]["cls"]["top1"] <= 1


def test_the_apptainer_run_script_runs_in_the_image(image):
    """Apptainer is not packaged for Debian 12 and cannot be built here (docs/launching.md): its run script runs as
    Apptainer would run it, as the calling user (not smim) with the host's PATH, a read-only image and another
    working directory."""
    text = (REPO / "docker" / "apptainer.def").read_text()
    runscript = re.search(r"^%runscript\n(.*?)(?=^%|\Z)", text, re.M | re.S)[1]
    probe = "import os, sys; print(os.getcwd(), sys.prefix, os.environ['DS_ACCELERATOR'])"
    proc = image.podman("run", "--rm", "--read-only", "--user", "4242:4242", "--workdir", "/tmp",
                        "-e", "PATH=/usr/local/bin:/usr/bin:/bin", "-e", "HOME=/nonexistent",
                        "--entrypoint", "/bin/sh", image.tag, "-c", runscript, "runscript", "python", "-c", probe)
    assert proc.stdout.split() == [PROJECT, "/opt/venv", "cpu"], proc.stderr
