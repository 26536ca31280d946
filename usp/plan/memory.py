"""Per-GPU memory of one training step: parameters, gradients, optimizer states, activations.

Mixed-precision AdamW as in the ZeRO paper: bf16 parameters (2 bytes) and gradients (2 bytes),
fp32 master weights and two fp32 moments (12 bytes), so 16 bytes per parameter unsharded. ZeRO
stage k shards the first k of (optimizer, gradients, parameters) over dp x ring x ulysses.
Symbols follow docs/cost-model.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from usp.plan.collectives import FP32_BYTES, attention_traffic
from usp.plan.config import ParallelConfig, effective_kv_heads
from usp.plan.specs import ModelSpec, Workload

PARAM_BYTES = 2
GRAD_BYTES = 2
OPTIMIZER_BYTES = 12  # fp32 master copy + Adam's first and second moments
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
        micro_batch=workload.global_batch // (config.dp * config.micro_batches),
        tokens=tokens,
        tokens_outside_attention=tokens // t if t > 1 and config.tp_sequence_parallel else tokens,
        q_heads=model.q_heads // t,
        kv_heads=kv_heads,
        kv_heads_attention=(effective_kv_heads(kv_heads, config.ulysses) if config.ulysses > 1
                            else kv_heads),
        layers=model.layers // config.pp,
    )


def layer_params_per_gpu(model: ModelSpec, tp: int) -> float:
    """One layer's parameters on one TP rank: its linear weights split by TP, both norms whole."""
    return (model.attention_linear_params + model.mlp_linear_params) / tp + 2 * model.hidden


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


def layer_activation_bytes(workload: Workload, config: ParallelConfig, s: Shapes) -> float:
    """Activations one layer saves for backward for one micro-batch, without checkpointing.

    Two RMSNorm inputs and outputs on the residual stream (s_t tokens each); q, k, v and the
    attention output as the attention kernel holds them (after the all-to-all: S/R tokens of H/U
    heads, the same count as s tokens of H heads) and the fp32 log-sum-exp; the SwiGLU gate, its
    SiLU, the up projection and their product (s tokens of F/tp each; a fused SwiGLU saves one
    fewer). Norms are assumed fused (they save their bf16 input only).
    """
    model, e = workload.model, workload.element_bytes
    norms = 4 * e * model.hidden * s.tokens_outside_attention
    attention = e * s.tokens * model.head_dim * (2 * s.q_heads + 2 * s.kv_heads_attention)
    log_sum_exp = FP32_BYTES * s.tokens * s.q_heads
    mlp = 4 * e * s.tokens * model.ffn_hidden / config.tp
    return s.micro_batch * (norms + attention + log_sum_exp + mlp)


def memory_per_gpu(workload: Workload, config: ParallelConfig) -> dict[str, float]:
    """Bytes on the most loaded GPU, split into parameters/gradients/optimizer/activations."""
    model, e, s = workload.model, workload.element_bytes, shapes(workload, config)
    shards = config.shard_size
    full_layer = layer_activation_bytes(workload, config, s)
    checkpoint = e * model.hidden * s.tokens_outside_attention * s.micro_batch
    saved_per_layer = checkpoint if config.checkpointing else full_layer
    traffic = attention_traffic(s.micro_batch, workload.seq_len, s.q_heads, s.kv_heads,
                                model.head_dim, e, config.ring, config.ulysses)
    # One layer's worth of transient memory: its recomputed activations (checkpointing) or the
    # activation gradients of the layer in backward, plus the ring's in-flight k/v and dk/dv.
    working = full_layer + traffic.ring_kv_send + traffic.ring_grad_send
    logits = s.micro_batch * s.tokens * model.vocab / config.tp * (e + FP32_BYTES)
    layer_shard = layer_params_per_gpu(model, config.tp)

    worst: dict[str, float] = {}
    stages = {0, config.pp - 1}
    for stage in sorted(stages):
        psi = stage_params(workload, config, stage)
        params = PARAM_BYTES * psi / (shards if config.zero >= 3 else 1)
        grads = GRAD_BYTES * psi / (shards if config.zero >= 2 else 1)
        optimizer = OPTIMIZER_BYTES * psi / (shards if config.zero >= 1 else 1)
        if config.zero >= 3 and shards > 1:
            params += ZERO3_GATHERED_LAYERS * PARAM_BYTES * layer_shard
            grads += GRAD_BYTES * layer_shard
        # 1F1B: stage k keeps min(pp - k, m) micro-batches in flight.
        in_flight = min(config.pp - stage, config.micro_batches)
        activations = in_flight * s.layers * saved_per_layer + working
        if stage == config.pp - 1:
            activations += logits
        candidate = {"parameters": params, "gradients": grads, "optimizer": optimizer,
                     "activations": activations}
        if not worst or sum(candidate.values()) > sum(worst.values()):
            worst = candidate
    return worst
