"""Shard-local, deterministic parameter initialisation: any shard draws its own values.

A parameter's values are a function of ``(seed, name, row block)`` only: rows ``[b*R, (b+1)*R)``
of a parameter named ``name`` are ``randn`` from a CPU generator seeded by a hash of ``(seed,
name, b)``, with ``R`` fixed by the parameter's global shape (:func:`rows_per_block`). A rank that
holds a shard of the parameter (FSDP2's ``Shard(0)``, a tensor-parallel ``Shard(0)`` or
``Shard(1)``, both nested, or a pipeline stage's whole layers) draws only the row blocks its rows
fall in and slices its columns out of them, so no rank ever builds the full tensor, and the
values agree bit for bit with a single process that initialises the whole model: both run the
same function. Names are the parameter's name in the unparallelised model (``parallelize`` keeps
them: FSDP2, TP, composable checkpointing and pipeline stages rename nothing).

The values change when the name or the global shape changes, not when the layout, the world size
or the device does. :func:`to_empty` materialises a meta-device model and keeps its ties;
:func:`materialize` then fills it from a seed, or from the pretrained weights its family reads.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from usp.models.registry import family_of_model

BLOCK_ELEMENTS = 1 << 20  # a row block holds at most this many elements (4 MiB of fp32)


def rows_per_block(shape: torch.Size | tuple[int, ...]) -> int:
    """Rows per generator block of a parameter of global ``shape`` (depends on the shape only)."""
    row = math.prod(shape[1:])
    return max(1, BLOCK_ELEMENTS // max(1, row))


def block_seed(seed: int, name: str, block: int) -> int:
    """The generator seed of row block ``block`` of parameter ``name`` (63 bits of BLAKE2b)."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def local_region(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """This rank's part of ``tensor``: (local tensor, its shape, its offset in the global tensor).

    A plain tensor is whole. A DTensor's local block is read off its placements by the function
    ``torch.distributed.checkpoint`` uses when it loads into one (torch 2.13 has no public
    equivalent); the block is contiguous in the global tensor for every placement ``parallelize``
    makes, ``_StridedShard`` included.
    """
    if not isinstance(tensor, DTensor):
        return tensor, tuple(tensor.shape), (0,) * tensor.ndim
    local = tensor.to_local()
    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    if tuple(shape) != tuple(local.shape):
        raise ValueError(
            f"a DTensor of global shape {tuple(tensor.shape)} with placements {tensor.placements} "
            f"holds a local tensor of shape {tuple(local.shape)}, not the {tuple(shape)} its "
            "placements give; shard-local initialisation cannot place its rows"
        )
    return local, tuple(shape), tuple(offset)


def row_blocks(name: str, shape: tuple[int, ...], std: float, seed: int, start: int,
               stop: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Rows ``[start, stop)`` of the whole ``normal(0, std)`` tensor of parameter ``name``, a block
    at a time: ``(first row, values [rows, *shape[1:]])``, fp32 on the CPU."""
    block_rows = rows_per_block(shape)
    generator = torch.Generator(device="cpu")
    for block in range(start // block_rows, (stop - 1) // block_rows + 1):
        first = block * block_rows
        count = min(block_rows, shape[0] - first)
        generator.manual_seed(block_seed(seed, name, block))
        values = torch.randn((count, *shape[1:]), generator=generator, dtype=torch.float32)
        lo, hi = max(start, first), min(stop, first + count)
        yield lo, values[lo - first : hi - first] * std


@torch.no_grad()
def normal_(tensor: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill this rank's part of ``tensor`` (plain or DTensor) with its rows of the deterministic
    ``normal(0, std)`` tensor of ``name``, a block of rows at a time (nothing bigger than a block
    is ever allocated); a meta tensor holds nothing to fill."""
    if tensor.is_meta:
        return
    if tensor.ndim == 0:
        raise ValueError(f"{name}: a 0-dimensional parameter has no rows to initialise")
    local, shape, offset = local_region(tensor)
    if local.numel() == 0:
        return
    for first, values in row_blocks(name, tuple(tensor.shape), std, seed, offset[0],
                                    offset[0] + shape[0]):
        # [rows, *global trailing dims] -> [rows, *local trailing dims]
        for dim in range(1, tensor.ndim):
            values = values.narrow(dim, offset[dim], shape[dim])
        local[first - offset[0] : first - offset[0] + values.shape[0]].copy_(values)


def to_empty(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model.to_empty(device=device)`` that keeps tied parameters tied.

    ``to_empty`` gives every module a new parameter object, so a parameter shared by two modules
    (a tied output projection) would become two; each alias is pointed back at its first name's.
    """
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    model.to_empty(device=device)
    for primary, *aliases in names.values():
        for alias in aliases:
            owner, _, leaf = alias.rpartition(".")
            setattr(model.get_submodule(owner), leaf, model.get_parameter(primary))
    return model


@torch.no_grad()
def fill_(tensor: torch.Tensor, value: float) -> None:
    """A constant (norms, biases): the same on every shard; a meta tensor holds nothing to fill."""
    if not tensor.is_meta:
        tensor.fill_(value)


def materialize(model: nn.Module, device: torch.device, seed: int,
                pretrained: str | None = None) -> nn.Module:
    """Allocate this rank's shards of a meta-device model on ``device`` and initialise them from
    ``seed``, or read them from ``pretrained`` with the model's family's weights reader (which
    draws from ``seed`` what the folder does not hold: LoRA factors). In place; returns it."""
    to_empty(model, device)  # tied parameters stay tied
    if pretrained is None:
        model.init_weights(seed)
    else:
        family_of_model(model).weights.load(model, pretrained, seed)
    return model
