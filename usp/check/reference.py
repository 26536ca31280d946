"""The references ``usp check`` compares with, written from the definitions alone.

The dense mask is built here from a case's document ids, causality and window, not by
:mod:`usp.mask`, and the attention is the textbook softmax with autograd gradients, not one of
usp's kernels: a bug in usp's masks or kernels cannot hide in its own reference.

The bounds follow the rule of the test suite (flash-attention's tests use it too): in fp64 an
error of at most 1e-10; in fp32/bf16/fp16 the error against the fp64 reference may be at most
twice the error of a single-device computation in the same dtype, plus a tiny atol. That
single-device computation is itself held to the textbook attention in the same dtype
(:func:`kernel_bounds`), so a kernel that is wrong on the device cannot widen usp's bound.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor
FP64_BOUND = 1e-10
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
GRADIENTS = ("dq", "dk", "dv")
KERNEL_FACTOR = 8


def dense_visible(token_ids: Tensor, causal: bool, window: tuple[int, int] | None) -> Tensor:
    """``[rows, S, S]``: query ``i`` sees key ``j`` iff both are tokens of the same document,
    ``j <= i`` when causal, and ``i - left <= j <= i + right`` for a window (-1: unbounded)."""
    seq_len = token_ids.shape[-1]
    positions = torch.arange(seq_len, device=token_ids.device)
    query, key = positions[:, None], positions[None, :]
    visible = torch.ones(seq_len, seq_len, dtype=torch.bool, device=token_ids.device)
    if causal:
        visible &= key <= query
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= key >= query - left
        if right >= 0:
            visible &= key <= query + right
    same_document = ((token_ids[:, :, None] == token_ids[:, None, :])
                     & (token_ids[:, :, None] >= 0))
    return visible[None] & same_document


def dense_attention(q: Tensor, k: Tensor, v: Tensor, dout: Tensor,
                    visible: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Softmax attention ``[B, S, H, D]`` under ``visible`` (``[1 or B, S, S]``) in the inputs'
    dtype, and its gradients ``(out, dq, dk, dv)``. A query that sees no key gives output 0 and
    no gradient (what usp does for padding)."""
    with torch.enable_grad():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        groups = q.shape[2] // k.shape[2]
        # [B, S, H, D] -> [B, H, S, D]; kv heads shared by ``groups`` query heads each
        qh = leaves[0].transpose(1, 2)
        kh, vh = (t.transpose(1, 2).repeat_interleave(groups, dim=1) for t in leaves[1:])
        scores = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, S, S]
        seen = visible[:, None]  # [1 or B, 1, S, S]
        sees_a_key = seen.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~seen, float("-inf")).masked_fill(~sees_a_key, 0.0)
        probs = torch.softmax(scores, dim=-1) * sees_a_key
        out = (probs @ vh).transpose(1, 2)  # [B, H, S, D] -> [B, S, H, D]
        out.backward(dout)
    return (out.detach(), *(t.grad for t in leaves))


def max_error(got: Tensor, want: Tensor) -> float:
    """The largest absolute difference, in fp64 (NaN when either holds a NaN)."""
    difference = (got.detach().double() - want.detach().double()).abs()
    if bool(difference.isnan().any()):
        return float("nan")
    return difference.max().item() if difference.numel() else 0.0


def bounds(dtype: torch.dtype, single_device_errors: list[float],
           textbook_errors: list[float]) -> list[float]:
    """The error allowed to usp for ``(out, dq, dk, dv)`` in ``dtype``: twice the error of a
    single-device computation in the same dtype (usp's own kernel over the whole sequence, or
    the textbook attention, whichever errs more: two roundings of the same sums differ by chance,
    and either is an honest measure of the dtype) plus a tiny atol; ``FP64_BOUND`` in fp64."""
    if dtype == torch.float64:
        return [FP64_BOUND] * len(single_device_errors)
    return [2 * max(single, textbook) + ATOL[dtype]
            for single, textbook in zip(single_device_errors, textbook_errors)]


def kernel_bounds(dtype: torch.dtype, textbook_errors: list[float]) -> list[float]:
    """The error allowed to usp's kernel on one device: ``KERNEL_FACTOR`` times the textbook
    attention's in the same dtype, plus the atol. Wide enough for summation orders (GQA sums the
    gradients of several query heads: up to 5x measured on CPU), narrow enough to catch a wrong
    kernel or mask, whose error is the size of the values, not of a rounding."""
    return [KERNEL_FACTOR * textbook + ATOL[dtype] for textbook in textbook_errors]
