"""A collator's batch -> this rank's shard, for :mod:`usp.integrations.trainer`.

The data loader gives every rank of a sequence group the same batch (the rows of its dp rank);
here each rank keeps its part of the sequence with :meth:`USPContext.shard`: labels shifted
before sharding, RoPE positions, and the documents of packed rows. The keys the collators of
transformers and TRL hand out are understood (padding, ``DataCollatorWithFlattening``, TRL's
padding-free packing); any other key is refused, since usp cannot know along which dim to split
it, and passing it unsplit to the model would compute something else without a word.

Batches are checked and agreed over every rank before any collective: one rank's bad batch is
the same ValueError everywhere (a rank of another dp group may hold another batch).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from usp.batch import IGNORE_INDEX, positions_in_documents
from usp.comm import all_gather_stacked
from usp.integrations.transformers import USPContext
from usp.mask import documents_from_cu_seqlens

# what the model reads: sharded along the sequence
SHARDED_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")
# describe the packed documents that position_ids describe too: checked against them, then
# replaced by the shard's usp_documents (seq_idx is for linear-attention convolutions, which
# usp refuses anyway)
DOCUMENT_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
KNOWN_KEYS = SHARDED_KEYS + DOCUMENT_KEYS


def shard_batches(context: USPContext, batches: list[dict]) -> list[dict]:
    """This rank's shard of each global batch; one agreement over all ranks first."""
    refusal, shards = _sequence_group_disagreement(context, batches), []
    try:
        shards = [shard_batch_of_collator(context, batch) for batch in batches]
    except ValueError as error:
        refusal = refusal or str(error)
    context.agree(refusal)
    return shards


def _sequence_group_disagreement(context: USPContext, batches: list[dict]) -> str | None:
    """Whether the ranks of this rank's sequence group read the same batches (a data loader
    split over every process would hand each its own samples, which the ranks would then split
    as if they were one sequence): one all-gather of a digest over the sequence group."""
    topology = context.topology
    if topology.sequence_size == 1:
        return None
    digest = hashlib.blake2b(digest_size=7)
    for batch in batches:
        for key in ("input_ids", "labels"):
            if isinstance(batch.get(key), torch.Tensor):
                digest.update(_host(batch[key]).contiguous().numpy().tobytes())
    group = topology.control_group
    mine = torch.tensor([int.from_bytes(digest.digest(), "little")], dtype=torch.int64)
    every = all_gather_stacked(mine, group).flatten().tolist()
    if len(set(every)) == 1:
        return None
    ranks = [dist.get_global_rank(group, index) for index in range(len(every))]
    return (
        f"the ranks {ranks} of one sequence group read different batches; each of them holds a "
        "part of the same sequences, so the data loader must give them the same samples (split "
        "it over the dp ranks only, as a usp trainer's own loaders do)"
    )


def shard_batch_of_collator(context: USPContext, batch: dict) -> dict:
    """One collator batch ``{input_ids [B, S], labels [B, S], ...}`` -> this rank's shard:
    ``input_ids``, ``position_ids``, ``labels`` (shifted) and maybe ``usp_documents``."""
    unknown = sorted(key for key in batch if key not in KNOWN_KEYS)
    if unknown:
        raise ValueError(
            f"the batch holds {unknown}, which usp does not know how to split along the sequence; "
            f"a usp trainer understands {list(KNOWN_KEYS)}: drop the others in the collator"
        )
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError(
            f"the batch holds {sorted(batch)}; a usp trainer needs input_ids and labels [B, S] "
            "(-100 where no loss), e.g. from DataCollatorForLanguageModeling(tokenizer, mlm=False)"
        )
    input_ids = _host(batch["input_ids"])
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)}: usp takes a [B, S] padding mask "
            "(1 = token), not a custom 4-D mask"
        )
    position_ids = _documents_as_positions(batch, input_ids.shape)
    return context.shard(
        input_ids, _host(batch["labels"]),
        attention_mask=None if attention_mask is None else _host(attention_mask),
        position_ids=position_ids, split_rows=False,
    )


def label_count(shards: list[dict]) -> torch.Tensor:
    """How many labels of these shards carry loss (fp64, this rank only)."""
    return sum((shard["labels"] != IGNORE_INDEX).sum().double() for shard in shards)


def _documents_as_positions(batch: dict, shape: torch.Size) -> torch.Tensor | None:
    """The positions that restart in each packed document: the batch's ``position_ids``, or
    the ones ``cu_seq_lens_q`` implies; both given must agree."""
    positions = batch.get("position_ids")
    positions = None if positions is None else _host(positions)
    cu = batch.get("cu_seq_lens_q")
    if cu is None:
        if positions is not None and torch.equal(positions, torch.arange(shape[1]).expand(shape)):
            return None  # one document per row: no document mask to build
        return positions
    cu = _host(torch.as_tensor(cu)).long().flatten()
    cu_k = batch.get("cu_seq_lens_k")
    if cu_k is not None and not torch.equal(_host(torch.as_tensor(cu_k)).long().flatten(), cu):
        raise ValueError("cu_seq_lens_k differs from cu_seq_lens_q; usp runs self-attention only")
    if shape[0] != 1 or int(cu[-1]) != shape[1]:
        raise ValueError(
            f"cu_seq_lens_q ends at {int(cu[-1])} for input_ids {tuple(shape)}; packed documents "
            "come as one row [1, S] whose documents cover all S tokens"
        )
    implied = positions_in_documents(documents_from_cu_seqlens(cu, shape[1])[None])
    if positions is not None and not torch.equal(positions, implied):
        raise ValueError(
            "position_ids do not restart at 0 where cu_seq_lens_q starts its documents; the two "
            "would put the document boundaries in different places"
        )
    return implied


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cpu() if isinstance(tensor, torch.Tensor) else torch.as_tensor(tensor)
