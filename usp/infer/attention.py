"""Attention against a sharded KV cache: the pass-KV and pass-Q rings, and decode.

All three run over the whole sequence group (``ring x ulysses = N`` ranks) as one ring: the cache
keeps every head of a rank's tokens on that rank, so there is nothing for a Ulysses all-to-all to
split (the prompt's first prefill, with no cache yet, runs :func:`usp.usp_attention` instead).
Keys are visible to a query when their global position is not later (causal); since a rank's
positions increase, the keys a query row sees in any block are a prefix of it, and
:func:`usp.schedule.pieces_of` cuts the rows into rectangles with bands that one kernel call each
runs. Every block result is an ``(out, lse)`` pair merged by :func:`usp.attention.merge.merge_into`.

- **pass-KV**: each rank's cache shard (padded to the longest) travels around the ring; the
  queries stay home.
- **pass-Q**: the queries travel around the ring against stationary caches; each rank keeps the
  partial ``(out, lse)`` of every source's queries, one all-to-all returns them home, and the
  owner merges its N partials.
- **decode**: one query token, the same on every rank, meets the rank's shard in one kernel call;
  one all-gather of ``(out, lse)`` per layer, merged in group order, gives every rank the same
  result.

Which ring: Yang et al., "Context Parallelism for Scalable Million-Token Inference" (arXiv
2411.01783), eq. (1) and Algorithm 1; see :func:`choose_ring_pass`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp.attention.kernels import Kernel
from usp.attention.merge import add_sinks, merge_into
from usp.attention.ring import rotating_blocks
from usp.choices import RING_PASSES
from usp.comm import all_gather_stacked, exchange_all_to_all
from usp.p2p import GroupRing, SelfRing
from usp.schedule import Piece, pieces_of

Tensor = torch.Tensor


def choose_ring_pass(new_tokens: int, cached_tokens: int, n_heads: int, n_kv_heads: int, *,
                     ranks: int = 1, peak_flops: float | None = None,
                     bandwidth: float | None = None, element_bytes: int = 2) -> str:
    """``"kv"`` or ``"q"``: which ring moves fewer bytes for ``T = new_tokens`` queries against
    ``T + P`` keys (``P = cached_tokens``), following Algorithm 1 of arXiv 2411.01783.

    Per ring step a rank sends its K/V shard, ``2·Hkv·(T+P)/N·D`` elements, under pass-KV, or
    its queries, ``Hq·T/N·D``, under pass-Q; so pass-Q sends less exactly when
    ``T/(T+P) < 2·Hkv/Hq`` (the paper's eq. 1: the KV-cache miss rate against a constant of the
    model). The paper also keeps pass-KV whenever its traffic hides under the attention compute,
    ``T >= N·C·Hkv·e / (2·Hq·BW)`` (eq. 2); that test runs when ``peak_flops`` (C, per rank)
    and ``bandwidth`` (BW, bytes/s) are given, with ``element_bytes`` (e) per element.
    """
    if new_tokens < 1 or cached_tokens < 0:
        raise ValueError(f"new_tokens={new_tokens} must be >= 1 and cached_tokens="
                         f"{cached_tokens} >= 0")
    if (peak_flops is None) != (bandwidth is None):
        raise ValueError("give both peak_flops and bandwidth (the compute-overlap test), or "
                         "neither")
    if peak_flops is not None and new_tokens >= (
            ranks * peak_flops * n_kv_heads * element_bytes / (2 * n_heads * bandwidth)):
        return "kv"
    miss_rate = new_tokens / (new_tokens + cached_tokens)
    return "kv" if miss_rate >= 2 * n_kv_heads / n_heads else "q"


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_pieces(q_positions: Tensor, k_positions: Tensor) -> list[Piece]:
    """The pieces in which queries at ``q_positions`` see keys at ``k_positions`` (both
    increasing; a query at position -1 sees nothing): key ``j`` is visible to query ``i`` iff
    ``k_positions[j] <= q_positions[i]``, a prefix of the keys for every row."""
    visible = torch.searchsorted(k_positions, q_positions, right=True)
    return pieces_of(torch.zeros_like(visible), visible)


def attend_pieces(q: Tensor, k: Tensor, v: Tensor, pieces: list[Piece], scale: float,
                  kernel: Kernel) -> tuple[Tensor, Tensor]:
    """``(out [B, Tq, Hq, D], lse [B, Hq, Tq])`` in the accumulator dtype over ``pieces``; rows
    no piece covers keep out 0 and lse -inf."""
    acc = accumulator_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc,
                     device=q.device)
    for piece in pieces:
        rows, cols = slice(piece.q_start, piece.q_end), slice(piece.k_start, piece.k_end)
        block_out, block_lse = kernel.forward(q[:, rows], k[:, cols], v[:, cols],
                                              piece.band if piece.band is not None else False,
                                              scale)
        merge_into(out[:, rows], lse[:, :, rows], block_out, block_lse)
    return out, lse


def pack(out: Tensor, lse: Tensor) -> Tensor:
    """``out [B, T, H, D]``, ``lse [B, H, T]`` -> ``[B, T, H, D + 1]``: one message for both."""
    return torch.cat([out, lse.transpose(1, 2).unsqueeze(-1).to(out.dtype)], dim=-1)


def merge_packed(parts: Tensor) -> tuple[Tensor, Tensor]:
    """Merge ``[N, B, T, H, D + 1]`` packed partials in index order -> ``(out, lse)``."""
    out = torch.zeros_like(parts[0, ..., :-1])  # [B, T, H, D]
    lse = torch.full_like(parts[0, ..., -1].transpose(1, 2), float("-inf"))  # [B, H, T]
    for part in parts:
        merge_into(out, lse, part[..., :-1], part[..., -1].transpose(1, 2))
    return out, lse


def _ring(group: dist.ProcessGroup | None):
    return SelfRing() if group is None else GroupRing(group)


def pass_kv_attention(q: Tensor, k: Tensor, v: Tensor, key_rows: int,
                      pieces_by_source: list[list[Piece]], group: dist.ProcessGroup | None,
                      scale: float, kernel: Kernel) -> Tensor:
    """Queries ``q [B, Tq, Hq, D]`` stay; this rank's cache shard ``k, v [B, n, Hkv, D]``,
    zero-padded to the longest shard's ``key_rows``, travels the ring. ``pieces_by_source[g]``:
    the pieces of our queries against group rank ``g``'s shard. Returns ``[B, Tq, Hq, D]``."""
    ring = _ring(group)
    kv = k.new_zeros(2, k.shape[0], key_rows, k.shape[2], k.shape[3])  # [2, B, L, Hkv, D]
    kv[0, :, :k.shape[1]], kv[1, :, :v.shape[1]] = k, v
    acc = accumulator_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc,
                     device=q.device)
    for source, block in rotating_blocks(kv, ring, ring.size):
        merge_into(out, lse, *attend_pieces(q, block[0], block[1], pieces_by_source[source],
                                            scale, kernel))
    return out.to(q.dtype)


def pass_q_attention(q: Tensor, k: Tensor, v: Tensor, pieces_by_source: list[list[Piece]],
                     group: dist.ProcessGroup | None, scale: float, kernel: Kernel) -> Tensor:
    """This rank's cache shard ``k, v`` stays; the queries ``q [B, Tq, Hq, D]`` (the same
    ``Tq`` on every rank) travel the ring. ``pieces_by_source[g]``: group rank ``g``'s queries
    against our shard. The partials go home in one all-to-all and merge there."""
    ring = _ring(group)
    acc = accumulator_dtype(q.dtype)
    batch, rows, heads, dim = q.shape
    partials = torch.empty(ring.size, batch, rows, heads, dim + 1, dtype=acc, device=q.device)
    for source, block in rotating_blocks(q, ring, ring.size):
        partials[source] = pack(*attend_pieces(block, k, v, pieces_by_source[source], scale,
                                               kernel))
    if group is not None:
        partials = exchange_all_to_all(partials, group)  # [N (key holder), B, Tq, Hq, D + 1]
    return merge_packed(partials)[0].to(q.dtype)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None,
                     scale: float, kernel: Kernel, sinks: Tensor | None = None) -> Tensor:
    """``q [B, 1, Hq, D]``, the same on every rank, against this rank's whole shard (every
    cached position precedes the query's): one kernel call, one all-gather, one merge;
    ``sinks`` [Hq] join the merged result once (:func:`usp.attention.merge.add_sinks`)."""
    pieces = [Piece(0, q.shape[1], 0, k.shape[1], None)] if k.shape[1] else []
    partial = pack(*attend_pieces(q, k, v, pieces, scale, kernel))
    if group is None:
        out, lse = partial[..., :-1], partial[..., -1].transpose(1, 2)
    else:
        gathered = all_gather_stacked(partial, group)  # [N, B, 1, Hq, D + 1], group order
        out, lse = merge_packed(gathered)
    if sinks is not None:
        out, _ = add_sinks(out, lse, sinks)
    return out.to(q.dtype)
