"""Layouts: shards partition the sequence; the ring's causal schedule covers exactly the causal mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usp.layout import (
    LAYOUTS, check_sequence_length, ring_block_positions, ring_step_blocks, shard_positions,
)


@settings(max_examples=60, deadline=None)
@given(ring=st.integers(1, 6), ulysses=st.integers(1, 4), units=st.integers(1, 4),
       layout=st.sampled_from(LAYOUTS))
def test_shards_partition_the_sequence_in_rank_order(ring, ulysses, units, layout):
    seq_len = 2 * ring * ulysses * units
    shards = [shard_positions(seq_len, ring, ulysses, r, u, layout)
              for r in range(ring) for u in range(ulysses)]
    assert all(len(s) == seq_len // (ring * ulysses) for s in shards)
    assert torch.cat(shards).sort().values.equal(torch.arange(seq_len))
    for r in range(ring):  # a ring block is its Ulysses row's shards concatenated
        row = torch.cat(shards[r * ulysses:(r + 1) * ulysses])
        assert row.equal(ring_block_positions(seq_len, ring, r, layout))


def test_zigzag_and_stripe_blocks():
    assert ring_block_positions(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert ring_block_positions(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]
    assert ring_block_positions(8, 2, 1, "stripe").tolist() == [1, 3, 5, 7]


@settings(max_examples=60, deadline=None)
@given(ring=st.integers(1, 6), units=st.integers(1, 3), layout=st.sampled_from(LAYOUTS),
       causal=st.booleans())
def test_schedule_covers_exactly_the_mask_once(ring, units, layout, causal):
    """Union over ring steps of each block's (query, key) pairs == the global mask, no overlap."""
    seq_len = 2 * ring * units
    block_len = seq_len // ring
    for rank in range(ring):
        q_pos = ring_block_positions(seq_len, ring, rank, layout)
        covered = torch.zeros(block_len, seq_len, dtype=torch.int64)
        for source in range(ring):
            k_pos = ring_block_positions(seq_len, ring, source, layout)
            for b in ring_step_blocks(layout, causal, rank, source, block_len):
                rows = torch.arange(b.q_start, b.q_end)
                cols = torch.arange(b.k_start, b.k_end)
                allowed = torch.ones(len(rows), len(cols), dtype=torch.bool)
                if b.causal:
                    allowed = torch.ones_like(allowed).tril()
                for i, row in enumerate(rows):
                    covered[row, k_pos[cols[allowed[i]]]] += 1
        if causal:
            expected = torch.arange(seq_len).unsqueeze(0) <= q_pos.unsqueeze(1)
        else:
            expected = torch.ones(block_len, seq_len, dtype=torch.bool)
        assert covered.equal(expected.long()), (rank, layout)


def test_causal_work_is_balanced_for_zigzag_and_stripe():
    ring, block_len = 4, 8
    for layout, balanced in (("zigzag", True), ("stripe", True), ("contiguous", False)):
        work = []
        for rank in range(ring):
            blocks = [b for s in range(ring) for b in ring_step_blocks(layout, True, rank, s, block_len)]
            work.append(sum((b.q_end - b.q_start) * (b.k_end - b.k_start) / (2 if b.causal else 1)
                            for b in blocks))
        ratio = max(work) / (sum(work) / ring)
        assert (ratio <= 1.10) == balanced, (layout, work)


def test_sequence_length_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"sequence length 12 .*zigzag.*ring=4.*multiple of 8; pad it to 16"):
        check_sequence_length(12, 4, 2, "zigzag")
    with pytest.raises(ValueError, match="unknown layout 'ring'"):
        check_sequence_length(12, 4, 2, "ring")
