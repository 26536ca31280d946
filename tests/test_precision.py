"""Training precision as users run it on CUDA, checked without a GPU: the default dtype per device,
FSDP2's mixed precision for bf16, and MFU stated against the peak of the precision in use."""

from __future__ import annotations


import pytest
import torch

from usp.precision import datasheet_peak, effective_precision, torch_dtype
from usp.topology import AXES, Topology
from usp.training import metrics
from usp.training.build import fsdp_precision
from tests.specs import run_spec
from usp.training.setup import with_device_dtype

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def _topology(**degrees) -> Topology:
    return Topology(sizes={axis: degrees.get(axis, 1) for axis in AXES},
                    ranks={axis: 0 for axis in AXES})


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert run_spec().model.dtype == "auto"
    assert with_device_dtype(run_spec(), CUDA).model.dtype == "bf16"
    assert with_device_dtype(run_spec(), CPU).model.dtype == "fp32"
    assert with_device_dtype(run_spec(dtype="fp32"), CUDA).model.dtype == "fp32"


def test_bf16_on_cuda_gathers_bf16_parameters_and_reduces_in_fp32():
    bf16 = "bf16"
    assert fsdp_precision(bf16, CUDA, _topology(ring=2)) == (torch.bfloat16, torch.float32)
    assert fsdp_precision(bf16, CUDA, _topology(dp=2)) == (torch.bfloat16, torch.float32)
    assert fsdp_precision(bf16, CUDA, _topology(tp=2)) == (None, None)  # nothing FSDP shards
    assert fsdp_precision(bf16, CPU, _topology(ring=2)) == (None, None)  # autocast on a CPU
    assert fsdp_precision("fp32", CUDA, _topology(ring=2)) == (None, None)


@pytest.mark.parametrize("name,dtype,tf32,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 989.4),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7),   # TF32 tensor cores
    ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9),   # CUDA cores
    ("NVIDIA H100 PCIe", "bf16", True, 756.0),
    ("NVIDIA H200", "bf16", False, 989.4),
    ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),
    ("NVIDIA GeForce RTX 3050", "bf16", True, None),  # unknown: no MFU rather than a wrong one
])
def test_mfu_peak_is_the_precision_in_use(monkeypatch, name, dtype, tf32, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    # a property of torch's cuBLAS module, not an attribute: set and restored by hand (pytest
    # 9.2's monkeypatch would delete it on undo)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        assert metrics.peak_tflops(CUDA, dtype, None) == peak
        assert metrics.peak_tflops(CPU, dtype, None) is None
        assert metrics.peak_tflops(CUDA, dtype, 123.0) == 123.0  # --peak-tflops wins
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_precision_names():
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("fp64") is torch.float64
    assert effective_precision("fp32", True) == "tf32"
    assert effective_precision("bf16", True) == "bf16"
    assert datasheet_peak("NVIDIA L40S", "tf32") == 183.2
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        torch_dtype("fp8")
