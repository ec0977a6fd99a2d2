"""The datasheet peaks behind the logged MFU, looked up by the names torch reports for each part."""

import pytest
import torch

from smim_dist.config import EngineConfig
from smim_dist.engine.device_peak import datasheet_peak, device_peak_tflops


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA H200 NVL", "bf16", 835.0),
    ("NVIDIA GH200 480GB", "fp32", 67.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
    ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
    ("NVIDIA H100 PCIe", "tf32", 378.0),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
])
def test_each_listed_part_gets_its_own_dense_peak(name, precision, peak):
    assert datasheet_peak(name, precision)[0] == peak


@pytest.mark.parametrize("precision, tf32, peak", [("fp32", True, "tf32"), ("fp32", False, "fp32"),
                                                   ("bf16", True, "bf16"), ("fp16", True, "fp16")])
def test_the_logged_mfu_of_an_fp32_run_is_against_the_tf32_peak_unless_tf32_is_off(precision, tf32, peak):
    assert EngineConfig(precision=precision, tf32=tf32).matmul_precision == peak


def test_unlisted_devices_have_no_peak():
    assert datasheet_peak("NVIDIA L4", "bf16") is None
    assert device_peak_tflops(torch.device("cpu"), "fp32") is None
