"""What may attend to what: causal, sliding windows, packed documents, padding — one description.

An :class:`AttentionMask` describes the mask of the **global** sequence, the same on every rank
(like the positions of :func:`usp.sequence_positions`): key position ``j`` is visible to query
position ``i`` iff

- both are tokens of the same document (``documents``: one id per position, ``-1`` for a position
  that is no token at all — padding, or the slots a layout adds to split an uneven length);
- ``j <= i`` when ``causal``;
- ``i - left <= j <= i + right`` for a ``window=(left, right)`` (flash-attn's convention, ``-1``
  unbounded on that side; ``causal`` with a window is ``(left, 0)``).

Documents must be contiguous runs of positions (as packed sequences are). For each query position
the visible keys are then one interval of positions, ``[first_key(i), last_key(i)]``, which is
all the ring's schedule needs (:mod:`usp.schedule`). Documents may differ between batch rows.

Inside one block (a kernel call) the mask is a :class:`Band`: query ``i`` sees key ``j`` iff
``lo <= j - i <= hi``, both counted from the block's corner — causal, sliding windows, document
boundaries and the stripe layout's strictly lower blocks all become one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from usp.mask_args import cumulative_lengths, document_ids, token_flags, window_sides

Tensor = torch.Tensor
NOT_A_TOKEN = -1


# ------------------------------------------------------------------------- inside one block
@dataclass(frozen=True)
class Band:
    """Query ``i`` sees key ``j`` iff ``lo <= j - i <= hi`` (None: unbounded on that side)."""

    lo: int | None = None
    hi: int | None = None

    def visible(self, n_q: int, n_k: int, device=None) -> Tensor:
        """The ``[n_q, n_k]`` boolean mask of this band."""
        offset = (torch.arange(n_k, device=device)[None, :]
                  - torch.arange(n_q, device=device)[:, None])  # j - i
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
        if self.lo is not None:
            mask &= offset >= self.lo
        if self.hi is not None:
            mask &= offset <= self.hi
        return mask


CAUSAL = Band(None, 0)


def as_band(mask: "bool | Band", n_q: int, n_k: int) -> Band | None:
    """``mask`` as a band, or None when it hides nothing in an ``n_q x n_k`` block."""
    band = (CAUSAL if mask else None) if isinstance(mask, bool) else mask
    if band is None:
        return None
    lo = None if band.lo is None or band.lo <= -(n_q - 1) else band.lo
    hi = None if band.hi is None or band.hi >= n_k - 1 else band.hi
    return None if lo is None and hi is None else Band(lo, hi)


def visible_box(band: Band | None, n_q: int, n_k: int) -> tuple[int, int, int, int] | None:
    """``(row_start, row_end, col_start, col_end)``: the rows that see a key and the columns some
    row sees, under ``band`` in an ``n_q x n_k`` block; None when nothing is visible."""
    if band is None:
        return (0, n_q, 0, n_k) if n_q and n_k else None
    lo = -(n_q + n_k) if band.lo is None else band.lo
    hi = n_q + n_k if band.hi is None else band.hi
    # row i sees [i + lo, i + hi] within [0, n_k); column j is seen by rows [j - hi, j - lo]
    row_start, row_end = max(0, -hi), min(n_q, n_k - lo)
    col_start, col_end = max(0, lo), min(n_k, n_q - 1 + hi + 1)
    if lo > hi or row_start >= row_end or col_start >= col_end:
        return None
    return row_start, row_end, col_start, col_end


def shifted(band: Band | None, rows: int, cols: int) -> Band | None:
    """``band`` seen from a sub-block starting ``rows`` rows and ``cols`` columns in."""
    if band is None:
        return None
    delta = cols - rows  # j - i grows by the row offset and shrinks by the column offset
    return Band(None if band.lo is None else band.lo - delta,
                None if band.hi is None else band.hi - delta)


def is_causal_square(band: Band | None, n_q: int, n_k: int) -> bool:
    """True when ``band`` is the plain top-left causal mask of a square block."""
    return band is not None and n_q == n_k and band.lo is None and band.hi == 0



# ------------------------------------------------------------------------- the global sequence
def documents_from_cu_seqlens(cu_seqlens, seq_len: int) -> Tensor:
    """Document ids ``[S]`` from flash-attn's cumulative lengths ``[0, l0, l0 + l1, ..., total]``;
    positions past ``total`` are no token."""
    cu = cumulative_lengths(cu_seqlens, seq_len)
    lengths = cu[1:] - cu[:-1]
    ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return torch.cat([ids, torch.full((seq_len - ids.numel(),), NOT_A_TOKEN)])


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """The mask of a global sequence of ``seq_len`` slots (see the module docstring).

    ``documents``: ``[B, S]`` (or ``[1, S]`` shared by every batch row) document ids, ``-1`` where
    there is no token; None: one document over every slot.
    """

    seq_len: int
    causal: bool = False
    window: tuple[int, int] | None = None
    documents: Tensor | None = None
    _bounds: dict = field(default_factory=dict, repr=False, compare=False)  # computed once

    @classmethod
    def build(cls, seq_len: int, *, causal: bool = False, window=None, documents=None,
              cu_seqlens=None, padding_mask=None, real_len: int | None = None) -> "AttentionMask":
        """From what a caller has: ``documents`` (an id per position, ``[S]`` or ``[B, S]``) or
        flash-attn's ``cu_seqlens``; ``padding_mask`` ``[S]`` or ``[B, S]`` (True or 1 = a token,
        as Hugging Face passes it); ``real_len``: the real length when the layout padded the
        sequence to ``seq_len`` slots (per-position arguments then cover ``real_len`` or
        ``seq_len`` positions). Every argument is checked (:mod:`usp.mask_args`): a ValueError
        names what is wrong; nothing is rounded or padded silently."""
        if not isinstance(causal, bool):
            raise ValueError(f"causal={causal!r} must be True or False")
        real_len = seq_len if real_len is None else real_len
        lengths = (real_len, seq_len)
        window = window_sides(window, real_len)
        if window is not None and causal:
            window = (window[0], 0)  # causal: nothing to the right
        if window == (-1, -1) or (causal and window is not None and window[0] == -1):
            window = None  # a window that reaches past both ends (or causal's own) is none
        if documents is not None and cu_seqlens is not None:
            raise ValueError("pass documents (an id per position) or cu_seqlens, not both")
        ids = None
        if cu_seqlens is not None:
            ids = documents_from_cu_seqlens(cu_seqlens, real_len)[None]
        elif documents is not None:
            ids = document_ids(documents, lengths)
        if padding_mask is not None:
            padding = token_flags(padding_mask, lengths)
            if ids is None:
                ids = torch.zeros(padding.shape, dtype=torch.int64)
            elif ids.shape[-1] != padding.shape[-1]:  # one covers the real length, one the slots
                ids, padding = _to_length(ids, seq_len), _to_length(padding, seq_len, fill=False)
            if 1 not in (ids.shape[0], padding.shape[0]) and ids.shape[0] != padding.shape[0]:
                raise ValueError(f"documents have {ids.shape[0]} batch rows, padding_mask "
                                 f"{padding.shape[0]}: give one row for all, or one per row")
            rows = max(ids.shape[0], padding.shape[0])
            ids = torch.where(padding.expand(rows, -1), ids.expand(rows, -1), NOT_A_TOKEN)
        if ids is not None:
            ids = _to_length(ids, seq_len)  # the slots the layout added are no token
        if real_len < seq_len:
            ids = torch.zeros(1, seq_len, dtype=torch.int64) if ids is None else ids.clone()
            ids[:, real_len:] = NOT_A_TOKEN
        if ids is not None:
            _check_contiguous(ids)
        return cls(seq_len, causal, window, ids)

    # ---------------------------------------------------------------------- queries
    @property
    def trivial(self) -> bool:
        """No window and no documents: plain causal or full attention."""
        return self.window is None and self.documents is None

    @property
    def batch_rows(self) -> int:
        """How many different rows the mask has (1: shared by the whole batch)."""
        return 1 if self.documents is None else self.documents.shape[0]

    def documents_digest(self) -> str | None:
        """A short fingerprint of the documents and padding (ranks agree on it before a call)."""
        if self.documents is None:
            return None
        if "digest" not in self._bounds:  # the documents never change: hash them once
            self._bounds["digest"] = hashlib.blake2b(self.documents.numpy().tobytes(),
                                                     digest_size=8).hexdigest()
        return self._bounds["digest"]

    def digest(self) -> tuple:
        """The whole mask, in a form that compares and hashes cheaply."""
        return (self.seq_len, self.causal, self.window, self.documents_digest())

    def key_bounds(self, row: int = 0) -> tuple[Tensor, Tensor]:
        """``(first_key, last_key)`` ``[S]``: the visible key positions of each query position
        of batch row ``row`` are ``first_key[i] .. last_key[i]`` (empty when first > last)."""
        if ("bounds", row) not in self._bounds:
            self._bounds[("bounds", row)] = self._compute_bounds(row)
        return self._bounds[("bounds", row)]

    def _compute_bounds(self, row: int) -> tuple[Tensor, Tensor]:
        positions = torch.arange(self.seq_len)
        first = torch.zeros(self.seq_len, dtype=torch.int64)
        last = torch.full((self.seq_len,), self.seq_len - 1, dtype=torch.int64)
        if self.documents is not None:
            ids = self.documents[row]
            change = torch.ones(self.seq_len, dtype=torch.bool)
            change[1:] = ids[1:] != ids[:-1]
            starts = torch.nonzero(change).flatten()
            ends = torch.cat([starts[1:], torch.tensor([self.seq_len])]) - 1
            run = torch.cumsum(change.long(), 0) - 1  # the run each position is in
            first, last = starts[run], ends[run]
            token = ids != NOT_A_TOKEN
            first, last = torch.where(token, first, 1), torch.where(token, last, 0)
        if self.causal:
            last = torch.minimum(last, positions)
        if self.window is not None:
            left, right = self.window
            if left >= 0:
                first = torch.maximum(first, positions - left)
            if right >= 0:
                last = torch.minimum(last, positions + right)
        return first, last

    def visible(self, row: int = 0) -> Tensor:
        """The dense ``[S, S]`` mask of batch row ``row`` (tests and references only)."""
        first, last = self.key_bounds(row)
        keys = torch.arange(self.seq_len)
        return (keys[None, :] >= first[:, None]) & (keys[None, :] <= last[:, None])


def _to_length(values: Tensor, seq_len: int, fill=NOT_A_TOKEN) -> Tensor:
    """``[B, L]`` -> ``[B, seq_len]`` (``L`` is the real length or ``seq_len``, checked by
    :mod:`usp.mask_args`): the slots the layout added past the real length get ``fill``."""
    if values.shape[-1] == seq_len:
        return values
    pad = torch.full((values.shape[0], seq_len - values.shape[-1]), fill, dtype=values.dtype)
    return torch.cat([values, pad], dim=-1)


def _check_contiguous(ids: Tensor) -> None:
    """Each document id must be one run of positions (packed documents are)."""
    for row, row_ids in enumerate(ids):
        change = torch.ones(row_ids.numel(), dtype=torch.bool)
        change[1:] = row_ids[1:] != row_ids[:-1]
        runs = row_ids[change]
        runs = runs[runs != NOT_A_TOKEN]
        if runs.numel() != torch.unique(runs).numel():
            raise ValueError(
                f"documents of batch row {row}: a document id appears in two separate runs of "
                "positions; each document must be one contiguous run (as packed sequences are)"
            )
