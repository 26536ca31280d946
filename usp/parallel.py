"""parallelize: make a plain ``usp.models.Llama`` a USP × TP × FSDP2 model, in one fixed order.

1. **Attention swap.** Every layer's ``attention_fn`` becomes causal ``usp_attention`` over the
   topology's ring × ulysses grid, so each rank attends with its sequence shard.
2. **Tensor parallelism** over the ``tp`` axis, Megatron style with sequence parallelism, as DTensor
   plans: q/k/v and gate/up column-wise (each tp rank holds ``H / tp`` heads), o and down
   row-wise with their output reduce-scattered onto the sequence, norms sequence-sharded, the
   embedding row-wise (vocabulary-sharded) and the output projection column-wise gathered to full
   logits. Heads are split over tp first and then, inside the attention, over ulysses. Between the
   attention and MLP regions the residual stream holds ``S_local / tp`` tokens; attention sees all
   ``S_local`` tokens of the rank's sequence shard (gathered over tp), so the global RoPE
   positions of the batch apply unchanged.
3. **Activation checkpointing**: ``"full"`` recomputes every block in the backward;
   ``"selective"`` recomputes only each block's MLP (the largest activations, ``3 x ffn_dim`` per
   token) and keeps the attention's, so the sequence-parallel communication is not repeated.
4. **FSDP2** ``fully_shard`` of every block and of the root over the flattened dp × ring × ulysses
   mesh (ZeRO-3; ``reshard_after_forward=False`` keeps the blocks' parameters gathered between
   forward and backward, ZeRO-2-like). Gradients are **summed** over that mesh (divide factor 1):
   ``usp.loss.global_mean_cross_entropy`` gives every rank its share of the exact global mean.
   With one rank on that mesh there is nothing to shard or reduce and FSDP is skipped.

Call it after ``model.init_weights(seed)`` on a model whose weights are equal on every rank.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from usp.attention import usp_attention
from usp.attention.ulysses import head_plan
from usp.layout import check_layout
from usp.loss import DATA_AXES, data_parallel_size
from usp.models.llama import LlamaConfig
from usp.topology import Topology

logger = logging.getLogger(__name__)

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def check_parallel_config(config: LlamaConfig, topology: Topology) -> None:
    """Raise ValueError, naming the numbers, unless tp and ulysses can split the model."""
    tp, ulysses = topology.size("tp"), topology.size("ulysses")
    for name, value in (
        ("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads),
        ("ffn_dim", config.ffn_dim), ("vocab_size", config.vocab_size),
    ):
        if value % tp != 0:
            raise ValueError(
                f"{name}={value} is not divisible by tp={tp}: tensor parallelism splits it evenly "
                f"over the tp ranks; choose tp dividing {value}"
            )
    # heads split over tp first, then over ulysses: an uneven ulysses split runs on padded
    # heads (exact; usp.attention.ulysses.head_plan), which costs their share of the work
    plan = head_plan(config.n_heads // tp, config.n_kv_heads // tp, ulysses)
    if plan.padded:
        logger.warning("%d query / %d kv heads per tp rank over ulysses=%d: %s (padding heads "
                       "cost their share of compute)", config.n_heads // tp,
                       config.n_kv_heads // tp, ulysses, plan.describe())


def check_parallel_options(
    topology: Topology,
    activation_checkpointing: str,
    fsdp: bool,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
) -> bool:
    """Validate the options shared by every parallelize path; return whether FSDP2 applies."""
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"activation_checkpointing={activation_checkpointing!r}; choose one of "
            f"{ACTIVATION_CHECKPOINTING}"
        )
    use_fsdp = data_parallel_size(topology) > 1
    if use_fsdp and not fsdp:
        raise ValueError(
            f"dp x ring x ulysses = {data_parallel_size(topology)} ranks hold different tokens and "
            "their gradients must be summed; FSDP2 does that, so fsdp=False needs that product 1"
        )
    if not use_fsdp and (param_dtype is not None or reduce_dtype is not None):
        raise ValueError(
            "param_dtype/reduce_dtype are FSDP2's mixed precision, and dp x ring x ulysses = 1 "
            "leaves nothing to shard; cast the model instead (model.to(dtype))"
        )
    return use_fsdp


def parallelize(
    model: nn.Module,
    topology: Topology,
    *,
    layout: str = "zigzag",
    kernel: str = "auto",
    activation_checkpointing: str = "none",
    fsdp: bool = True,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply attention swap, TP, activation checkpointing and FSDP2 to ``model`` (see module doc).

    ``param_dtype`` / ``reduce_dtype`` are FSDP2's mixed-precision policy (compute dtype of the
    gathered parameters, dtype of the gradient reduction); the sharded master weights keep
    their dtype. Returns the same module, modified in place.
    """
    check_layout(layout)
    check_parallel_config(model.config, topology)
    use_fsdp = check_parallel_options(
        topology, activation_checkpointing, fsdp, param_dtype, reduce_dtype
    )

    for block in model.layers:
        block.attention.attention_fn = partial(
            usp_attention, topology=topology, causal=True, layout=layout, kernel=kernel
        )
    if topology.size("tp") > 1:
        apply_tensor_parallel(model, topology)
    if activation_checkpointing != "none":
        for block in model.layers:
            checkpoint(block if activation_checkpointing == "full" else block.feed_forward)
    if use_fsdp:
        apply_fsdp(model, topology, reshard_after_forward, param_dtype, reduce_dtype)
    logger.info(
        "parallelized over %s: layout=%s, activation checkpointing=%s, fsdp=%s",
        topology, layout, activation_checkpointing,
        ("zero3" if reshard_after_forward else "zero2") if use_fsdp else "off",
    )
    return model


def apply_tensor_parallel(model: nn.Module, topology: Topology) -> None:
    """Megatron TP + sequence parallelism over the ``tp`` mesh axis, in place."""
    tied = model.config.tie_embeddings
    plan = {
        # [B, S] ids replicated -> vocab-sharded lookup, reduce-scattered to [B, S/tp, dim]
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        # [B, S/tp, dim] gathered, vocab-sharded projection gathered to full logits [B, S, V]
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    for index in range(len(model.layers)):
        prefix = f"layers.{index}."
        plan.update({
            prefix + "attention_norm": SequenceParallel(),
            # (x, cos, sin, documents): x [B, S/tp, dim] is gathered to [B, S, dim]; RoPE tables
            # and documents pass as they are
            prefix + "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            prefix + "attention.wq": ColwiseParallel(),
            prefix + "attention.wk": ColwiseParallel(),
            prefix + "attention.wv": ColwiseParallel(),
            prefix + "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            prefix + "ffn_norm": SequenceParallel(),
            prefix + "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            prefix + "feed_forward.w1": ColwiseParallel(),
            prefix + "feed_forward.w3": ColwiseParallel(),
            prefix + "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
    parallelize_module(model, topology.mesh["tp"], plan)
    if tied:
        # the plan gave the embedding and the output a DTensor each (both Shard(0) over the
        # vocabulary): share one again so the tie and its summed gradient survive
        model.output.weight = model.tok_embeddings.weight


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
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # the root's parameters (embedding, final norm, output) are the first the backward needs
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # each rank's loss is its share of the global mean: sum the shares, do not average
            # (plain SUM collectives: gloo has no PREMUL_SUM, and NCCL sums zero-copy)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
