"""Llama's tensor-parallel plan: Megatron TP with sequence parallelism, as DTensor styles.

q/k/v and gate/up are column-wise (each tp rank holds ``H / tp`` heads and ``ffn_dim / tp``
columns), o and down row-wise with their output reduce-scattered onto the sequence, the norms
sequence-sharded, the embedding row-wise (vocabulary-sharded) and the output projection
column-wise, gathered to full logits. Between the attention and MLP regions the residual stream
holds ``S_local / tp`` tokens; attention sees all ``S_local`` tokens of the rank's sequence shard
(gathered over tp), so the global RoPE positions of the batch apply unchanged.

The plan names only the modules a model (or a pipeline stage of it) actually holds.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def tensor_parallel_plan(model: nn.Module, vocab_parallel: bool = False) -> dict:
    """Module path -> DTensor parallel style, for the parts of ``model`` present on this rank.

    ``vocab_parallel``: the output projection's result stays split over the vocabulary
    (``[B, S, V / tp]`` on each tp rank, for ``usp.losses``' vocab-parallel loss)."""
    plan = {}
    if model.tok_embeddings is not None:
        # [B, S] ids replicated -> vocab-sharded lookup, reduce-scattered to [B, S/tp, dim]
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        # [B, S/tp, dim] gathered, vocab-sharded projection gathered to full logits [B, S, V],
        # or left split: [B, S, V/tp]
        plan["output"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1) if vocab_parallel else Replicate()
        )
    for name in model.layers:
        prefix = f"layers.{name}."
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
    return plan


def apply_llama_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh,
                                vocab_parallel: bool = False) -> None:
    """Apply :func:`tensor_parallel_plan` over ``tp_mesh``, in place."""
    parallelize_module(model, tp_mesh, tensor_parallel_plan(model, vocab_parallel))
    if model.config.tie_embeddings and model.tok_embeddings is not None and model.output is not None:
        # the plan gave the embedding and the output a DTensor each (both Shard(0) over the
        # vocabulary): share one again so the tie and its summed gradient survive
        model.output.weight = model.tok_embeddings.weight
