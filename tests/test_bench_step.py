"""The benchmarks end to end at toy size: both models run and the figures are consistent. The scripts that start no
process group run in this process (``conftest.run_script``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_cli, run_script
from smim_dist.config import ModelConfig
from smim_dist.models.flops import forward_flops
from smim_dist.targets.hog import HOGTarget
from smim_dist.targets.pixels import PixelTarget

pytestmark = pytest.mark.e2e  # subprocesses: the end-to-end tier (pytest --full)



def test_step_bench_reports_both_models_with_consistent_figures(tmp_path):
    out = tmp_path / "step.json"
    proc = run_script(["bench/step.py", "--sizes", "micro", "--img", "32", "--patch", "8", "--batch", "4",
                    "--targets", "maskfeat", "pixels", "--warmup", "1", "--rounds", "1", "--steps", "1",
                    "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {(row["target"], row["mode"]): row for row in result["rows"]}
    assert set(rows) == {(target, mode) for target in ("maskfeat", "pixels") for mode in ("vanilla", "proxy")}
    for (target, mode), row in rows.items():
        cfg = ModelConfig(size="micro", mode=mode, img_size=32, patch_size=8)
        target_dim = (PixelTarget(8) if target == "pixels" else HOGTarget(8)).out_dim
        flops = 3 * forward_flops(cfg, 0.6, True, target_dim) * 4
        assert row["model_tflops"] == pytest.approx(flops / (row["ms_per_step"] / 1e3) / 1e12, rel=1e-6)
        assert row["mfu"] == pytest.approx(row["model_tflops"] / result["peak_tflops"], rel=1e-6)
        assert row["images_per_s"] == pytest.approx(4 / (row["ms_per_step"] / 1e3), rel=1e-6)
    assert "micro/maskfeat: proxy / vanilla step time per image" in proc.stdout


def test_profile_bench_splits_the_step_into_phases(tmp_path):
    proc = run_script(["bench/profile_step.py", "--img", "32", "--patch", "8", "--batch", "4", "--warmup", "1",
                    "--steps", "1", "--top", "5"])
    for mode in ("vanilla", "proxy"):
        assert f"== {mode}:" in proc.stdout
    assert proc.stdout.count("phases:") == 2 and "backward" in proc.stdout


def test_gpu_check_runs_every_part_at_toy_size_on_the_cpu():
    """The GPU check gets minutes of a borrowed GPU: its smoke mode runs every part here first, so a part broken by a
    change shows up in CI instead of on the GPU."""
    out = run_cli(["bench/gpu_check.py", "--smoke"], timeout=600).stdout
    assert out.count(") ok") == 2, out
    for line in ("DeepSpeed bf16 engine (ZeRO 1), ViT-micro/8 proxy", "DeepSpeed bf16 engine (ZeRO 1), engine.compile,",
                 "DeepSpeed bf16 engine (ZeRO 1), engine.overlap_comm,", "engine.overlap_comm / without:",
                 "plain torch, bf16 weights", "the training loop around the DeepSpeed bf16 engine",
                 "step time / plain", "tokenizer, fp32 throughout", "tokenizer, fp16 convolutions",
                 "tokenizer, the default in channels-last",
                 "the training loop's own profile of 3 steps (log.profile_steps)", "aten::addmm"):
        assert line in out, line
    assert "FAILED" not in out


def test_gpu_check_refuses_a_machine_without_an_nvidia_gpu(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver")
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert "nvidia-smi not found" in proc.stderr


def test_engine_overhead_bench_counts_each_zero_stage_against_plain_torch():
    proc = run_cli(["bench/engine_overhead.py", "--img", "32", "--batch", "4", "--steps", "1", "--stages", "1", "3",
                    "--show-reads", "--compare-contiguous-gradients", "--compare-overlap-comm"], timeout=300)
    rows = {label.strip(): figures for label, *figures in (line.rsplit(maxsplit=3) for line in proc.stdout.splitlines()
            if line.startswith(("plain torch, bf16 ", "DeepSpeed bf16, ZeRO")) and not line.endswith(":"))}
    sources = proc.stdout.split("DeepSpeed bf16, ZeRO 1:\n", 1)[1].split("DeepSpeed bf16, ZeRO 3:")[0]
    assert "reads/step" in sources and ".py(" in sources, "--show-reads names the Python line of each host read"
    no_contiguous = "DeepSpeed bf16, ZeRO 1, no contiguous gradients"
    assert set(rows) == {"plain torch, bf16", "DeepSpeed bf16, ZeRO 1", no_contiguous,
                         "DeepSpeed bf16, ZeRO 1, overlap_comm", "DeepSpeed bf16, ZeRO 3"}
    assert float(rows[no_contiguous][0]) < float(rows["DeepSpeed bf16, ZeRO 1"][0]), \
        "without its contiguous buffers DeepSpeed skips a gradient copy per tensor"
    assert all(float(rows[label][0]) > float(rows["plain torch, bf16"][0]) for label in rows if "ZeRO" in label), \
        "DeepSpeed's bookkeeping runs operators of its own"


def test_memory_bench_counts_activations_and_the_residuals_bytes_against_timms():
    out = run_script(["bench/memory.py", "--size", "micro", "--img", "32", "--patch", "8", "--batch", "2"]).stdout
    for mode in ("vanilla", "proxy"):
        section = out.split(f"\n{mode}: ", 1)[1]
        assert section.startswith("activations kept for the backward") and " GiB at 256 images" in section
        ratio = float(section.split("bytes written, this project's / timm's: ", 1)[1].split()[0])
        assert ratio < 0.97, f"{mode}: folding layer scale and drop path into one multiply writes fewer bytes"


def test_loader_bench_times_each_ffcv_decoder_step():
    out = run_script(["bench/loader.py", "--op-times"]).stdout
    times = {line.rsplit(maxsplit=2)[0].strip(): float(line.split()[-2]) for line in out.splitlines()
             if line.endswith(" us")}
    assert len(times) == 4 and all(value > 0 for value in times.values()), out
    assert "colour jitter, torchvision uint8 (image-file loader)" in times
