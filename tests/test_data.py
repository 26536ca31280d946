"""Byte tokens, the resumable batcher, and shard_batch's labels against the global sequence.

Reading the user's files (every format, folders, refusals) is tested in tests/test_data_*.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from usp.data.stdlib import stdlib_documents
from usp.inputs.byte_tokens import EOT, decode, encode
from usp.data.run import synthetic_tokens
from usp.training.data import TokenBatcher, document_tokens
from usp.batch import IGNORE_INDEX, shard_batch
from usp.layout import shard_sequence
from usp.topology import AXES, Topology


def _rank_topologies(dp: int, ring: int, ulysses: int, tp: int) -> list[Topology]:
    """One mesh-less Topology per rank: shard_batch only reads sizes and ranks."""
    sizes = {"dp": dp, "ring": ring, "ulysses": ulysses, "tp": tp}
    return [
        Topology(sizes=sizes, ranks=dict(zip(AXES, coordinate)))
        for coordinate in itertools.product(*(range(sizes.get(a, 1)) for a in AXES))
    ]


def test_encode_decode_round_trip():
    text = "déjà vu — 東京\n"
    assert decode(encode(text)) == text
    assert decode(encode("a") + [EOT] + encode("b")) == "a<|endoftext|>b"
    assert document_tokens(["ab", "c"]).tolist() == [97, 98, EOT, 99, EOT]
    with pytest.raises(ValueError, match="token id 300"):
        decode([300])


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("degrees", [(1, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2), (2, 1, 4, 1)])
def test_shard_batch_reassembles_to_shifted_global_tokens(layout, degrees):
    dp, ring, ulysses, tp = degrees
    tokens = torch.randint(0, 257, (4, 33), generator=torch.Generator().manual_seed(1))
    inputs, labels = torch.full((4, 32), -1), torch.full((4, 32), -1)
    by_group = {}
    for topology in _rank_topologies(*degrees):
        shard = shard_batch(tokens, topology, layout)
        local_batch = 4 // dp
        first_row = topology.rank("dp") * local_batch
        rows = torch.arange(first_row, first_row + local_batch)
        positions = shard["position_ids"]
        assert positions.shape == shard["input_ids"].shape == (local_batch, 32 // (ring * ulysses))
        for row, (row_positions, row_inputs, row_labels) in enumerate(
            zip(positions, shard["input_ids"], shard["labels"])
        ):
            # labels are the global successors of the inputs at their global positions
            assert torch.equal(row_labels, tokens[rows[row], row_positions + 1])
            inputs[rows[row], row_positions] = row_inputs
            labels[rows[row], row_positions] = row_labels
        key = (topology.rank("dp"), topology.rank("ring"), topology.rank("ulysses"))
        previous = by_group.setdefault(key, shard)
        for name in shard:  # every tp rank of a group gets the same batch
            assert torch.equal(previous[name], shard[name])
    assert torch.equal(inputs, tokens[:, :-1])
    assert torch.equal(labels, tokens[:, 1:])


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
def test_shard_batch_pads_uneven_lengths_and_keeps_labels_inside_documents(layout):
    """S = 30 over ring 2 x ulysses 2 pads to 32 slots; packed documents (and padding) make
    the label that crosses a boundary -100 and RoPE positions restart in every document."""
    tokens = torch.arange(2 * 31).reshape(2, 31)
    documents = torch.tensor([[0] * 7 + [1] * 13 + [2] * 11,
                              [0] * 20 + [1] * 6 + [-1] * 5])
    ignored = 0
    want_labels = tokens[:, 1:].clone()
    want_labels[0, [6, 19]] = IGNORE_INDEX  # the last token of documents 0 and 1
    want_labels[1, [19]] = IGNORE_INDEX
    want_labels[1, 25:] = IGNORE_INDEX  # into the padding, and the padding itself
    want_positions = torch.tensor([list(range(7)) + list(range(13)) + list(range(10)),
                                   list(range(20)) + list(range(6)) + [0] * 4])
    for topology in _rank_topologies(1, 2, 2, 1):
        shard = shard_batch(tokens, topology, layout, documents=documents)
        assert shard["input_ids"].shape == (2, 8)  # 32 slots over 4 ranks
        assert torch.equal(shard["labels"], shard_sequence(want_labels, topology, layout,
                                                           fill=IGNORE_INDEX))
        assert torch.equal(shard["input_ids"], shard_sequence(tokens[:, :-1], topology, layout))
        assert torch.equal(shard["position_ids"], shard_sequence(want_positions, topology,
                                                                 layout))
        assert torch.equal(shard["documents"], documents[:, :-1])
        plain = shard_batch(tokens, topology, layout)
        assert plain["documents"].shape == (1, 30)  # the padding slots hold no token
        ignored += int((plain["labels"] == IGNORE_INDEX).sum())
    assert ignored == 2 * 2  # two padding slots in each of the two rows


def test_shard_batch_rejects_what_cannot_be_split():
    tokens = torch.zeros(4, 31, dtype=torch.long)
    with pytest.raises(ValueError, match="global batch 4 is not divisible by dp=3"):
        shard_batch(tokens, _rank_topologies(3, 1, 1, 1)[0])
    with pytest.raises(ValueError, match="tp=4 cannot split"):
        shard_batch(torch.zeros(4, 21, dtype=torch.long), _rank_topologies(1, 2, 1, 4)[0], "zigzag")
    with pytest.raises(ValueError, match=r"\[global_batch, seq_len \+ 1\]"):
        shard_batch(torch.zeros(31, dtype=torch.long), _rank_topologies(1, 1, 1, 1)[0])


def test_batcher_is_deterministic_and_resumes_exactly_across_epochs():
    tokens = synthetic_tokens(200, seed=5)
    first = TokenBatcher(tokens, global_batch=3, seq_len=16, seed=7)
    batches = [first.next_batch() for _ in range(5)]  # 15 of (200 - 1) // 16 = 12 windows
    assert first.epoch == 1
    again = TokenBatcher(tokens, global_batch=3, seq_len=16, seed=7)
    for expected in batches[:2]:
        assert torch.equal(again.next_batch(), expected)
    resumed = TokenBatcher(tokens, global_batch=3, seq_len=16, seed=7)
    resumed.load_state_dict(again.state_dict())
    for expected in batches[2:]:
        assert torch.equal(resumed.next_batch(), expected)
    other_seed = TokenBatcher(tokens, global_batch=3, seq_len=16, seed=8)
    assert not torch.equal(other_seed.next_batch(), batches[0])
    with pytest.raises(ValueError, match="seq_len=16 but this run has seq_len=8"):
        TokenBatcher(tokens, global_batch=3, seq_len=8, seed=7).load_state_dict(first.state_dict())


def test_one_epoch_labels_every_token_once():
    tokens = torch.arange(1, 50)
    batcher = TokenBatcher(tokens, global_batch=6, seq_len=8, seed=0)
    batch = batcher.next_batch()  # (49 - 1) // 8 = 6 windows: exactly one epoch
    assert sorted(batch[:, 1:].flatten().tolist()) == list(range(2, 50))
    assert torch.equal(batch[:, 1:], batch[:, :-1] + 1)  # windows are contiguous runs
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenBatcher(tokens[:8], global_batch=1, seq_len=8)


def test_stdlib_corpus_is_deterministic_and_capped():
    documents = stdlib_documents(max_bytes=200_000)
    assert documents == stdlib_documents(max_bytes=200_000)
    sizes = [len(d.encode("utf-8")) for d in documents]
    assert sum(sizes[:-1]) < 200_000 <= sum(sizes)
    assert any("def " in d for d in documents)
