"""The mask of one attention call, from its arguments, built once per batch.

A model calls attention once per layer (and again in activation recompute) with the same mask
arguments for the whole step: the same ``documents`` / ``cu_seqlens`` / ``padding_mask`` tensors.
Building an :class:`~usp.mask.AttentionMask` moves them to the host, checks them and hashes them
— a device synchronisation on GPUs — so the mask is kept, keyed by the **identity and version**
of those tensors (``tensor._version`` changes with every in-place write) and by the other
arguments. A tensor that dies takes its entry with it (weak references); an argument that is not
a tensor (a list) is built anew each call. Pass ``mask=AttentionMask.build(...)`` to build it
once yourself.
"""

from __future__ import annotations

import weakref

import torch

from usp.layout import padded_length
from usp.mask import AttentionMask
from usp.topology import Topology

Tensor = torch.Tensor
MASKS_KEPT = 8  # distinct batches' masks kept (a step, its recompute, an evaluation batch, ...)
_kept: dict[tuple, tuple[tuple, AttentionMask]] = {}


def _identity(value):
    """A key part for one argument: tensors by identity and version, other values by value."""
    if isinstance(value, Tensor):
        return ("tensor", id(value), value._version)
    if isinstance(value, (list, tuple)):
        return None  # not kept: a list has no identity that outlives the call
    return ("value", value)


def call_mask(q: Tensor, topology: Topology, layout: str, mask, causal, window, documents,
              cu_seqlens, padding_mask, seq_len) -> AttentionMask:
    """The call's mask over its ``S_local x ring x ulysses`` slots; ValueError when it cannot be."""
    slots = q.shape[1] * topology.sequence_size
    if mask is not None:
        given = [name for name, value in (("causal", causal), ("window", window),
                                          ("documents", documents), ("cu_seqlens", cu_seqlens),
                                          ("padding_mask", padding_mask), ("seq_len", seq_len))
                 if value not in (None, False)]
        if given:
            raise ValueError(f"pass mask= or {given}, not both (the mask holds them)")
        if not isinstance(mask, AttentionMask):
            raise ValueError(f"mask must be a usp.AttentionMask, got {type(mask).__name__}")
        if mask.seq_len != slots:
            raise ValueError(f"the mask covers {mask.seq_len} slots, the shards hold {slots}")
    else:
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)
                                    or padded_length(seq_len, topology.ring_size,
                                                     topology.ulysses_size, layout) != slots):
            raise ValueError(
                f"seq_len={seq_len!r} does not fit the {slots} slots of the shards "
                f"({q.shape[1]} per rank): it must be the real length that shard_sequence "
                "padded to them"
            )
        mask = _kept_or_built(slots, causal, window, documents, cu_seqlens, padding_mask,
                              seq_len)
    if mask.batch_rows not in (1, q.shape[0]):
        raise ValueError(
            f"the mask has {mask.batch_rows} batch rows of documents or padding, q has batch "
            f"{q.shape[0]}: give one row for all, or one per batch row"
        )
    return mask


def _kept_or_built(slots, causal, window, documents, cu_seqlens, padding_mask, seq_len):
    arguments = (documents, cu_seqlens, padding_mask)
    parts = [_identity(a) for a in arguments]
    key = (slots, causal, _identity(window) if not isinstance(window, (list, tuple))
           else ("value", tuple(window)), seq_len, *parts)
    if None in parts:
        key = None
    if key is not None and key in _kept:
        references, mask = _kept[key]
        if all(r() is a for r, a in zip(references, arguments) if r is not None):
            return mask
    mask = AttentionMask.build(slots, causal=causal, window=window, documents=documents,
                               cu_seqlens=cu_seqlens, padding_mask=padding_mask, real_len=seq_len)
    if key is not None:
        if len(_kept) >= MASKS_KEPT:
            _kept.pop(next(iter(_kept)))
        references = tuple(weakref.ref(a, _forget(key)) if isinstance(a, Tensor) else None
                           for a in arguments)
        _kept[key] = (references, mask)
    return mask


def _forget(key):
    return lambda _reference: _kept.pop(key, None)
