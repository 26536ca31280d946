"""Layouts and the ring's schedule: shards partition the sequence (padded when uneven), and the
pieces of every ring step cover exactly the mask — causal, windows, documents, padding — once."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usp.layout import (
    LAYOUTS, check_sequence_length, padded_length, ring_block_positions, shard_positions,
)
from usp.mask import AttentionMask
from usp.schedule import RingSchedule


@settings(max_examples=60, deadline=None)
@given(ring=st.integers(1, 6), ulysses=st.integers(1, 4), seq_len=st.integers(1, 60),
       layout=st.sampled_from(LAYOUTS))
def test_shards_partition_the_padded_sequence_in_rank_order(ring, ulysses, seq_len, layout):
    slots = padded_length(seq_len, ring, ulysses, layout)
    assert seq_len <= slots < seq_len + 2 * ring * ulysses
    shards = [shard_positions(seq_len, ring, ulysses, r, u, layout)
              for r in range(ring) for u in range(ulysses)]
    assert all(len(s) == slots // (ring * ulysses) for s in shards)
    assert torch.cat(shards).sort().values.equal(torch.arange(slots))
    for r in range(ring):  # a ring block is its Ulysses row's shards concatenated
        row = torch.cat(shards[r * ulysses:(r + 1) * ulysses])
        assert row.equal(ring_block_positions(slots, ring, r, layout))


def test_zigzag_and_stripe_blocks():
    assert ring_block_positions(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert ring_block_positions(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]
    assert ring_block_positions(8, 2, 1, "stripe").tolist() == [1, 3, 5, 7]


def covered_pairs(schedule: RingSchedule, rank: int, row: int) -> torch.Tensor:
    """How often each (query of ``rank``, global key) pair is computed over the ring's steps."""
    q_pos = schedule.positions(rank)
    covered = torch.zeros(len(q_pos), schedule.mask.seq_len, dtype=torch.int64)
    for source in range(schedule.ring_size):
        k_pos = schedule.positions(source)
        for piece in schedule.pieces(rank, source):
            if piece.batch is not None and piece.batch.start != row:
                continue
            n_q, n_k = piece.q_end - piece.q_start, piece.k_end - piece.k_start
            allowed = (piece.band.visible(n_q, n_k) if piece.band is not None
                       else torch.ones(n_q, n_k, dtype=torch.bool))
            for i in range(n_q):
                covered[piece.q_start + i, k_pos[piece.k_start:piece.k_end][allowed[i]]] += 1
    return covered


@st.composite
def masks(draw):
    ring, layout = draw(st.integers(1, 4)), draw(st.sampled_from(LAYOUTS))
    seq_len = 2 * ring * draw(st.integers(1, 6))
    window = draw(st.one_of(st.none(), st.tuples(st.integers(-1, 6), st.integers(-1, 6))))
    documents = None
    if draw(st.booleans()):  # documents of length 1 and longer than a block included
        cuts = sorted(draw(st.sets(st.integers(1, seq_len - 1), max_size=6)))
        bounds = [0, *cuts, seq_len]
        documents = torch.cat([torch.full((b - a,), i) for i, (a, b) in
                               enumerate(zip(bounds, bounds[1:]))])
        if draw(st.booleans()):
            documents[-draw(st.integers(1, 3)):] = -1  # padding at the end
    real_len = seq_len - draw(st.integers(0, 3)) if draw(st.booleans()) else None
    mask = AttentionMask.build(seq_len, causal=draw(st.booleans()), window=window,
                               documents=documents, real_len=real_len)
    return RingSchedule(mask, layout, ring)


@settings(max_examples=150, deadline=None)
@given(schedule=masks())
def test_schedule_covers_exactly_the_mask_once(schedule):
    """Union over ring steps of each rank's pieces == the global mask's rows, no overlap."""
    visible = schedule.mask.visible().long()
    for rank in range(schedule.ring_size):
        assert covered_pairs(schedule, rank, 0).equal(visible[schedule.positions(rank)]), rank


def test_documents_per_batch_row():
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 2, 2, -1]])
    schedule = RingSchedule(AttentionMask.build(8, causal=True, documents=documents), "zigzag", 2)
    for row in range(2):
        visible = schedule.mask.visible(row).long()
        for rank in range(2):
            assert covered_pairs(schedule, rank, row).equal(visible[schedule.positions(rank)])


def test_dense_causal_is_one_piece_per_step_and_balanced_for_zigzag_and_stripe():
    ring = 4
    for layout, balanced in (("zigzag", True), ("stripe", True), ("contiguous", False)):
        schedule = RingSchedule(AttentionMask.build(64, causal=True), layout, ring)
        work = []
        for rank in range(ring):
            pieces = [schedule.pieces(rank, s) for s in range(ring)]
            assert all(len(p) <= 1 for p in pieces)
            work.append(sum(p.area for step in pieces for p in step))
        ratio = max(work) / (sum(work) / ring)
        assert (ratio <= 1.10) == balanced, (layout, work)


def test_a_short_window_stops_the_contiguous_ring_early():
    schedule = RingSchedule(AttentionMask.build(64, causal=True, window=(10, 0)), "contiguous", 4)
    assert schedule.last_step() == 1  # blocks of 16: a 10-token window reaches one block back
    full = RingSchedule(AttentionMask.build(64, causal=True), "contiguous", 4)
    assert full.last_step() == 3


def test_sequence_length_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"sequence length 12 .*zigzag.*ring=4.*multiple of 8"):
        check_sequence_length(12, 4, 2, "zigzag")
    with pytest.raises(ValueError, match="unknown layout 'ring'"):
        check_sequence_length(12, 4, 2, "ring")
    with pytest.raises(ValueError, match="one contiguous run"):
        AttentionMask.build(6, documents=torch.tensor([0, 0, 1, 1, 0, 0]))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        AttentionMask.build(6, cu_seqlens=torch.tensor([0, 4, 2]))
    with pytest.raises(ValueError, match="window=.*-1 for unbounded"):
        AttentionMask.build(6, window=(-3, 0))
