"""parallelize: make a plain model a PP × USP × TP × FSDP2 model, in one fixed order.

One function for the models of every family (``usp.models.registry``); what differs between
families is their :class:`~usp.models.family.ModelPlan` (how to swap the attention, the
tensor-parallel plan, where the MLP is, how to cut a pipeline stage, which losses it offers),
taken from the model's family entry (``family_of_model(model).plan``).

0. **Pipeline stage** (``pp > 1``): the model is cut to this rank's stage (the plan's
   ``keep_stage``, by ``usp.pipeline.stage_layer_names``).
1. **Attention swap.** Every layer's attention becomes ``usp_attention`` over the topology's
   ring × ulysses grid, so each rank attends with its sequence shard.
2. **Tensor parallelism** over the ``tp`` axis (Llama: ``usp.models.llama.tp``). Heads are split
   over tp first and then, inside the attention, over ulysses.
3. **Memory features** (``usp.memory``): the tiled MLP (each block's MLP over tiles of the
   sequence, recomputed tile by tile), then activation checkpointing by layer kind: ``"full"``
   recomputes every block in the backward; ``"selective"`` recomputes only each block's MLP (the
   largest activations, ``3 x ffn_dim`` per token) and keeps the attention's, so the
   sequence-parallel communication is not repeated; ``"attention"``, ``"mlp"``, ``"block"`` and
   lists of them (``"attention,mlp"``) choose the kinds. ``loss="vocab_parallel"`` keeps the
   output projection split over tp (``usp.losses``).
4. **FSDP2** ``fully_shard`` of every block and of the root over the flattened dp × ring × ulysses
   mesh (ZeRO-3; ``reshard_after_forward=False`` keeps the blocks' parameters gathered between
   forward and backward, ZeRO-2-like). Gradients are **summed** over that mesh (divide factor 1):
   ``usp.loss.global_mean_cross_entropy`` gives every rank its share of the exact global mean.
   With one rank on that mesh there is nothing to shard or reduce and FSDP is skipped.

Call it on a model whose weights are equal on every rank, or on the meta device; then
materialise it (``to_empty``) and let each rank initialise its own shards
(``model.init_weights(seed)``: ``usp.models.init``).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from usp.layout import check_layout
from usp.losses import check_loss
from usp.memory import apply_activation_checkpointing, checkpoint_kinds, tile_mlp
from usp.models.registry import family_of_model
from usp.topology import DATA_AXES, Topology

logger = logging.getLogger(__name__)


def check_parallel_options(
    topology: Topology,
    activation_checkpointing: str,
    fsdp: bool,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
    tiled_mlp: int = 0,
) -> bool:
    """Validate the options shared by every parallelize path; return whether FSDP2 applies."""
    check_memory_options(activation_checkpointing, tiled_mlp)
    use_fsdp = topology.data_size > 1
    if use_fsdp and not fsdp:
        raise ValueError(
            f"dp x ring x ulysses = {topology.data_size} ranks hold different tokens and "
            "their gradients must be summed; FSDP2 does that, so fsdp=False needs that product 1"
        )
    if not use_fsdp and (param_dtype is not None or reduce_dtype is not None):
        raise ValueError(
            "param_dtype/reduce_dtype are FSDP2's mixed precision, and dp x ring x ulysses = 1 "
            "leaves nothing to shard; cast the model instead (model.to(dtype))"
        )
    return use_fsdp


def check_memory_options(activation_checkpointing: str, tiled_mlp: int) -> None:
    """ValueError for checkpointing kinds that do not exist or that the tiled MLP makes double."""
    kinds = checkpoint_kinds(activation_checkpointing)
    if tiled_mlp < 0:
        raise ValueError(f"tiled_mlp={tiled_mlp} must be >= 0 (tokens per tile; 0: off)")
    if tiled_mlp and "mlp" in kinds:
        raise ValueError(
            f"tiled_mlp={tiled_mlp} with activation_checkpointing={activation_checkpointing!r}: "
            "the tiled MLP already recomputes its tiles in the backward; checkpointing the MLP "
            "as well would recompute it twice (use 'attention' or 'block', or no tiled MLP)"
        )


def blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks this rank holds, in order (a ModuleDict keeps global names)."""
    layers = model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def parallelize(
    model: nn.Module,
    topology: Topology,
    *,
    layout: str = "zigzag",
    kernel: str = "auto",
    ring_layout: str | None = None,
    activation_checkpointing: str = "none",
    tiled_mlp: int = 0,
    loss: str = "full",
    fsdp: bool = True,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply stage cut, attention swap, TP, activation checkpointing and FSDP2 (see module doc).

    ``param_dtype`` / ``reduce_dtype`` are FSDP2's mixed-precision policy (compute dtype of the
    gathered parameters, dtype of the gradient reduction); the sharded master weights keep
    their dtype. ``ring_layout``: the layout ring attention runs on, its blocks re-laid from
    ``layout`` and back around each attention (None: ``layout``). ``tiled_mlp``: tokens per tile of each block's MLP (0: untiled). ``loss``: one
    of ``usp.losses.LOSSES``; ``"vocab_parallel"`` (tp > 1) leaves the output projection's
    result split over the vocabulary for ``usp.losses.LossHead``. Returns the same module,
    modified in place (with ``pp > 1``: this rank's stage of it; run it with
    ``usp.pipeline.Pipeline``).
    """
    check_layout(layout)
    name = type(model).__name__  # (FSDP2 changes the class)
    plan = family_of_model(model).plan
    note = plan.check(model, topology)
    if note is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        logger.warning("%s", note)  # the same on every rank: said once
    use_fsdp = check_parallel_options(
        topology, activation_checkpointing, fsdp, param_dtype, reduce_dtype, tiled_mlp
    )
    check_loss(loss, topology)
    plan.check_loss(loss, name)
    if topology.size("pp") > 1:
        if plan.keep_stage is None:
            raise ValueError(
                f"pp={topology.size('pp')}: {type(model).__name__} cannot be cut into pipeline "
                "stages; use pp=1"
            )
        model = plan.keep_stage(model, topology)
    plan.use_attention(model, topology, layout, kernel, ring_layout)
    if topology.size("tp") > 1:
        if plan.tensor_parallel is None:
            raise ValueError(
                f"tp={topology.size('tp')}: tensor parallelism is not supported for "
                f"{type(model).__name__}; use tp=1"
            )
        plan.tensor_parallel(model, topology.mesh["tp"], loss == "vocab_parallel")
    if tiled_mlp:
        for block in blocks(model):
            tile_mlp(plan.mlp(block), tiled_mlp)
    apply_activation_checkpointing(blocks(model), checkpoint_kinds(activation_checkpointing),
                                   plan.attention, plan.mlp)
    if use_fsdp:
        apply_fsdp(model, topology, reshard_after_forward, param_dtype, reduce_dtype)
    logger.info(
        "parallelized %s over %s: layout=%s, activation checkpointing=%s, fsdp=%s",
        name, topology, layout, activation_checkpointing,
        ("zero3" if reshard_after_forward else "zero2") if use_fsdp else "off",
    )
    return model


def apply_fsdp(
    model: nn.Module,
    topology: Topology,
    reshard_after_forward: bool,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
) -> None:
    """FSDP2 per block and on the root over dp × ring × ulysses, gradients summed, in place."""
    mesh = topology.flat_mesh(*DATA_AXES)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # the root's parameters (embedding, final norm, output) are the first the backward needs
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # each rank's loss is its share of the global mean: sum the shares, do not average
            # (plain SUM collectives: gloo has no PREMUL_SUM, and NCCL sums zero-copy)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
