"""The image of docker/Dockerfile, built from this checkout with podman (build_image.sh: podman, runc and mmdebstrap
from Debian's archive, a Debian 12 base made locally when no registry serves the real one).

`image` (session scope) stages the build context, names the image by the context's digest and builds it unless an
image of that name exists, so a rerun on the same machine reuses it. Needs root (rootful podman); skipped otherwise.
The full suite runs these tests in a pytest run of their own, after the others (launchers/quickstart.sh): the build
takes both cores for minutes. Deselect with `-m "not container"`.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from container.build_context import stage_context

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build_image.sh"
WORK = Path(os.environ.get("SMIM_CONTAINER_WORK", "/var/tmp/smim-container"))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselection runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.container)
            item.add_marker(pytest.mark.xdist_group("container"))


@dataclass(frozen=True)
class Image:
    tag: str

    @property
    def env(self) -> dict[str, str]:
        """podman's settings of build_image.sh (runc, the rlimits allowed here)."""
        return {**os.environ, "CONTAINERS_CONF": str(WORK / "containers.conf")}

    def podman(self, *args: str, timeout: float = 900, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              **kwargs)
        assert not check or proc.returncode == 0, f"podman {' '.join(args)}: {proc.returncode}\n{proc.stderr[-3000:]}"
        return proc


@pytest.fixture(scope="session")
def image(tmp_path_factory, request) -> Image:
    if os.geteuid() != 0:
        pytest.skip("the image is built with rootful podman: needs root (it installs podman and runs it)")
    context = tmp_path_factory.mktemp("build_context")
    digest = stage_context(context)
    tag = f"localhost/smim_dist-test:{digest[:16]}"
    proc = subprocess.run(["bash", str(BUILD), str(context), tag], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "SMIM_CONTAINER_WORK": str(WORK), "SMIM_REVISION": f"context-{digest}"})
    assert proc.returncode == 0, f"the image build failed:\n{proc.stderr[-6000:]}"
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print("", *(line for line in proc.stderr.splitlines() if line.startswith("[build_image]")), sep="\n")
    return Image(tag)
