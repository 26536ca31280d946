"""The CPU flash kernel: aten's ``_scaled_dot_product_flash_attention_for_cpu`` and its backward.

It takes ``[B, H, S, D]`` views, handles GQA natively, aligns the causal mask top-left and returns
the log-sum-exp, so the adapter mostly transposes. Bands (windows, the stripe layout's strictly
lower blocks) have no switch in the op; they run through its additive ``attn_mask``, in chunks of
:data:`BAND_ROWS` query rows, each against only the keys its rows can see, so the work and the
mask grow with the band's width, not with the block. Two quirks of the op are corrected here: a
query row holding a NaN comes back as output 0 and lse 0 instead of NaN, which would let a NaN
vanish silently; a row that sees no key gets lse 0 (never handed to it: every band row sees one).
"""

from __future__ import annotations

import torch

from usp.attention.kernels.base import HALF, Band, Kernel, as_band, shifted, visible_box

Tensor = torch.Tensor
aten = torch.ops.aten
BAND_ROWS = 512


def _bhsd(t: Tensor) -> Tensor:
    return t.transpose(1, 2)  # [B, S, H, D] <-> [B, H, S, D], a view


def _call_arguments(band: Band | None, n_q: int, n_k: int, dtype, device) -> dict:
    """``is_causal`` / ``attn_mask`` for one call on an ``n_q x n_k`` block."""
    band = as_band(band, n_q, n_k)
    if band is None:
        return {"is_causal": False}
    if band.lo is None and band.hi == 0:  # the op's own causal mask is top-left too
        return {"is_causal": True}
    hidden = ~band.visible(n_q, n_k, device)
    return {"is_causal": False,
            "attn_mask": torch.zeros(n_q, n_k, dtype=dtype, device=device).masked_fill(
                hidden, float("-inf"))}


def _plain(band: Band | None) -> bool:
    """The op runs this mask in one call (no mask, or its own top-left causal one)."""
    return band is None or (band.lo is None and band.hi == 0)


def _chunks(band: Band, n_q: int, n_k: int):
    """``(rows, cols, band)``: a band cut into chunks of rows, each with just the columns its
    rows see, and trimmed to its rows that see a key (the others see none)."""
    for start in range(0, n_q, BAND_ROWS):
        end = min(n_q, start + BAND_ROWS)
        box = visible_box(shifted(band, start, 0), end - start, n_k)
        if box is None:
            continue
        row_start, row_end, col_start, col_end = box
        yield (slice(start + row_start, start + row_end), slice(col_start, col_end),
               shifted(band, start + row_start, col_start))


def _forward_call(q, k, v, band, scale):
    options = _call_arguments(band, q.shape[1], k.shape[1], q.dtype, q.device)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, scale=scale, **options)
    return _bhsd(out), lse  # [B, H, S, D] -> [B, S, H, D]


def cpu_flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: "bool | Band", scale: float):
    band = as_band(causal, q.shape[1], k.shape[1])
    if _plain(band):
        out, lse = _forward_call(q, k, v, band, scale)
    else:  # rows that see no key keep output 0 and lse -inf
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"),
                         dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        for rows, cols, piece in _chunks(band, q.shape[1], k.shape[1]):
            out[:, rows], lse[:, :, rows] = _forward_call(q[:, rows], k[:, cols], v[:, cols],
                                                          piece, scale)
    nan_rows = q.isnan().any(dim=-1)  # [B, S, H]
    if nan_rows.any():
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
    accumulate = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.shape, dtype=accumulate, device=k.device)
    dv = torch.zeros(v.shape, dtype=accumulate, device=v.device)
    for rows, cols, piece in _chunks(band, q.shape[1], k.shape[1]):
        n_q, n_k = rows.stop - rows.start, cols.stop - cols.start
        options = _call_arguments(piece, n_q, n_k, q.dtype, q.device)
        dq_rows, dk_cols, dv_cols = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout[:, rows]), _bhsd(q[:, rows]), _bhsd(k[:, cols]), _bhsd(v[:, cols]),
            _bhsd(out[:, rows]), lse[:, :, rows].contiguous(), 0.0, scale=scale, **options)
        dq[:, rows] = _bhsd(dq_rows)
        dk[:, cols] += _bhsd(dk_cols)
        dv[:, cols] += _bhsd(dv_cols)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


CPU_FLASH = Kernel(
    "cpu_flash", "cpu", (torch.float64, torch.float32) + HALF, cpu_flash_forward,
    cpu_flash_backward, upcast_half_backward=True,
)
