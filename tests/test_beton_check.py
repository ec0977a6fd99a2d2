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


def cut(beton, size: int) -> None:
    beton.write_bytes(beton.read_bytes()[:-size])


def overwrite_middle(beton) -> None:
    data = bytearray(beton.read_bytes())
    third = len(data) // 3
    data[third:2 * third] = bytes(third)
    beton.write_bytes(bytes(data))


DAMAGES = {
    "40 index entries cut": (lambda beton: cut(beton, 40 * 24), "its header counts 64 samples, its index holds 24"),
    "more than the index cut": (lambda beton: cut(beton, 4096), "its index at byte"),
    "a third overwritten": (overwrite_middle, "its bytes do not match its checksum"),
}
"""The index (24 bytes a sample) is the file's end: cutting it is a structure problem, seen whenever the file is
opened; zeroed bytes in the middle only the checksum shows."""


@pytest.mark.parametrize("damage", DAMAGES)
def test_verify_names_the_damage(beton, damage):
    damage_file, problem = DAMAGES[damage]
    damage_file(beton)
    code, message = verify(beton)
    assert code == 1 and (f"{beton} is damaged: {problem}" in message if "cut" in damage else problem in message)


@pytest.mark.e2e
@pytest.mark.parametrize("damage", DAMAGES)
def test_training_refuses_a_damaged_beton_before_its_first_step(beton, tmp_path, demo_data, damage):
    damage_file, problem = DAMAGES[damage]
    damage_file(beton)
    proc = train_on(beton, tmp_path, demo_data)
    assert proc.returncode == 2 and f"{beton} is damaged: {problem}" in proc.stderr
    assert not (tmp_path / "damaged" / "metrics.jsonl").exists()
