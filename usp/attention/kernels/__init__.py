"""Local attention kernels with ``(out, lse)`` and a matching backward (see ``base``).

``math`` (the reference) and ``cpu_flash`` run on CPU; on CUDA, ``cuda_flash``, ``cuda_efficient``
and ``cuda_cudnn`` (PyTorch's SDPA kernels) and ``flash_attn`` / ``flash_attn3`` (the flash-attn
package, loaded lazily). ``resolve_kernel("auto", q)`` picks the fastest that passes a probe.
"""

from usp.attention.kernels.base import HALF, Kernel, default_scale, expand_kv, reduce_kv_grad
from usp.attention.kernels.reference import math_backward, math_forward
from usp.attention.kernels.registry import AUTO_ORDER, KERNELS, probe, resolve_kernel
from usp.mask import CAUSAL, Band, as_band, shifted, visible_box

__all__ = ["AUTO_ORDER", "Band", "CAUSAL", "HALF", "KERNELS", "Kernel", "as_band",
           "default_scale", "expand_kv", "math_backward", "math_forward", "probe",
           "reduce_kv_grad", "resolve_kernel", "shifted", "visible_box"]
