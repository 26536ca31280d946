"""The masks ``usp bench attention --mask`` measures: a long-tailed pack of documents, or a
sliding window; and how much of dense causal attention's work each leaves."""

from __future__ import annotations

import torch

from usp.mask import AttentionMask
from usp.schedule import RingSchedule


def long_tail_cu_seqlens(seq_len: int, seed: int = 0) -> torch.Tensor:
    """Packed documents with a long tail: one of half the sequence, the rest 1/64 to 1/16 of it
    (at 32K tokens: one of 16K and many of 0.5K-2K), shuffled."""
    generator = torch.Generator().manual_seed(seed)
    lengths, left = [seq_len // 2], seq_len - seq_len // 2
    while left > 0:
        length = int(torch.randint(seq_len // 64, seq_len // 16 + 1, (1,), generator=generator))
        lengths.append(min(left, max(1, length)))
        left -= lengths[-1]
    order = torch.randperm(len(lengths), generator=generator).tolist()
    return torch.tensor([0] + torch.tensor([lengths[i] for i in order]).cumsum(0).tolist())


def mask_options(shape, mask: str) -> dict:
    """usp_attention's mask keywords for ``mask`` on a ``BenchShape``."""
    if mask == "packed":
        return {"cu_seqlens": long_tail_cu_seqlens(shape.seq_len)}
    if mask == "window":
        return {"window": (shape.window - 1, 0 if shape.causal else shape.window - 1)}
    return {}


def work_vs_dense(shape, config) -> float:
    """The (query, key) pairs a ``BenchConfig``'s mask computes, over those of dense attention."""
    def pairs(mask: str) -> int:
        attention_mask = AttentionMask.build(shape.seq_len, causal=shape.causal,
                                             **mask_options(shape, mask))
        schedule = RingSchedule(attention_mask, config.layout, config.ring)
        return sum(piece.area for rank in range(config.ring) for source in range(config.ring)
                   for piece in schedule.pieces(rank, source))
    return pairs(config.mask) / pairs("dense")
