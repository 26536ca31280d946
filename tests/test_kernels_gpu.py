"""Every CUDA kernel against the fp64 math reference: out, lse, dQ, dK, dV (needs a GPU).

Grid per kernel: {fp16, bf16, fp32 where supported} x {MHA 8/8, GQA 8/2, MQA 8/1} x head dim
{64, 128, 80} x causal or not (and, for kernels with windows, three bands: a sliding window, the
stripe layout's strictly lower block, a window on both sides) x sequence length {256, 200} (a
multiple of 128, and not). The bound
is flash-attention's own rule (docs/testing.md): error vs fp64 <= 2 x the error of a plain PyTorch
attention computed in the same low precision, plus a tiny atol. Every failing case is reported.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.distributed import collect_failures
from usp.attention.kernels import (KERNELS, Band, as_band, default_scale, math_backward,
                                   math_forward, resolve_kernel)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-5}
HEADS = [(8, 8), (8, 2), (8, 1)]
HEAD_DIMS = [64, 128, 80]
LENGTHS = [256, 200]
DEVICE = "cuda"  # tests/test_kernels.py runs the same checks on CPU


def plain_attention(q, k, v, dout, causal, scale: float):
    """Attention in the inputs' own precision (softmax in fp32), with autograd: the baseline.
    ``causal``: a bool or a band."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    qh, kh, vh = (t.transpose(1, 2) for t in leaves)  # [B, H, S, D]
    groups = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
    scores = torch.matmul(qh * scale, kh.transpose(-1, -2))
    band = as_band(causal, *scores.shape[-2:])
    if band is not None:
        hidden = ~band.visible(*scores.shape[-2:], device=q.device)
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    out = torch.matmul(probs, vh).transpose(1, 2)
    out.backward(dout)
    return (out, lse, *(t.grad for t in leaves))


def check(kernel_name: str, dtype: torch.dtype, heads: tuple[int, int], head_dim: int,
          causal: bool, seq: int) -> None:
    g = torch.Generator().manual_seed(seq * head_dim + heads[1])
    make = lambda h: torch.randn(2, seq, h, head_dim, generator=g, dtype=torch.float64)  # noqa: E731
    exact = [make(heads[0]), make(heads[1]), make(heads[1]), make(heads[0])]
    scale = default_scale(head_dim, None)
    ref_out, ref_lse = math_forward(*exact[:3], causal, scale)
    reference = (ref_out, ref_lse, *math_backward(exact[3], *exact[:3], ref_out, ref_lse,
                                                  causal, scale))
    q, k, v, dout = (t.to(device=DEVICE, dtype=dtype) for t in exact)
    kernel = resolve_kernel(kernel_name, q)  # probes it: a kernel that fails says why
    out, lse = kernel.forward(q, k, v, causal, scale)
    got = (out, lse, *kernel.backward(dout, q, k, v, out, lse, causal, scale))
    baseline = plain_attention(q, k, v, dout, causal, scale)
    for name, g_, b, r in zip(("out", "lse", "dq", "dk", "dv"), got, baseline, reference):
        assert g_.shape == r.shape, f"{name} shape {tuple(g_.shape)} != {tuple(r.shape)}"
        error, bound = _difference(g_, r), 2 * _difference(b, r) + ATOL[dtype]
        if not error <= bound:
            raise AssertionError(f"{name} error {error:.3e} > bound {bound:.3e}")


def _difference(got, reference) -> float:
    """Largest |got - reference|; a row that sees no key (lse -inf on both sides) counts 0."""
    got = got.detach().double().cpu()
    both_empty = torch.isneginf(got) & torch.isneginf(reference)
    return torch.where(both_empty, 0.0, (got - reference).abs()).max().item()


@pytest.mark.parametrize("kernel_name", ["cuda_flash", "cuda_efficient", "cuda_cudnn",
                                         "flash_attn", "flash_attn3"])
def test_cuda_kernel_matches_math_reference(kernel_name):
    kernel = KERNELS[kernel_name]
    if kernel.load is not None:
        try:
            kernel.load()
        except ValueError as exc:
            pytest.skip(str(exc))
    masks = (True, False) + ((Band(-33, 0), Band(None, -1), Band(-20, 7)) if kernel.bands else ())
    cases = [
        (kernel_name, DTYPES[d], heads, head_dim, mask, seq)
        for d, heads, head_dim, mask, seq in itertools.product(
            DTYPES, HEADS, HEAD_DIMS, masks, LENGTHS)
        if DTYPES[d] in kernel.dtypes
    ]
    failures = collect_failures(cases, lambda case: check(*case))
    assert not failures, f"{len(failures)} of {len(cases)} cases fail:\n" + "\n".join(failures)


def test_auto_picks_a_working_kernel_for_every_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        q = torch.zeros(1, 8, 2, 64, device="cuda", dtype=dtype)
        kernel = resolve_kernel("auto", q)
        assert kernel.device_type in ("cuda", "any") and dtype in kernel.dtypes
