"""What every sequence-parallel scan call checks and agrees on before its first collective.

A scan needs each ring rank's tokens in one contiguous block of the sequence (its state enters
from the block before). usp's attention layouts ``zigzag`` and ``stripe`` interleave the blocks,
so with ``ring > 1`` a scan runs only under ``layout="contiguous"``; with ``ring = 1`` every
layout is the sequence in order and any name is accepted (docs/hybrid.md weighs the options).
"""

from __future__ import annotations

import hashlib
import math

import torch

from usp.choices import LAYOUTS, SCAN_ULYSSES
from usp.layout import padded_length, slot_multiple
from usp.scan.segments import global_segments
from usp.topology import Topology

Tensor = torch.Tensor


def check_scan_layout(layout: str, topology: Topology) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if topology.ring_size > 1 and layout != "contiguous":
        raise ValueError(
            f"a scan layer (Mamba-2, gated delta rule) passes its state from each ring rank's "
            f"block to the next, so it needs layout='contiguous' when ring={topology.ring_size} "
            f"> 1; layout={layout!r} interleaves the blocks (use layout='contiguous', or ring=1)"
        )


def check_ulysses_mode(mode) -> None:
    if mode not in SCAN_ULYSSES:
        raise ValueError(f"ulysses={mode!r}; choose 'state' (the state passes across the "
                         f"Ulysses ranks too, no all-to-all), 'heads' (an all-to-all splits "
                         f"the heads over them) or 'auto'")


def scan_block(topology: Topology, mode: str) -> tuple[int, int]:
    """``(blocks, index)``: how many contiguous blocks the chain of states runs through and
    which one this rank scans — the ring's blocks (``mode`` "heads"), or every sequence shard
    ("state")."""
    if mode == "state":
        return topology.sequence_size, topology.sequence_rank
    return topology.ring_size, topology.ring_rank


def check_tensor(name: str, t, dims: int, layout: str) -> None:
    if not isinstance(t, Tensor) or t.dim() != dims:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a tensor {layout}; got {shape}")
    if 0 in t.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} {layout} with an empty dimension")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale={scale!r} must be a finite number (or None)")


def check_same(name: str, t: Tensor, like: Tensor, like_name: str) -> None:
    """``t`` on ``like``'s device (dtype may differ: each is cast to the compute dtype)."""
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} and {like_name} on {like.device}")


def check_groups(heads: int, groups: int, what: str) -> None:
    if heads % groups != 0:
        raise ValueError(f"{what}: {heads} heads are not a multiple of {groups} groups; each "
                         f"group serves a run of heads/groups consecutive heads")


def sequence_segments(local_len: int, batch: int, topology: Topology, layout: str, *,
                      documents, cu_seqlens, seq_len: int | None) -> Tensor | None:
    """The global sequence's segments ``[rows, slots]`` (None: one run of tokens; ``rows`` 1 or
    ``batch``), after checking that ``seq_len`` fits the slots the ranks hold."""
    slots = local_len * topology.sequence_size
    if seq_len is not None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 < seq_len <= slots \
                or padded_length(seq_len, topology.ring_size, topology.ulysses_size,
                                 layout) != slots:
            raise ValueError(
                f"seq_len={seq_len!r} does not fit {slots} slots ({local_len} per rank x "
                f"{topology.sequence_size} ranks); shard_sequence pads a length to the next "
                f"multiple of {slot_multiple(topology.ring_size, topology.ulysses_size, layout)}"
            )
    segments = global_segments(slots, documents=documents, cu_seqlens=cu_seqlens, seq_len=seq_len)
    if segments is not None and segments.shape[0] not in (1, batch):
        raise ValueError(f"documents have {segments.shape[0]} batch rows and the inputs {batch}: "
                         f"give one row for all, or one per row")
    return segments


def digest(segments: Tensor | None) -> str | None:
    if segments is None:
        return None
    return hashlib.blake2b(segments.cpu().numpy().tobytes(), digest_size=8).hexdigest()


def describe(tensors: dict, **fields) -> dict:
    """What every rank of a sequence group must pass alike."""
    shape = lambda t: tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__  # noqa: E731
    return {
        "shapes": {name: shape(t) for name, t in tensors.items()},
        "dtypes": {name: str(getattr(t, "dtype", None)) for name, t in tensors.items()},
        "devices": {name: str(getattr(getattr(t, "device", None), "type", None))
                    for name, t in tensors.items()},
        # a rank whose inputs need no gradient would skip the backward's messages
        "requires_grad": {name: bool(getattr(t, "requires_grad", False))
                          for name, t in tensors.items()},
        **fields,
    }
