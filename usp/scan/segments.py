"""Where the recurrent state restarts: packed documents as segments of a ring block.

A scan over packed documents must start every document from a zero state, exactly as if it ran
alone. The documents come as usp's masks take them (:class:`usp.AttentionMask`): ids per token
of the **global** sequence (``-1``: no token — padding, or the slots a layout adds to an uneven
length) or flash-attn's ``cu_seqlens``. Here they become **segments**: the index of each run of
equal ids, so two runs of padding are two segments too and nothing ever flows between runs.

A rank scans one contiguous block. The state may enter it only for the tokens of the
segment the block starts in, and only if that segment began before the block: the **entry
segment** is the segment of the token just before the block (none for the first block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from usp.mask import AttentionMask

Tensor = torch.Tensor
NO_SEGMENT = -1  # the entry of the first block: no token comes before it


@dataclass(frozen=True)
class BlockSegments:
    """The segments of one ring block: ``ids`` ``[rows, L]`` (``rows`` 1 when every batch row
    shares them) and ``entry`` ``[rows]``, the segment of the token before the block."""

    ids: Tensor
    entry: Tensor

    def to(self, device: torch.device) -> "BlockSegments":
        return BlockSegments(self.ids.to(device), self.entry.to(device))


def global_segments(slots: int, *, documents=None, cu_seqlens=None,
                    seq_len: int | None = None) -> Tensor | None:
    """``[rows, slots]`` segment ids of the global sequence, or None when the whole sequence is
    one run of tokens (no documents and no padding slots). Every argument is checked as
    :meth:`usp.AttentionMask.build` checks it (a ValueError names what is wrong)."""
    mask = AttentionMask.build(slots, documents=documents, cu_seqlens=cu_seqlens,
                               real_len=slots if seq_len is None else seq_len)
    if mask.documents is None:
        return None
    ids = mask.documents
    change = torch.ones_like(ids, dtype=torch.bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return torch.cumsum(change.long(), dim=1) - 1


def block_segments(segments: Tensor | None, blocks: int, index: int) -> BlockSegments | None:
    """The segments of block ``index`` of ``segments`` ``[rows, S]`` cut into ``blocks`` equal
    contiguous blocks (the ring's blocks, or every sequence shard)."""
    if segments is None:
        return None
    block = segments.shape[1] // blocks
    start = index * block
    ids = segments[:, start:start + block]
    entry = (segments[:, start - 1] if index > 0
             else torch.full((segments.shape[0],), NO_SEGMENT, dtype=segments.dtype))
    return BlockSegments(ids, entry)


def chunked(segments: BlockSegments, chunk: int) -> tuple[Tensor, Tensor]:
    """``(ids [rows, c, Q], entry [rows, c])``: the block's segments cut into chunks of
    ``chunk`` tokens (the last chunk padded with the last segment, which carries the state
    through unchanged) and, per chunk, the segment of the token before it."""
    ids = segments.ids
    pad = -ids.shape[1] % chunk
    if pad:
        ids = torch.cat([ids, ids[:, -1:].expand(-1, pad)], dim=1)
    ids = ids.unflatten(1, (-1, chunk))  # [rows, c, Q]
    entry = torch.cat([segments.entry[:, None], ids[:, :-1, -1]], dim=1)  # [rows, c]
    return ids, entry


@dataclass(frozen=True)
class ChunkMasks:
    """0/1 masks of a chunked block, in the compute dtype, batch rows first:

    - ``same`` ``[rows, c, Q, Q]``: token ``t`` and token ``s`` are in one segment;
    - ``from_entry`` ``[rows, c, Q]``: token ``t`` is still in the chunk's entry segment (the
      state that enters the chunk reaches it);
    - ``to_end`` ``[rows, c, Q]``: token ``s`` is in the segment of the chunk's last token (it
      reaches the state that leaves the chunk);
    - ``through`` ``[rows, c]``: the state entering the chunk leaves it (no restart inside).
    """

    same: Tensor
    from_entry: Tensor
    to_end: Tensor
    through: Tensor


def chunk_masks(segments: BlockSegments, chunk: int, dtype: torch.dtype,
                device: torch.device) -> ChunkMasks:
    ids, entry = chunked(segments.to(device), chunk)
    same = ids[..., :, None] == ids[..., None, :]
    from_entry = ids == entry[..., None]
    to_end = ids == ids[..., -1:]
    return ChunkMasks(same.to(dtype), from_entry.to(dtype), to_end.to(dtype),
                      from_entry[..., -1].to(dtype))
