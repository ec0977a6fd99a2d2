"""The package as pip builds it: a wheel holds every module and the shipped configs, so a user who installs the wheel
(not the checkout) still trains with `--config beit_proxy` and evaluates with the `configs/eval/` recipes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_of_the_source_is_listed_for_the_wheel():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "smim_dist").rglob("__init__.py")}
    assert found | {"smim_dist.configs"} == listed


@pytest.mark.e2e
def test_a_wheel_install_finds_the_shipped_configs(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("smim_dist-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    shipped = sorted(path.relative_to(REPO / "configs").as_posix() for path in (REPO / "configs").rglob("*.yaml"))
    assert sorted(path.relative_to(site / "smim_dist" / "configs").as_posix()
                  for path in (site / "smim_dist" / "configs").rglob("*.yaml")) == shipped
    script = ("from smim_dist.config import load_config, find_config, SHIPPED_CONFIGS\n"
              "import smim_dist\n"
              "print(smim_dist.__file__)\n"
              "print(find_config('beit_proxy'))\n"
              "print(load_config('maskfeat_proxy').mask.ratio)\n"
              "print(find_config('configs/demo_cpu.yaml'))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                          check=True, timeout=300)
    module, proxy, ratio, demo = proc.stdout.split()
    assert Path(module).is_relative_to(site), "the wheel's copy is the one imported"
    assert Path(proxy) == site / "smim_dist" / "configs" / "beit_proxy.yaml"
    assert float(ratio) == 0.6
    assert Path(demo) == site / "smim_dist" / "configs" / "demo_cpu.yaml"
    eval_proc = subprocess.run([sys.executable, "-c", "from smim_dist.config import find_config, SHIPPED_CONFIGS\n"
                                "print(find_config('linear', SHIPPED_CONFIGS / 'eval'))"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, check=True, timeout=300)
    assert Path(eval_proc.stdout.strip()) == site / "smim_dist" / "configs" / "eval" / "linear.yaml"
