"""A damaged .beton is refused before anything trains on it: its structure whenever it is opened, its bytes against
the checksum smim-convert writes beside it."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess

import pytest

from conftest import tiny_overrides, train_cli
from smim_dist.data.convert_cli import main as smim_convert

pytestmark = pytest.mark.e2e  # subprocesses: the end-to-end tier (pytest --full)

TINY_CONFIG = "configs/demo_cpu.yaml"


@pytest.fixture
def beton(tmp_path, tiny_run, demo_data):
    """A copy of the demo set's .beton and its checksum file, to damage."""
    for name in ("train.beton", "train.beton.sha256"):
        shutil.copy(demo_data / name, tmp_path / name)
    return tmp_path / "train.beton"


def verify(path) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = smim_convert(["verify", str(path)])
    return code, out.getvalue()


def train_on(path, tmp_path, demo_data):
    return train_cli(1, TINY_CONFIG, tiny_overrides(tmp_path, demo_data, "run_name=damaged", "data.demo=false",
                                                    f"data.path={path}"), check=False)


def test_a_conversion_writes_a_checksum_that_sha256sum_and_verify_accept(beton):
    check = subprocess.run(["sha256sum", "-c", "train.beton.sha256"], cwd=beton.parent, capture_output=True)
    assert check.returncode == 0
    assert verify(beton) == (0, f"{beton}: structure and checksum ok\n")


@pytest.mark.parametrize("cut, problem", [(40 * 24, "its header counts 64 samples, its index holds 24"),
                                          (4096, "its index at byte")])
def test_a_file_cut_short_is_refused_when_opened(beton, tmp_path, demo_data, cut, problem):
    """The index (24 bytes a sample) is the file's end: 40 entries cut, or more than the index."""
    beton.write_bytes(beton.read_bytes()[:-cut])
    code, message = verify(beton)
    assert code == 1 and f"{beton} is damaged: {problem}" in message
    proc = train_on(beton, tmp_path, demo_data)
    assert proc.returncode == 2 and f"{beton} is damaged: {problem}" in proc.stderr
    assert not (tmp_path / "damaged" / "metrics.jsonl").exists()


def test_a_file_partly_overwritten_is_refused_by_its_checksum(beton, tmp_path, demo_data):
    data = bytearray(beton.read_bytes())
    third = len(data) // 3
    data[third:2 * third] = bytes(third)
    beton.write_bytes(bytes(data))
    code, message = verify(beton)
    assert code == 1 and "its bytes do not match its checksum" in message
    proc = train_on(beton, tmp_path, demo_data)
    assert proc.returncode == 2 and f"{beton} is damaged: its bytes do not match its checksum" in proc.stderr
