"""Tiled MLP: a block's MLP over tiles of the sequence, recomputed tile by tile in the backward.

An MLP acts on each token alone, so it can run over ``tile_tokens`` tokens at a time. The forward
runs the tiles without a graph and keeps only the MLP's input; the backward recomputes one tile
at a time under autograd and takes its gradients there (Arctic Long Sequence Training's tiled
MLP). The ``3 x ffn_dim`` activations per token that the MLP would keep for the whole sequence
exist for one tile only, forward and backward alike; the result and every gradient are the
plain MLP's (the weights' gradients are summed over the tiles).

The tiling wraps the module's call, around its hooks: under tensor parallelism each tile of this
rank's ``[B, S_local / tp, dim]`` input is gathered over tp, multiplied and reduce-scattered back
by the module's own plan. Every rank of the tp group runs the same number of tiles.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def tile_mlp(mlp: nn.Module, tile_tokens: int) -> None:
    """Make ``mlp`` run over tiles of ``tile_tokens`` tokens (dim 1 of its input), in place.

    The module keeps its parameters and their names (checkpoints do not change); only its class
    becomes a subclass whose call tiles (the way FSDP2's ``fully_shard`` swaps classes).
    """
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens={tile_tokens} must be a positive integer")
    cls = type(mlp)
    if not getattr(cls, "_usp_tiled", False):
        mlp.__class__ = type(f"Tiled{cls.__name__}", (cls,),
                             {"__call__": _tiled_call, "_usp_tiled": True})
    mlp._usp_tile_tokens = tile_tokens


def _tiled_call(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # a sequence-sharded DTensor input (tp's SequenceParallel norm) is tiled on its local tokens
    # and each tile re-wrapped with the same placements: the module gathers the tile over tp
    spec = (x.device_mesh, x.placements) if isinstance(x, DTensor) else None
    local = x.to_local() if spec is not None else x
    params = [p for p in self.parameters() if p.requires_grad]
    return _TiledMLP.apply(local, self, spec, self._usp_tile_tokens, *params)


def _run(module: nn.Module, piece: torch.Tensor, spec) -> torch.Tensor:
    if spec is not None:
        piece = DTensor.from_local(piece, spec[0], spec[1], run_check=False)
    out = nn.Module.__call__(module, piece)  # the untiled call, hooks included
    return out.to_local() if isinstance(out, DTensor) else out


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, spec, tile_tokens, *params):
        device_type = x.device.type
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type),
                        torch.is_autocast_enabled(device_type))
        ctx.module, ctx.spec, ctx.tile_tokens, ctx.params = module, spec, tile_tokens, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            # [B, S_tile, dim] -> [B, S_tile, dim], tile by tile
            return torch.cat([_run(module, piece, spec) for piece in x.split(tile_tokens, dim=1)],
                             dim=1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        device_type, dtype, enabled = ctx.autocast
        grad_x = torch.empty_like(x)
        grad_params = [None] * len(ctx.params)
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for start in range(0, x.shape[1], ctx.tile_tokens):
                tile = slice(start, start + ctx.tile_tokens)
                piece = x[:, tile].detach().requires_grad_()
                out = _run(ctx.module, piece, ctx.spec)
                grads = torch.autograd.grad(out, (piece, *ctx.params), grad[:, tile])
                grad_x[:, tile] = grads[0]
                grad_params = [g if total is None else total + g
                               for total, g in zip(grad_params, grads[1:])]
        return (grad_x, None, None, None, *grad_params)
