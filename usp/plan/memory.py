"""Per-GPU memory of one training step: parameters, gradients, optimizer states, activations.

Bytes per parameter come from the workload's dtype (``usp.plan.specs.PRECISIONS``: bf16
mixed precision 2 + 2 + 12, fp32 4 + 4 + 8). ZeRO stage k shards the first k of (optimizer,
gradients, parameters) over dp x ring x ulysses; stage 3 is FSDP2 as ``usp.parallel`` applies it.
Activations are :mod:`usp.plan.activations`'. Symbols follow docs/cost-model.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from usp.plan.activations import (
    layer_activations, loss_activations, rope_tables, saved_per_layer,
)
from usp.plan.config import ParallelConfig, effective_kv_heads
from usp.plan.specs import ModelSpec, Workload

ZERO3_GATHERED_LAYERS = 2  # the layer being computed and the one being prefetched


@dataclass(frozen=True)
class Shapes:
    """The per-GPU sizes every formula uses, derived once from a workload and a configuration."""

    micro_batch: int  # b: sequences per micro-batch per replica
    tokens: int  # s: tokens of one sequence per sequence-parallel rank, S/(R*U)
    tokens_outside_attention: int  # s_t: s/tp under TP-sp, else s
    q_heads: int  # Hq/tp: heads this GPU's attention sees before Ulysses
    kv_heads: int  # Hkv/tp
    kv_heads_attention: int  # kv heads of the attention tensors: replicated up to U if fewer
    layers: int  # L/pp: layers of one pipeline stage


def shapes(workload: Workload, config: ParallelConfig) -> Shapes:
    model, t = workload.model, config.tp
    tokens = workload.seq_len // config.sequence_size
    kv_heads = model.kv_heads // t
    return Shapes(
        micro_batch=workload.global_batch // (config.dp * config.sequential_micro_batches),
        tokens=tokens,
        tokens_outside_attention=tokens // t if t > 1 and config.tp_sequence_parallel else tokens,
        q_heads=model.q_heads // t,
        kv_heads=kv_heads,
        kv_heads_attention=(effective_kv_heads(kv_heads, config.ulysses) if config.ulysses > 1
                            else kv_heads),
        layers=model.layers // config.pp,
    )


def layer_params_per_gpu(model: ModelSpec, tp: int) -> float:
    """The average layer's parameters on one TP rank: its linear weights split by TP, the rest
    (both norms, a scan's convolution and constants) whole."""
    return model.linear_params_per_layer / tp + model.layer_params - model.linear_params_per_layer


def stage_params(workload: Workload, config: ParallelConfig, stage: int) -> float:
    """Parameters one GPU of pipeline stage ``stage`` holds (its tp shard), Psi in the docs."""
    model, t = workload.model, config.tp
    params = (model.layers // config.pp) * layer_params_per_gpu(model, t)
    vocab_shard = model.vocab * model.hidden / t  # vocab-parallel embedding / head
    last = stage == config.pp - 1
    if stage == 0:
        params += vocab_shard
    if last:
        params += model.hidden  # final norm
        # An untied head lives on the last stage; a tied one needs a copy there when pp > 1.
        if not model.tied_embeddings or config.pp > 1:
            params += vocab_shard
    return params


def root_params(workload: Workload, config: ParallelConfig, stage: int) -> float:
    """Parameters of stage ``stage`` outside its decoder layers: embedding, final norm, head."""
    return stage_params(workload, config, stage) - (
        (workload.model.layers // config.pp) * layer_params_per_gpu(workload.model, config.tp))


def in_flight(config: ParallelConfig, stage: int) -> tuple[int, int]:
    """Micro-batches whose activations stage ``stage`` holds at its first backward, and at the
    later ones: 1F1B keeps ``min(pp - stage, m)``, GPipe all ``m`` (one fewer per backward)."""
    m = config.sequential_micro_batches
    if config.pp == 1:
        return 1, 1
    if config.pp_schedule == "gpipe":
        return m, m - 1
    first = min(config.pp - stage, m)
    return first, first if m > first else first - 1


def model_states(workload: Workload, config: ParallelConfig, stage: int) -> dict[str, float]:
    """Parameters, gradients and optimizer states of a GPU of ``stage`` at the optimizer step:
    ZeRO stage z shards the first z of (optimizer, gradients, parameters) over dp x ring x
    ulysses; the gradients are whole for z < 2."""
    precision, shards = workload.bytes, config.shard_size
    psi = stage_params(workload, config, stage)
    return {
        "parameters": precision.param * psi / (shards if config.zero >= 3 else 1),
        "gradients": precision.grad * psi / (shards if config.zero >= 2 else 1),
        "optimizer": precision.optimizer * psi / (shards if config.zero >= 1 else 1),
    }


def stage_memory(workload: Workload, config: ParallelConfig, stage: int) -> dict[str, float]:
    """Peak bytes of one GPU of pipeline stage ``stage``, split into parameters, gradients,
    optimizer and activations at the moment of the peak (docs/cost-model.md §4).

    Three moments compete: the first backward (every in-flight micro-batch's activations, model
    states sharded), a later micro-batch's backward (FSDP does not reduce between micro-batches,
    so the gradients are whole; a pipeline schedule does not reshard either, so its stage's
    parameters are whole too) and the optimizer step (all gradients, no activations).
    """
    precision, s = workload.bytes, shapes(workload, config)
    states = model_states(workload, config, stage)
    params, optimizer = states["parameters"], states["optimizer"]
    fsdp = config.zero >= 3 and config.shard_size > 1
    psi, root = stage_params(workload, config, stage), root_params(workload, config, stage)
    layer_shard = layer_params_per_gpu(workload.model, config.tp)
    last = stage == config.pp - 1
    # FSDP: the layer being computed and the one prefetched are gathered; the root (embedding,
    # final norm, head) stays gathered from its forward to the end of the backward
    gathered = precision.param * (ZERO3_GATHERED_LAYERS * layer_shard + root) if fsdp else 0.0
    # backward: the head's and embedding's gradients whole, and the layer in backward's (FSDP:
    # also their reduce-scatter buffer)
    grads_backward = precision.grad * (root + (2 if fsdp else 1) * layer_shard)

    layer = layer_activations(workload, config, s)
    per_micro_batch = s.layers * saved_per_layer(layer, config.ac)
    loss = loss_activations(workload, config, s) if last else None
    if loss is not None:
        per_micro_batch += loss.held
    elif config.pp > 1:
        per_micro_batch += s.micro_batch * workload.element_bytes * workload.model.hidden * \
            s.tokens_outside_attention  # the stage output, kept for its backward
    transient = max(layer.working, loss.transient if loss is not None else 0.0)
    transient += rope_tables(workload, s)

    first, later = in_flight(config, stage)
    moments = [{"parameters": params + gathered, "gradients": grads_backward,
                "optimizer": optimizer, "activations": first * per_micro_batch + transient}]
    if config.sequential_micro_batches > 1:
        whole = config.pp > 1  # pipeline schedules run FSDP without resharding or reducing
        # gradient accumulation defers FSDP's reduce-scatter to the last micro-batch
        # (set_requires_gradient_sync): until then each GPU holds whole gradients
        accumulated = precision.grad * psi if whole or fsdp else states["gradients"]
        moments.append({
            "parameters": precision.param * psi + (params if whole and fsdp else 0.0)
            if whole else params + gathered,
            "gradients": accumulated, "optimizer": optimizer,
            "activations": later * per_micro_batch + transient,
        })
    moments.append({**states, "activations": 0.0})
    return max(moments, key=lambda moment: sum(moment.values()))


def resting_memory(workload: Workload, config: ParallelConfig) -> float:
    """Bytes between steps on the most loaded GPU: parameters and optimizer states (gradients
    are freed after the optimizer step)."""
    return max(states["parameters"] + states["optimizer"]
               for states in (model_states(workload, config, k) for k in {0, config.pp - 1}))


def memory_per_gpu(workload: Workload, config: ParallelConfig) -> dict[str, float]:
    """Bytes on the most loaded GPU (the heavier of the first and last pipeline stage)."""
    stages = sorted({0, config.pp - 1})
    return max((stage_memory(workload, config, stage) for stage in stages),
               key=lambda memory: sum(memory.values()))
