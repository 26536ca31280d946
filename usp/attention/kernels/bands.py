"""Any band on any kernel: a band block cut into parts a kernel can run, and the parts run.

A ring piece or a local call is a block of ``n_q x n_k`` with a :class:`~usp.mask.Band`. Not every
kernel can take every band in one call: some ops have no window at all (memory-efficient and cuDNN
attention: full or causal square blocks only), and FlashAttention-2's window rules change the
meaning of a window on a block with more query rows than keys (``glue.py``). :func:`split_band`
cuts a band block into **parts** — rectangles of rows and keys, each one a full block, a causal
square, a causal square with rows and keys reversed (the band's lower edge: key ``j >= i`` is
causal once both orders are flipped), or a band the kernel can run as it is — that together cover
the band exactly once. :func:`run_parts` / :func:`run_parts_backward` run them through a kernel
and merge the parts of each row like ring blocks (fp32), so the result is the band's, exactly.

The cut, for a band trimmed to its visible box (every row sees a key, every key is seen):

- only an upper edge (row ``i`` sees keys ``0 .. i + hi``): the keys every row sees form one full
  block, the rest is a causal square, and rows below it see all of its keys (a full block);
- only a lower edge: the same, on the block with rows and keys reversed;
- both edges, ``w = hi - lo + 1`` keys wide: rows in chunks of at most ``w``; in a chunk, the keys
  left of those all its rows see have only the lower edge, the keys right of them only the upper
  one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from usp.attention.kernels.base import Kernel
from usp.attention.merge import merge_into
from usp.mask import Band, as_band, is_causal_square, shifted, visible_box

Tensor = torch.Tensor
# native(band, n_q, n_k) -> True when the kernel runs this band on this block in one call
Native = Callable[[Band, int, int], bool]


@dataclass(frozen=True)
class Part:
    """Rows ``[r0, r1)`` against keys ``[c0, c1)`` under ``mask``: False (every key), True (a
    causal square) or a Band the kernel runs natively. ``flipped``: a causal square run on the
    rows and keys in reverse order (it then means key ``j >= i``)."""

    r0: int
    r1: int
    c0: int
    c1: int
    mask: "bool | Band"
    flipped: bool = False


def flip_band(band: Band, n_q: int, n_k: int) -> Band:
    """``band`` on the block with its rows and keys reversed (``i -> n_q-1-i``, ``j -> n_k-1-j``)."""
    shift = n_k - n_q
    return Band(None if band.hi is None else shift - band.hi,
                None if band.lo is None else shift - band.lo)


@lru_cache(maxsize=4096)
def split_band(band: Band | None, n_q: int, n_k: int, native: Native | None = None
               ) -> tuple[Part, ...]:
    """Parts covering every visible (row, key) of ``band`` on an ``n_q x n_k`` block once.

    ``native``: the kernel's own test for bands it runs in one call (None: it runs none; then the
    parts are full blocks and causal squares, some flipped). A band the kernel runs natively on
    its visible box stays one part; one it does not run on a block with more rows than keys is
    cut into chunks of ``n_k`` rows; what is left is cut as for a kernel without bands.
    """
    return tuple(_split(band, n_q, n_k, native, 0, 0))


def _split(band, n_q, n_k, native, r0, c0) -> list[Part]:
    band = as_band(band, n_q, n_k)
    box = visible_box(band, n_q, n_k)
    if box is None:
        return []
    i0, i1, j0, j1 = box
    if (i0, i1, j0, j1) != (0, n_q, 0, n_k):  # trim to the rows and keys the band reaches
        return _split(shifted(band, i0, j0), i1 - i0, j1 - j0, native, r0 + i0, c0 + j0)
    if band is None:
        return [Part(r0, r0 + n_q, c0, c0 + n_k, False)]
    if is_causal_square(band, n_q, n_k):
        return [Part(r0, r0 + n_q, c0, c0 + n_k, True)]
    if native is not None and native(band, n_q, n_k):
        return [Part(r0, r0 + n_q, c0, c0 + n_k, band)]
    if native is not None and n_q > n_k + 1:
        # window rules that go wrong with more rows than keys are right on chunks of n_k rows
        return _rows_in_chunks(band, n_q, n_k, native, r0, c0, n_k)
    if band.lo is None:
        return _upper_edge(band, n_q, n_k, r0, c0)
    if band.hi is None:  # the lower edge is an upper edge once rows and keys are reversed
        return [Part(r0 + n_q - p.r1, r0 + n_q - p.r0, c0 + n_k - p.c1, c0 + n_k - p.c0, p.mask,
                     flipped=p.mask is True)
                for p in _upper_edge(flip_band(band, n_q, n_k), n_q, n_k, 0, 0)]
    width = band.hi - band.lo + 1
    if n_q > width:
        return _rows_in_chunks(band, n_q, n_k, None, r0, c0, width)
    # every row of this block sees keys [n_q - 1 + lo, hi]; left of them only the lower edge
    # cuts, right of them only the upper one
    left, right = max(0, n_q - 1 + band.lo), min(n_k, band.hi + 1)
    parts = []
    for a, b, part in ((0, left, Band(band.lo, None)), (left, right, None),
                       (right, n_k, Band(None, band.hi))):
        if b > a:
            parts += _split(shifted(part, 0, a), n_q, b - a, None, r0, c0 + a)
    return parts


def _upper_edge(band: Band, n_q: int, n_k: int, r0: int, c0: int) -> list[Part]:
    """Row ``i`` sees keys ``0 .. i + hi`` (a trimmed block: ``hi >= 0``)."""
    parts = []
    if band.hi > 0:  # keys every row sees
        parts.append(Part(r0, r0 + n_q, c0, c0 + band.hi, False))
    n_k -= band.hi
    c0 += band.hi
    square = min(n_q, n_k)  # the causal square (trimming left no more keys than rows)
    parts.append(Part(r0, r0 + square, c0, c0 + square, True))
    if n_q > square:  # rows below the square see all of its keys
        parts.append(Part(r0 + square, r0 + n_q, c0, c0 + n_k, False))
    return parts


def _rows_in_chunks(band, n_q, n_k, native, r0, c0, rows) -> list[Part]:
    parts = []
    for start in range(0, n_q, rows):
        end = min(n_q, start + rows)
        parts += _split(shifted(band, start, 0), end - start, n_k, native, r0 + start, c0)
    return parts


def whole(parts: tuple[Part, ...], n_q: int, n_k: int) -> bool:
    """One unflipped part covering the whole block: the kernel runs it directly."""
    return (len(parts) == 1 and not parts[0].flipped
            and (parts[0].r0, parts[0].r1, parts[0].c0, parts[0].c1) == (0, n_q, 0, n_k))


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _part_inputs(part: Part, rows_of: tuple[Tensor, ...], cols_of: tuple[Tensor, ...]):
    # narrow, not slicing: it also runs on fake CUDA tensors (op-schema tests of a CPU build)
    rows = [t.narrow(1, part.r0, part.r1 - part.r0) for t in rows_of]
    cols = [t.narrow(1, part.c0, part.c1 - part.c0) for t in cols_of]
    if part.flipped:
        rows, cols = [t.flip(1) for t in rows], [t.flip(1) for t in cols]
    return rows, cols


def run_parts(forward: Callable, q: Tensor, k: Tensor, v: Tensor, parts: tuple[Part, ...],
              scale: float) -> tuple[Tensor, Tensor]:
    """``forward(q, k, v, mask, scale) -> (out, lse)`` over the parts, merged per row; rows no
    part reaches keep output 0 and lse -inf."""
    acc = _accumulator(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)  # [B, Sq, H, D]
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc,
                     device=q.device)  # [B, H, Sq]
    for part in parts:
        (q_part,), (k_part, v_part) = _part_inputs(part, (q,), (k, v))
        out_part, lse_part = forward(q_part, k_part, v_part, part.mask, scale)
        if part.flipped:
            out_part, lse_part = out_part.flip(1), lse_part.flip(-1)
        merge_into(out.narrow(1, part.r0, part.r1 - part.r0),
                   lse.narrow(2, part.r0, part.r1 - part.r0), out_part, lse_part)
    return out.to(q.dtype), lse


def run_parts_backward(backward: Callable, dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       out: Tensor, lse: Tensor, parts: tuple[Part, ...], scale: float):
    """``backward(dout, q, k, v, out, lse, mask, scale)`` over the parts: each part gets its
    rows' whole out and lse, so its gradients are exact partials, summed here (fp32)."""
    acc = _accumulator(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    lse_rows = lse.transpose(1, 2)  # [B, Sq, H]: sliced and flipped along dim 1 like the rows
    for part in parts:
        (dout_p, q_p, out_p, lse_p), (k_p, v_p) = _part_inputs(
            part, (dout, q, out, lse_rows), (k, v))
        grads = backward(dout_p, q_p, k_p, v_p, out_p, lse_p.transpose(1, 2).contiguous(),
                         part.mask, scale)
        if part.flipped:
            grads = [g.flip(1) for g in grads]
        dq.narrow(1, part.r0, part.r1 - part.r0).add_(grads[0])
        dk.narrow(1, part.c0, part.c1 - part.c0).add_(grads[1])
        dv.narrow(1, part.c0, part.c1 - part.c0).add_(grads[2])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def run_any_band(forward: Callable, backward: Callable, native: Native | None):
    """``(forward, backward)`` of the kernel contract (any mask) from calls that run only the
    parts :func:`split_band` makes for ``native``; a block that is one part is a direct call."""

    def parts_of(q: Tensor, k: Tensor, mask: "bool | Band"):
        n_q, n_k = q.shape[1], k.shape[1]
        return split_band(as_band(mask, n_q, n_k), n_q, n_k, native), n_q, n_k

    def any_forward(q: Tensor, k: Tensor, v: Tensor, mask: "bool | Band", scale: float):
        parts, n_q, n_k = parts_of(q, k, mask)
        if whole(parts, n_q, n_k):
            return forward(q, k, v, parts[0].mask, scale)
        return run_parts(forward, q, k, v, parts, scale)

    def any_backward(dout, q, k, v, out, lse, mask: "bool | Band", scale: float):
        parts, n_q, n_k = parts_of(q, k, mask)
        if whole(parts, n_q, n_k):
            return backward(dout, q, k, v, out, lse, parts[0].mask, scale)
        return run_parts_backward(backward, dout, q, k, v, out, lse, parts, scale)

    return any_forward, any_backward


def banded(kernel: Kernel) -> Kernel:
    """``kernel`` made to run any band: a kernel that runs only full blocks and causal squares
    (``bands=False``) gets its bands as parts of those; one that runs bands is returned as is."""
    if kernel.bands:
        return kernel
    forward, backward = run_any_band(kernel.forward, kernel.backward, None)
    return replace(kernel, forward=forward, backward=backward, bands=True)
