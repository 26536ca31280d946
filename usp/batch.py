"""One rank's part of a global batch: tokens, labels, RoPE positions and the documents' mask.

The training job and the Hugging Face integration both shard batches here. A batch is windows
``[B, S + 1]``: position ``i`` reads token ``i`` and is trained to predict token ``i + 1`` (labels
are shifted **before** sharding, so every layout gives each position its global successor).

Packed documents (``documents``, an id per token, ``-1`` for padding) change three things, all
decided on the global batch, the same way on every rank:

- attention stays inside each document (the ids go to :func:`usp.usp_attention`);
- a label that would cross into the next document, or into padding, is ignored (-100);
- RoPE positions restart at 0 in each document.

A length the layout cannot split evenly is padded (:func:`usp.layout.padded_length`): the extra
slots get token 0, label -100 and no document, so attention and loss skip them.
"""

from __future__ import annotations

import torch

from usp.layout import padded_length, sequence_positions, shard_sequence
from usp.mask import NOT_A_TOKEN
from usp.topology import Topology

Tensor = torch.Tensor
IGNORE_INDEX = -100


def documents_from_positions(position_ids: Tensor) -> Tensor:
    """Document ids ``[B, S]`` from positions that restart in each packed document (as
    transformers' ``DataCollatorWithFlattening`` makes them): a document continues while the
    position grows by one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return torch.cumsum(starts.long(), dim=1) - 1


def positions_in_documents(documents: Tensor) -> Tensor:
    """``[B, S]``: each token's position inside its document (0 at every document start, 0 for
    padding)."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return (index - first).masked_fill(documents == NOT_A_TOKEN, 0)


def shard_batch(tokens: Tensor, topology: Topology, layout: str = "zigzag", *,
                  targets: Tensor | None = None, documents: Tensor | None = None) -> dict:
    """This rank's part of windows ``tokens [B, S + 1]``; rows split over ``dp``.

    ``targets`` (default ``tokens``): where the labels come from (``-100`` entries stay ignored).
    ``documents`` ``[B, S + 1]``: packed documents and padding (see the module docstring).
    Returns ``input_ids``, ``labels``, ``position_ids`` ``[B / dp, S_local]`` and, when there
    are documents or padding slots, ``documents``: the ``[B / dp, S]`` ids of the global
    sequence for :func:`usp.usp_attention` (``documents=...``).
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [global_batch, seq_len + 1], got {tuple(tokens.shape)}")
    targets = tokens if targets is None else targets
    for name, other in (("targets", targets), ("documents", documents)):
        if other is not None and other.shape != tokens.shape:
            raise ValueError(f"{name} {tuple(other.shape)} must match tokens {tuple(tokens.shape)}")
    batch, seq_len = tokens.shape[0], tokens.shape[1] - 1
    dp, tp = topology.size("dp"), topology.size("tp")
    if batch % dp != 0:
        raise ValueError(f"global batch {batch} is not divisible by dp={dp}; use a multiple of {dp}")
    slots = padded_length(seq_len, topology.ring_size, topology.ulysses_size, layout)
    if slots // topology.sequence_size % tp != 0:
        raise ValueError(
            f"sequence length {seq_len} leaves {slots // topology.sequence_size} slots per "
            f"sequence rank, which tp={tp} cannot split for Megatron sequence parallelism; use a "
            f"multiple of {topology.sequence_size * tp}"
        )
    local_batch = batch // dp
    rows = slice(topology.rank("dp") * local_batch, (topology.rank("dp") + 1) * local_batch)
    inputs, labels = tokens[rows, :-1], targets[rows, 1:]
    if documents is None:
        positions = sequence_positions(seq_len, topology, layout).to(tokens.device)
        positions = positions.expand(local_batch, -1)
    else:
        here, after = documents[rows, :-1], documents[rows, 1:]
        crossing = (here != after) | (here == NOT_A_TOKEN) | (after == NOT_A_TOKEN)
        labels = labels.masked_fill(crossing, IGNORE_INDEX)
        positions = shard_sequence(positions_in_documents(here), topology, layout)
    result = {
        "input_ids": shard_sequence(inputs, topology, layout).contiguous(),
        "labels": shard_sequence(labels, topology, layout, fill=IGNORE_INDEX).contiguous(),
        "position_ids": positions.contiguous(),
    }
    padded = result["input_ids"].shape[1] * topology.sequence_size > seq_len
    if documents is not None:
        result["documents"] = documents[rows, :-1]
    elif padded:  # one document of seq_len tokens; the slots after it hold none
        result["documents"] = torch.zeros(1, seq_len, dtype=torch.long, device=tokens.device)
    return result
