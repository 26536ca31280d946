"""The mask arguments a caller hands usp, checked before they mean anything: types, dtypes, shapes
and ranges, each refused with a ValueError naming the argument and the numbers.

Nothing is coerced silently: a float ``cu_seqlens`` or document id is refused, not truncated
(``[0, 5.9, 16]`` would otherwise become ``[0, 5, 16]``); a window side must be an int (``2.7``,
``inf`` and ``True`` are refused); a per-token mask must cover the sequence it describes, never a
prefix of it (a shorter one would silently mark the rest as padding). Window sides at or beyond
the sequence reach every key and become -1 (unbounded), so huge values cannot overflow.
"""

from __future__ import annotations

import numbers

import torch

Tensor = torch.Tensor
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def window_sides(window, seq_len: int) -> tuple[int, int] | None:
    """``window`` as ``(left, right)`` ints >= -1, a side reaching past the sequence as -1."""
    if window is None:
        return None
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise ValueError(f"window={window!r} must be a pair (left, right) of ints")
    sides = []
    for side in window:
        if isinstance(side, Tensor) and side.dim() == 0 and side.dtype in INTEGER_DTYPES:
            side = int(side)
        if isinstance(side, bool) or not isinstance(side, numbers.Integral):
            raise ValueError(f"window={window!r}: each side must be an int (>= 0, or -1 for "
                             f"unbounded), got {type(side).__name__} {side!r}")
        side = int(side)
        if side < -1:
            raise ValueError(f"window={window!r}: each side must be >= 0, or -1 for unbounded")
        sides.append(-1 if side >= seq_len - 1 else side)  # reaches every key of the sequence
    return sides[0], sides[1]


def _host_tensor(name: str, values) -> Tensor:
    """``values`` (a tensor on any real device, or a nested sequence of numbers) on the host."""
    if isinstance(values, Tensor):
        if values.device.type == "meta":
            raise ValueError(f"{name} is on the meta device: it must hold values")
        return values.detach().cpu()
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a tensor or a sequence of ints, got {values!r}")
    try:
        return torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a tensor or a sequence of ints: {exc}") from exc


def _integer(name: str, values: Tensor) -> Tensor:
    if values.dtype not in INTEGER_DTYPES:
        raise ValueError(f"{name} must hold integers, got dtype {values.dtype} (values are never "
                         "rounded: cast them to torch.int64 yourself if that is what you mean)")
    return values.to(torch.int64)


def _rows(name: str, values: Tensor, lengths: tuple[int, ...]) -> Tensor:
    """``[S]`` or ``[B, S]`` -> ``[B, S]``, refusing any other shape or a length not in
    ``lengths`` (the sequence's slots, or its real length before the layout padded it)."""
    if values.dim() not in (1, 2):
        raise ValueError(f"{name} must be [S] or [B, S] (one value per position), got shape "
                         f"{tuple(values.shape)}")
    if values.shape[-1] not in lengths:
        wanted = " or ".join(str(n) for n in sorted(set(lengths)))
        raise ValueError(f"{name} covers {values.shape[-1]} positions; the sequence has {wanted}")
    return values.reshape(-1, values.shape[-1])


def document_ids(documents, lengths: tuple[int, ...]) -> Tensor:
    """``documents`` as int64 ``[B, S]``: an id >= 0 per token, -1 for no token."""
    ids = _rows("documents", _integer("documents", _host_tensor("documents", documents)), lengths)
    if ids.numel() and int(ids.min()) < -1:
        raise ValueError(f"documents: ids must be >= 0, or -1 for no token; got {int(ids.min())}")
    return ids


def cumulative_lengths(cu_seqlens, total: int) -> Tensor:
    """flash-attn's ``cu_seqlens`` as int64 ``[N + 1]``, rising from 0 to at most ``total``."""
    cu = _integer("cu_seqlens", _host_tensor("cu_seqlens", cu_seqlens))
    if cu.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1], got shape {tuple(cu.shape)}")
    if cu.numel() < 2 or cu[0] != 0 or bool((cu[1:] < cu[:-1]).any()) or cu[-1] > total:
        raise ValueError(
            f"cu_seqlens must rise from 0 to at most the sequence length {total}; got "
            f"{cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}"
        )
    return cu


def token_flags(padding_mask, lengths: tuple[int, ...]) -> Tensor:
    """``padding_mask`` (bool, or integers 0/1 as Hugging Face passes it) as bool ``[B, S]``."""
    values = _host_tensor("padding_mask", padding_mask)
    if values.dtype != torch.bool:
        values = _integer("padding_mask", values)
        if values.numel() and not bool(((values == 0) | (values == 1)).all()):
            raise ValueError("padding_mask must hold True/False or 1/0 (1: a token), got other "
                             "values")
    return _rows("padding_mask", values, lengths).bool()
