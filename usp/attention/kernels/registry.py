"""Which kernel runs: the registry of named kernels, and ``auto``, which cannot crash a run.

``auto`` tries the candidates for the tensors' device in order of speed and takes the first whose
**probe** passes: tiny forward+backward calls with GQA at the caller's dtype and head dim, compared
with the math reference, over every kind of block a ring schedule hands a kernel — causal and full
squares, blocks with more query rows than keys and fewer, causal cuts of non-square blocks (packed
documents, padding, the stripe layout), lower and upper bands and sliding windows. Every kernel runs
every band (kernels whose ops have no window get bands as full and causal parts,
:mod:`usp.attention.kernels.bands`), so a kernel chosen for a call never refuses one of its pieces
in the middle of a ring. A kernel that is missing (flash-attn not installed), does not load (an
extension built for another torch), raises, or returns wrong numbers is skipped, and the choice is
logged with the reason for every skip. Probes run once per (kernel, dtype, device, head dim) in a
process. A kernel the caller names explicitly is probed too, and a failure is a ValueError saying
why, at the first call rather than deep inside a ring step.
"""

from __future__ import annotations

import logging

import torch

from usp.attention.kernels.bands import banded
from usp.attention.kernels.base import Kernel, default_scale
from usp.mask import CAUSAL, Band
from usp.attention.kernels.cpu import CPU_FLASH
from usp.attention.kernels.flash_attn import FLASH_ATTN, FLASH_ATTN_3
from usp.attention.kernels.reference import MATH, math_backward, math_forward
from usp.attention.kernels.sdpa import CUDA_CUDNN, CUDA_EFFICIENT, CUDA_FLASH

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

KERNELS = {k.name: k for k in (MATH, CPU_FLASH, FLASH_ATTN_3, FLASH_ATTN, CUDA_FLASH, CUDA_CUDNN,
                               CUDA_EFFICIENT)}
# fastest first; math last everywhere (any dtype, O(S^2) memory)
AUTO_ORDER = {
    "cpu": ("cpu_flash", "math"),
    "cuda": ("flash_attn3", "flash_attn", "cuda_flash", "cuda_cudnn", "cuda_efficient", "math"),
}
# probe tolerance, relative to the reference's largest magnitude: a wrong kernel is off by O(1)
PROBE_TOLERANCE = {torch.float64: 1e-8, torch.float32: 2e-3, torch.bfloat16: 6e-2,
                   torch.float16: 1e-2}
PROBE_HEADS = (1, 4, 2)  # batch, q heads, kv heads (GQA)
# (query rows, keys, mask): lengths not multiples of 32 or 64; squares causal and full, a window
# on both sides, causal cuts of non-square blocks both ways, an upper band (keys j >= i + 3, the
# lower edge of a window) and a strictly lower band with rows past the keys
PROBE_BLOCKS = (
    (72, 72, True), (72, 72, False), (72, 72, Band(-9, 2)), (72, 40, CAUSAL), (40, 72, CAUSAL),
    (72, 40, Band(3, None)), (56, 24, Band(-20, -1)),
)
_probes: dict[tuple, str | None] = {}
_announced: set[tuple] = set()


def _probe_failure(kernel: Kernel, dtype: torch.dtype, device: torch.device,
                   head_dim: int) -> str | None:
    """None when ``kernel`` runs and is right on tiny problems like the caller's, else why not."""
    kernel = banded(kernel)
    batch, heads, kv_heads = PROBE_HEADS
    generator = torch.Generator().manual_seed(0)
    make = lambda s, h: torch.randn(batch, s, h, head_dim, generator=generator)  # noqa: E731
    scale = default_scale(head_dim, None)
    try:
        with torch.autocast(device.type, enabled=False), torch.no_grad():
            for n_q, n_k, mask in PROBE_BLOCKS:
                q, k, v, dout = make(n_q, heads), make(n_k, kv_heads), make(n_k, kv_heads), make(
                    n_q, heads)
                inputs = [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]
                out, lse = kernel.forward(*inputs[:3], mask, scale)
                grads = kernel.backward(inputs[3], *inputs[:3], out, lse, mask, scale)
                exact = [t.to(device=device, dtype=torch.float64) for t in (q, k, v, dout)]
                ref_out, ref_lse = math_forward(*exact[:3], mask, scale)
                ref_grads = math_backward(exact[3], *exact[:3], ref_out, ref_lse, mask, scale)
                for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"),
                                          (out, lse, *grads), (ref_out, ref_lse, *ref_grads)):
                    if tuple(got.shape) != tuple(ref.shape):
                        return f"{name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
                    # rows that see no key: lse -inf in both (inf - inf is NaN, so compare apart)
                    both_empty = torch.isneginf(ref) & torch.isneginf(got.double())
                    error = (got.double() - ref).masked_fill(both_empty, 0).abs().max().item()
                    bound = PROBE_TOLERANCE[dtype] * (1.0 + ref.masked_fill(
                        torch.isinf(ref), 0).abs().max().item())
                    if not error <= bound:  # also catches NaN
                        return (f"{name} is off by {error:.3g} (> {bound:.3g}) on a {n_q} x {n_k} "
                                f"block with mask {mask}")
    except Exception as exc:  # any failure of an optional kernel means: do not use it
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def probe(kernel: Kernel, dtype: torch.dtype, device: torch.device, head_dim: int) -> str | None:
    """Cached :func:`_probe_failure`: None if ``kernel`` works for this dtype, device, head dim."""
    key = (kernel.name, id(kernel), dtype, device, head_dim)
    if key not in _probes:
        _probes[key] = _probe_failure(kernel, dtype, device, head_dim)
    return _probes[key]


def _static_failure(kernel: Kernel, q: Tensor) -> str | None:
    try:
        kernel.check(q)
    except ValueError as exc:
        return str(exc)
    return None


def _is_fake(q: Tensor) -> bool:
    """Meta and fake tensors (shape propagation, tracing) cannot run a probe."""
    from torch._subclasses.fake_tensor import is_fake

    return q.device.type == "meta" or is_fake(q)


def _auto(q: Tensor) -> Kernel:
    order = AUTO_ORDER.get(q.device.type, ("math",))
    skipped = []
    for name in order:
        kernel = KERNELS[name]
        reason = _static_failure(kernel, q)
        if reason is None and not _is_fake(q):
            reason = probe(kernel, q.dtype, q.device, q.shape[-1])
        if reason is None:
            key = (name, q.dtype, q.device, q.shape[-1])
            if key not in _announced:
                _announced.add(key)
                logger.info("kernel auto: %s for %s on %s, head dim %d%s", name, q.dtype,
                            q.device, q.shape[-1],
                            "".join(f"; skipped {n} ({why})" for n, why in skipped))
            return banded(kernel)
        skipped.append((name, reason))
    raise ValueError(
        f"no attention kernel works for {q.dtype} on {q.device} with head dim {q.shape[-1]}: "
        + "; ".join(f"{n}: {why}" for n, why in skipped)
    )


def resolve_kernel(name: "str | Kernel", q: Tensor) -> Kernel:
    """The kernel called ``name`` for tensors like ``q``; ``"auto"`` picks the best that works.

    A :class:`Kernel` instance (your own kernel, or a wrapped one) is checked against q's device
    and dtype and used as it is. The kernel returned runs every mask a ring hands it (a kernel
    with ``bands=False`` comes back wrapped by :func:`usp.attention.kernels.bands.banded`).
    """
    if name == "auto":
        return _auto(q)
    kernel = name if isinstance(name, Kernel) else KERNELS.get(name)
    if kernel is None:
        raise ValueError(f"unknown kernel {name!r}; choose 'auto' or one of {sorted(KERNELS)}")
    kernel.check(q)
    if not isinstance(name, Kernel) and not _is_fake(q):
        reason = probe(kernel, q.dtype, q.device, q.shape[-1])
        if reason is not None:
            raise ValueError(
                f"kernel {name!r} fails on {q.dtype} with head dim {q.shape[-1]} on {q.device}: "
                f"{reason}; use kernel='auto' to fall back to one that works"
            )
    return banded(kernel)
