"""The references ``usp check`` compares with, written from the definitions alone.

The dense mask is built here from a case's document ids, causality and window, not by
:mod:`usp.mask`, and the attention is the textbook softmax with autograd gradients, not one of
usp's kernels: a bug in usp's masks or kernels cannot hide in its own reference.

The bounds follow the rule of the test suite (flash-attention's tests use it too): in fp64 an
error of at most 1e-10; in fp32/bf16/fp16 the error against the fp64 reference may be at most
twice the error of a single-device computation in the same dtype, plus an atol of two rounding
units at the magnitude of the sums (:func:`tolerance`). That single-device computation
is itself held to the textbook attention in the same dtype (:func:`kernel_bounds`), so a kernel
that is wrong on the device cannot widen usp's bound.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor
FP64_BOUND = 1e-10
GRADIENTS = ("dq", "dk", "dv")
KERNEL_FACTOR = 8
ATOL_ULPS = 2


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


def _heads_first(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # [B, S, H, D] -> [B, H, S, D]; each kv head shared by Hq / Hkv query heads
    groups = q.shape[2] // k.shape[2]
    return (q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(groups, dim=1),
            v.transpose(1, 2).repeat_interleave(groups, dim=1))


def _probabilities(qh: Tensor, kh: Tensor, visible: Tensor) -> Tensor:
    """``[B, H, S, S]`` softmax of the visible scores; a row that sees no key is all 0."""
    scores = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(qh.shape[-1]))
    seen = visible[:, None]  # [1 or B, 1, S, S]
    sees_a_key = seen.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~seen, float("-inf")).masked_fill(~sees_a_key, 0.0)
    return torch.softmax(scores, dim=-1) * sees_a_key


def dense_attention(q: Tensor, k: Tensor, v: Tensor, dout: Tensor,
                    visible: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Softmax attention ``[B, S, H, D]`` under ``visible`` (``[1 or B, S, S]``) in the inputs'
    dtype, and its gradients ``(out, dq, dk, dv)``. A query that sees no key gives output 0 and
    no gradient (what usp does for padding)."""
    with torch.enable_grad():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        qh, kh, vh = _heads_first(*leaves)
        out = (_probabilities(qh, kh, visible) @ vh).transpose(1, 2)  # -> [B, S, H, D]
        out.backward(dout)
    return (out.detach(), *(t.grad for t in leaves))


def magnitudes(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, out: Tensor,
               visible: Tensor) -> tuple[list[float], float]:
    """What rounding errors scale with: for out, dq, dk, dv, the largest sum of the terms'
    magnitudes (a dot product of n terms is off by up to n eps sum |x_i y_i|: a result that
    cancels to a small value from large partial sums, as a ring's do, may err in units of the
    partial sums); and the largest log-sum-exp of a row, since probabilities are
    ``exp(s - lse)``: an lse rounded to fp32 scales every probability by ``1 + eps |lse|``.
    With ``P`` the probabilities, ``dP = dO V^T``, ``D = rowsum(dO * O)``: out ``P|V|``; dq
    ``scale P(|dP| + |D|)|K|``; dk ``scale (P(|dP| + |D|))^T |Q|``; dv ``P^T |dO|`` (the kv
    gradients summed over the query heads that share each kv head)."""
    groups = q.shape[2] // k.shape[2]
    qh, kh, vh = _heads_first(q, k, v)
    dout_h, out_h = dout.transpose(1, 2), out.transpose(1, 2)
    probs = _probabilities(qh, kh, visible)  # [B, H, S, S]
    scale = 1.0 / math.sqrt(q.shape[-1])
    terms = probs * ((dout_h @ vh.transpose(-1, -2)).abs()
                     + (dout_h * out_h).sum(-1, keepdim=True).abs())

    def per_kv_head(x: Tensor) -> Tensor:  # [B, Hq, S, D] -> [B, Hkv, S, D]
        return x.unflatten(1, (-1, groups)).sum(2)

    sums = (probs @ vh.abs(), scale * terms @ kh.abs(),
            per_kv_head(scale * terms.transpose(-1, -2) @ qh.abs()),
            per_kv_head(probs.transpose(-1, -2) @ dout_h.abs()))
    scores = (qh @ kh.transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    lse = lse[lse.isfinite()]  # rows that see no key have none
    return ([x.max().item() if x.numel() else 0.0 for x in sums],
            lse.abs().max().item() if lse.numel() else 0.0)


def max_error(got: Tensor, want: Tensor) -> float:
    """The largest absolute difference, in fp64 (NaN when either holds a NaN)."""
    difference = (got.detach().double() - want.detach().double()).abs()
    if bool(difference.isnan().any()):
        return float("nan")
    return difference.max().item() if difference.numel() else 0.0


def tolerance(dtype: torch.dtype, magnitude: float, lse: float) -> float:
    """The atol: ``ATOL_ULPS`` units at ``magnitude``, a unit being the relative precision of
    ``dtype`` plus that of the fp32 log-sum-exps (``eps_fp32 * lse``; every kernel keeps lse in
    fp32), see :func:`magnitudes`. A result a few roundings of its partial sums and merge weights
    away from the reference passes, whatever luck the other computations had with their own
    roundings: a ring merges R partial results with weights ``exp(lse_r - lse)`` (measured on
    CPU, fp32, ring 4, the worst of 3000 cases: out 12 units in the last place off where one
    device was 3 off)."""
    unit = torch.finfo(dtype).eps + torch.finfo(torch.float32).eps * lse
    return ATOL_ULPS * unit * magnitude


def bounds(dtype: torch.dtype, single_device_errors: list[float],
           textbook_errors: list[float], sizes: list[float], lse: float) -> list[float]:
    """The error allowed to usp for ``(out, dq, dk, dv)`` in ``dtype``: twice the error of a
    single-device computation in the same dtype (usp's own kernel over the whole sequence, or
    the textbook attention, whichever errs more: two roundings of the same sums differ by chance,
    and either is an honest measure of the dtype) plus the atol at each tensor's magnitude
    (``sizes`` and ``lse``, from :func:`magnitudes`); ``FP64_BOUND`` in fp64."""
    if dtype == torch.float64:
        return [FP64_BOUND] * len(single_device_errors)
    return [2 * max(single, textbook) + tolerance(dtype, size, lse)
            for single, textbook, size in zip(single_device_errors, textbook_errors, sizes)]


def kernel_bounds(dtype: torch.dtype, textbook_errors: list[float], sizes: list[float],
                  lse: float) -> list[float]:
    """The error allowed to usp's kernel on one device: ``KERNEL_FACTOR`` times the textbook
    attention's error in the same dtype, plus twice the atol at each tensor's magnitude. Wide
    enough for other summation orders (GQA sums the gradients of several query heads: up to 5x
    the textbook's error measured on CPU) and for problems the textbook computes exactly (a
    window of one token: its dq is exactly 0, the kernel's 1.5e-6 in fp32), narrow enough to
    catch a wrong kernel or mask, whose error is the size of the values, not of a rounding."""
    return [KERNEL_FACTOR * textbook + 2 * tolerance(dtype, size, lse)
            for textbook, size in zip(textbook_errors, sizes)]
