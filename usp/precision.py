"""The precisions usp runs in: their names, their torch dtypes, and each GPU's peak in them.

Torch-free at import (the command line offers the names; ``usp --help`` imports no torch).
The peaks are the vendors' datasheet numbers for **dense** math, per GPU, in TFLOP/s: tensor
cores for bf16, fp16 and tf32 (fp32 matmuls with TF32 on), the CUDA cores for fp32 with TF32
off. MFU is stated against the peak of the precision a run's matmuls actually use
(:func:`effective_precision`). Keys are matched against ``torch.cuda.get_device_name``, longest
first ("H100 PCIe" before "H100", which is the SXM part).
"""

from __future__ import annotations

DTYPES = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# what an exported model's weights may be stored in (``usp export --dtype``)
EXPORT_DTYPES = ("fp32", "bf16", "fp16")

PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.2, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
}


def torch_dtype(name: str):
    """The torch dtype of a precision name (``"bf16"`` -> ``torch.bfloat16``)."""
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}; choose one of {sorted(DTYPES)}")
    import torch

    return getattr(torch, DTYPES[name])


def effective_precision(name: str, tf32: bool) -> str:
    """What the matmuls of a run in ``name`` compute in: fp32 matmuls run as TF32 when allowed."""
    return "tf32" if name == "fp32" and tf32 else name


def datasheet_peak(device_name: str, precision: str) -> float | None:
    """The dense peak of the GPU called ``device_name`` in ``precision`` (None: not known)."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_TFLOPS[key].get(precision)
    return None
