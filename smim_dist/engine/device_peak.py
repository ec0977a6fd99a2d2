"""The training device's dense peak TFLOP/s, so that runs and benchmarks can say how close they get to the hardware.

Figures are NVIDIA's datasheet numbers without sparsity, per GPU. ``tf32`` is the peak of fp32 runs with
``engine.tf32`` (the default), ``fp32`` that of runs without. Other devices have no entry; their utilisation is then
unknown rather than guessed.
"""

from __future__ import annotations

import torch

DATASHEET_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)
"""(part of the name torch reports, peaks by precision), most specific first: 'NVIDIA H100 PCIe' must not be read as
the SXM part, nor 'NVIDIA GH200 480GB' as an H200"""


def datasheet_peak(device_name: str, precision: str) -> tuple[float, str] | None:
    """The dense peak of a GPU by its name, and which datasheet entry gave it; None for a device not listed."""
    for key, peaks in DATASHEET_TFLOPS:
        if key in device_name:
            return peaks[precision], f"{key} datasheet, dense {precision}"
    return None


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    peak = datasheet_peak(torch.cuda.get_device_name(device), precision)
    return peak[0] if peak else None
