"""The CPU flash kernel: aten's ``_scaled_dot_product_flash_attention_for_cpu`` and its backward.

It takes ``[B, H, S, D]`` views, handles GQA natively, aligns the causal mask top-left and returns
the log-sum-exp, so the adapter mostly transposes. Bands (windows, the stripe layout's strictly
lower blocks) have no switch in the op. A band runs in chunks of query rows (:data:`BAND_ROWS`),
each against only the keys its rows can see, split three ways: the columns the band's lower edge
cuts (the op's additive ``attn_mask``; the chunks' masks are alike, so one is built and kept),
the columns every row sees (no mask), and the columns the upper edge cuts (the op's own causal
mask). The parts of a row merge like ring blocks, so the work grows with the band's width and
little more. Two quirks of the op are corrected here: a
query row holding a NaN comes back as output 0 and lse 0 instead of NaN, which would let a NaN
vanish silently; a row that sees no key gets lse 0 (never handed to it: every band row sees one).
"""

from __future__ import annotations

import torch

from usp.attention.kernels.base import HALF, Kernel
from usp.mask import Band, as_band, shifted, visible_box
from usp.attention.merge import merge_into

Tensor = torch.Tensor
aten = torch.ops.aten
# rows per band chunk: about an eighth of the band's width (a chunk computes its rows against
# the band's width plus its own height), within 64..512 (fewer calls vs less wasted area)
BAND_ROWS = (64, 512)
SPLIT_ROWS = 256  # chunks at least this tall split into masked, plain and causal calls (measured:
# below it, the extra calls cost more than the mask they save)


def _bhsd(t: Tensor) -> Tensor:
    return t.transpose(1, 2)  # [B, S, H, D] <-> [B, H, S, D], a view


def _call_arguments(band: Band | None, n_q: int, n_k: int, dtype, device) -> dict:
    """``is_causal`` / ``attn_mask`` for one call on an ``n_q x n_k`` block."""
    band = as_band(band, n_q, n_k)
    if band is None:
        return {"is_causal": False}
    if band.lo is None and band.hi == 0:  # the op's own causal mask is top-left too
        return {"is_causal": True}
    return {"is_causal": False, "attn_mask": _additive_mask(band, n_q, n_k, dtype, device)}


_masks: dict[tuple, torch.Tensor] = {}
MASKS_KEPT = 16


def _additive_mask(band: Band, n_q: int, n_k: int, dtype, device) -> torch.Tensor:
    """0 where ``band`` shows a key, -inf where it hides one; kept, since the chunks inside a band
    all look alike."""
    key = (band, n_q, n_k, dtype, device)
    if key not in _masks:
        if len(_masks) >= MASKS_KEPT:
            _masks.pop(next(iter(_masks)))
        hidden = ~band.visible(n_q, n_k, device)
        _masks[key] = torch.zeros(n_q, n_k, dtype=dtype, device=device).masked_fill(
            hidden, float("-inf"))
    return _masks[key]


def _plain(band: Band | None) -> bool:
    """The op runs this mask in one call (no mask, or its own top-left causal one)."""
    return band is None or (band.lo is None and band.hi == 0)


def _chunks(band: Band, n_q: int, n_k: int):
    """``(rows, cols, band)``: a band cut into chunks of rows, each with just the columns its
    rows see, and trimmed to its rows that see a key (the others see none)."""
    width = (n_k if band.hi is None else band.hi) - (-n_q if band.lo is None else band.lo) + 1
    rows = max(BAND_ROWS[0], min(BAND_ROWS[1], width // 8))
    for start in range(0, n_q, rows):
        end = min(n_q, start + rows)
        box = visible_box(shifted(band, start, 0), end - start, n_k)
        if box is None:
            continue
        row_start, row_end, col_start, col_end = box
        yield (start + row_start, start + row_end, col_start, col_end,
               shifted(band, start + row_start, col_start))


def _parts(band: Band, n_q: int, n_k: int):
    """``(rows, cols, band)`` calls covering a band: each chunk of rows split into the columns
    its lower edge cuts (a masked call), the columns all its rows see (a plain call) and the
    columns its upper edge cuts (the op's own causal mask, once trimmed)."""
    for r0, r1, c0, c1, chunk in _chunks(band, n_q, n_k):
        height, width = r1 - r0, c1 - c0
        lower_end = 0 if chunk.lo is None else max(0, min(width, height - 1 + chunk.lo))
        upper_start = width if chunk.hi is None else max(0, min(width, chunk.hi + 1))
        if lower_end > upper_start or height < SPLIT_ROWS:
            bounds = [0, width]  # a narrow band, or calls too small to split: one masked call
        else:
            bounds = sorted({0, lower_end, upper_start, width})
        for a, b in zip(bounds, bounds[1:]):
            part = shifted(chunk, 0, a)
            box = visible_box(part, height, b - a)
            if box is None:
                continue
            i0, i1, j0, j1 = box
            yield (slice(r0 + i0, r0 + i1), slice(c0 + a + j0, c0 + a + j1),
                   shifted(part, i0, j0))


def _forward_call(q, k, v, band, scale):
    options = _call_arguments(band, q.shape[1], k.shape[1], q.dtype, q.device)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, scale=scale, **options)
    return _bhsd(out), lse  # [B, H, S, D] -> [B, S, H, D]


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cpu_flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: "bool | Band", scale: float):
    band = as_band(causal, q.shape[1], k.shape[1])
    if _plain(band):
        out, lse = _forward_call(q, k, v, band, scale)
    else:  # parts merge per row; rows that see no key keep output 0 and lse -inf
        acc = _accumulator(q.dtype)
        out = torch.zeros(q.shape, dtype=acc)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc)
        for rows, cols, part in _parts(band, q.shape[1], k.shape[1]):
            merge_into(out[:, rows], lse[:, :, rows],
                       *_forward_call(q[:, rows], k[:, cols], v[:, cols], part, scale))
        out = out.to(q.dtype)
    # one reduction finds out whether q holds a NaN at all (a NaN always survives a sum; an
    # overflow to inf - inf only sends a NaN-free q down the exact path, which then finds none)
    if q.sum().isnan():
        nan_rows = q.isnan().any(dim=-1)  # [B, S, H]
        out = out.masked_fill(nan_rows.unsqueeze(-1), float("nan"))
        lse = lse.masked_fill(nan_rows.transpose(1, 2), float("nan"))
    return out, lse


def cpu_flash_backward(dout, q, k, v, out, lse, causal: "bool | Band", scale: float):
    band = as_band(causal, q.shape[1], k.shape[1])
    if _plain(band):
        options = _call_arguments(band, q.shape[1], k.shape[1], q.dtype, q.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, 0.0, scale=scale,
            **options)
        return _bhsd(dq), _bhsd(dk), _bhsd(dv)
    acc = _accumulator(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc)
    dk, dv = torch.zeros(k.shape, dtype=acc), torch.zeros(v.shape, dtype=acc)
    for rows, cols, part in _parts(band, q.shape[1], k.shape[1]):
        n_q, n_k = rows.stop - rows.start, cols.stop - cols.start
        options = _call_arguments(part, n_q, n_k, q.dtype, q.device)
        # every part's backward gets the rows' whole out and lse: exact partial gradients
        dq_rows, dk_cols, dv_cols = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout[:, rows]), _bhsd(q[:, rows]), _bhsd(k[:, cols]), _bhsd(v[:, cols]),
            _bhsd(out[:, rows]), lse[:, :, rows].contiguous(), 0.0, scale=scale, **options)
        dq[:, rows] += _bhsd(dq_rows)
        dk[:, cols] += _bhsd(dk_cols)
        dv[:, cols] += _bhsd(dv_cols)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


CPU_FLASH = Kernel(
    "cpu_flash", "cpu", (torch.float64, torch.float32) + HALF, cpu_flash_forward,
    cpu_flash_backward, upcast_half_backward=True,
)
