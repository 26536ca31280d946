"""The ring's schedule: at each step, which query rows meet which key rows, under what band.

At step ``s`` ring rank ``r`` holds the key block of ``source = (r - s) mod R``. Both blocks list
their global positions in increasing order (every layout does), so the keys a query row may see
under an :class:`~usp.mask.AttentionMask` — one interval of positions — are one interval of local
key indices, ``[a(i), b(i))``, found by binary search. Rows with empty intervals are skipped.

Consecutive rows whose interval ends each move as ``max(c0, i + lo)`` and ``min(c1, i + hi + 1)``
(an edge that stays put, then follows a diagonal, or the reverse) form one :class:`Piece`: a
rectangle of rows and columns with a :class:`~usp.attention.kernels.Band`, which every kernel
runs in one call. Dense causal attention under zigzag or stripe gives one piece per step (the
diagonal block, or a full block); documents cut pieces at their boundaries; a sliding window
makes one band piece per block it reaches. Blocks that share nothing give no piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


from usp.layout import ring_block_positions
from usp.mask import AttentionMask, Band

Tensor = torch.Tensor


@dataclass(frozen=True)
class Piece:
    """Query rows ``[q_start, q_end)`` meet key rows ``[k_start, k_end)`` under ``band`` (counted
    from the piece's corner; None: all of them), for batch rows ``batch`` (None: all)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    band: Band | None
    batch: slice | None = None

    @property
    def area(self) -> int:
        """How many (query, key) pairs the piece holds (the band's, not the rectangle's)."""
        n_q, n_k = self.q_end - self.q_start, self.k_end - self.k_start
        if self.band is None:
            return n_q * n_k
        rows = torch.arange(n_q)
        first = rows + self.band.lo if self.band.lo is not None else torch.zeros_like(rows)
        last = rows + self.band.hi if self.band.hi is not None else torch.full_like(rows, n_k - 1)
        return int((last.clamp(max=n_k - 1) - first.clamp(min=0) + 1).clamp(min=0).sum())


def key_intervals(q_positions: Tensor, k_positions: Tensor, mask: AttentionMask,
                  row: int = 0) -> tuple[Tensor, Tensor]:
    """``(a, b)`` ``[Lq]``: query row ``i`` sees key rows ``a[i] <= j < b[i]``."""
    first, last = mask.key_bounds(row)
    a = torch.searchsorted(k_positions, first[q_positions], side="left")
    b = torch.searchsorted(k_positions, last[q_positions], side="right")
    return a, torch.maximum(a, b)


def pieces_of(a: Tensor, b: Tensor, batch: slice | None = None) -> list[Piece]:
    """Cut the rows' key intervals into pieces (see the module docstring)."""
    rows = a.numel()
    nonempty = b > a
    if rows == 0 or not bool(nonempty.any()):
        return []
    da, db = a[1:] - a[:-1], b[1:] - b[:-1]
    breaks = torch.zeros(rows, dtype=torch.bool)  # breaks[i]: a new piece starts at row i
    breaks[0] = True
    breaks[1:] |= (da > 1) | (db > 1) | (da < 0) | (db < 0)
    breaks[1:] |= nonempty[1:] != nonempty[:-1]
    breaks[2:] |= (da[1:] == 0) & (da[:-1] == 1)  # the left edge stopped following a diagonal
    breaks[2:] |= (db[1:] == 1) & (db[:-1] == 0)  # the right edge started following one
    starts = torch.nonzero(breaks).flatten().tolist() + [rows]
    a_list, b_list, da_list = a.tolist(), b.tolist(), da.tolist()
    db_list = db.tolist()
    pieces = []
    for start, end in zip(starts[:-1], starts[1:]):
        if a_list[start] >= b_list[start]:
            continue
        c0, c1 = a_list[start], b_list[end - 1]
        # the left edge follows i + LO from its first rise on; the right edge i + HI + 1 from
        # the first row while it rises
        rise = next((i + 1 for i in range(start, end - 1) if da_list[i] == 1), None)
        lo = None if rise is None else (a_list[rise] - rise) - (c0 - start)
        rising = end - start > 1 and db_list[start] == 1
        hi = None if not rising else (b_list[start] - start - 1) - (c0 - start)
        band = None if lo is None and hi is None else Band(lo, hi)
        pieces.append(Piece(start, end, c0, c1, band, batch))
    return pieces


SCHEDULES_KEPT = 64
_schedules: dict[tuple, "RingSchedule"] = {}


def schedule_for(mask: AttentionMask, layout: str, ring_size: int) -> "RingSchedule":
    """The schedule of ``mask`` on a ring, kept across calls (every layer of a model, and the
    backward, use the same one)."""
    key = (mask.digest(), layout, ring_size)
    if key not in _schedules:
        if len(_schedules) >= SCHEDULES_KEPT:
            _schedules.pop(next(iter(_schedules)))
        _schedules[key] = RingSchedule(mask, layout, ring_size)
    return _schedules[key]


class RingSchedule:
    """The pieces of every (rank, source) of one ring under one mask, computed once and kept."""

    def __init__(self, mask: AttentionMask, layout: str, ring_size: int) -> None:
        self.mask, self.layout, self.ring_size = mask, layout, ring_size
        self._pieces: dict[tuple[int, int], list[Piece]] = {}

    def positions(self, ring_rank: int) -> Tensor:
        return ring_block_positions(self.mask.seq_len, self.ring_size, ring_rank, self.layout)

    def pieces(self, ring_rank: int, source: int) -> list[Piece]:
        key = (ring_rank, source)
        if key not in self._pieces:
            q_positions, k_positions = self.positions(ring_rank), self.positions(source)
            rows = self.mask.batch_rows
            self._pieces[key] = [
                piece
                for row in range(rows)
                for piece in pieces_of(*key_intervals(q_positions, k_positions, self.mask, row),
                                       None if rows == 1 else slice(row, row + 1))
            ]
        return self._pieces[key]

    def last_step(self) -> int:
        """The last ring step at which any rank has work (steps after it need no transfer)."""
        return max((step for rank in range(self.ring_size) for step in range(self.ring_size)
                    if self.pieces(rank, (rank - step) % self.ring_size)), default=0)
