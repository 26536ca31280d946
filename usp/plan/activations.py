"""Activation memory of one micro-batch on one GPU, tensor by tensor as usp's Llama saves it.

Every term names the tensors autograd keeps for the backward in ``usp.models.llama`` run through
``usp.parallel`` (measured with a saved-tensor hook; docs/cost-model.md §4 lists them):

- each RMSNorm keeps its input and its normalised value, ``(4 + e)`` bytes per element (the norm
  upcasts to fp32: the fp32 copy and the rescaled value), and the fp32 reciprocal root; its
  output is kept by the projections it feeds, gathered over tp (``s`` tokens);
- attention keeps q, k, v and its output as the kernel holds them, the fp32 log-sum-exp, and,
  after a Ulysses all-to-all back, the output projection's input as a second copy (RoPE's
  rotation keeps only the cos/sin tables, shared by every layer);
- the SwiGLU MLP keeps the gate, SiLU(gate), the up projection and their product (a two-matrix
  MLP its up projection, the activation's output and the down projection's input);
- a hybrid's scan layers keep what :func:`usp.plan.scans.scan_activations` counts;
- the loss: the logits (fp32, the whole vocabulary on every tp rank under the ``full`` loss) and the
  log-softmax the cross-entropy keeps, each ``4·s·V`` bytes.

Symbols follow docs/cost-model.md: ``b`` sequences per micro-batch, ``s`` tokens per sequence
rank, ``s_t`` of them outside attention under TP-sp, ``e`` activation bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from usp.plan.collectives import FP32_BYTES, attention_traffic
from usp.plan.config import ParallelConfig
from usp.plan.scans import scan_activations
from usp.plan.specs import Workload


@dataclass(frozen=True)
class LayerActivations:
    """Bytes of the average decoder layer for one micro-batch (a hybrid's attention, scan and
    MLP weighed by the shares of layers that hold them); ``full`` = norms + attention + scan +
    mlp."""

    norms: float  # the RMSNorms: input, normalised value, fp32 root, output (gathered)
    attention: float  # q, k, v, output (+ the output's copy after Ulysses), log-sum-exp
    mlp: float  # gate, SiLU(gate), up, product
    block_input: float  # what a fully checkpointed layer keeps
    working: float  # transient of the layer's backward: gradients, ring and all-to-all buffers
    scan: float = 0.0  # a hybrid's scan mixer (usp.plan.scans.scan_activations)

    @property
    def full(self) -> float:
        return self.norms + self.attention + self.scan + self.mlp


def layer_activations(workload: Workload, config: ParallelConfig, shapes) -> LayerActivations:
    """One layer's activations (``shapes``: :func:`usp.plan.memory.shapes`)."""
    model, e, s = workload.model, workload.element_bytes, shapes
    b, tokens, outside = s.micro_batch, s.tokens, s.tokens_outside_attention
    h, d, ffn = model.hidden, model.head_dim, model.ffn_hidden / config.tp
    norms = b * model.norms * ((FP32_BYTES + e) * h * outside + FP32_BYTES * outside
                               + e * h * tokens)
    with_attention, with_scan, with_mlp = model.shares
    out_copy = s.q_heads if config.ulysses > 1 else 0  # the all-to-all back makes a new tensor
    attention = with_attention * b * (
        e * tokens * d * (2 * s.q_heads + 2 * s.kv_heads_attention + out_copy)
        + FP32_BYTES * tokens * s.q_heads)
    tile = min(config.tiled_mlp, tokens) if config.tiled_mlp else tokens
    # a tiled MLP keeps only its input (the norm's output, counted above); a two-matrix MLP
    # keeps its up projection, the activation and its input's copy
    kept = 4 if model.mlp_matrices == 3 else 3
    mlp = 0.0 if config.tiled_mlp else with_mlp * b * kept * e * tokens * ffn
    scan = scan_activations(model.scan, b, tokens, e) if model.scan else None
    # Backward of a layer: the MLP's input gradients (three [s, F/t] tensors at once), or the
    # attention's dq, dk, dv and dout with the all-to-all's packing buffers, whichever is larger,
    # plus the ring's fp32 accumulators and in-flight blocks.
    traffic = attention_traffic(b, workload.seq_len, s.q_heads, s.kv_heads, d, e,
                                config.ring, config.ulysses)
    mlp_working = b * 3 * e * tile * ffn if with_mlp else 0.0
    qkv = e * tokens * d * (2 * s.q_heads + 2 * s.kv_heads_attention)
    attention_working = b * qkv * (2 if config.ulysses > 1 else 1) if with_attention else 0.0
    ring_working = 0.0
    if config.ring > 1:
        # dq in fp32, two partial dk/dv buffers and the incoming one (fp32), k/v blocks in flight
        ring_working = (FP32_BYTES * b * tokens * s.q_heads * d + 1.5 * traffic.ring_grad_send
                        + traffic.ring_kv_send)
    working = max(mlp_working, attention_working + ring_working,
                  scan.working if scan else 0.0)
    scan_saved = with_scan * scan.saved if scan else 0.0
    recomputed_mlp = with_mlp * b * kept * e * tile * ffn
    recomputed = {"none": 0.0, "full": norms + attention + scan_saved + recomputed_mlp,
                  "selective": recomputed_mlp, "attention": attention}
    return LayerActivations(
        norms=norms, attention=attention, mlp=mlp, block_input=b * e * h * outside,
        working=working + recomputed[config.ac], scan=scan_saved,
    )


def saved_per_layer(layer: LayerActivations, ac: str) -> float:
    """What a layer keeps between its forward and its backward under activation checkpointing
    ``ac`` (:data:`usp.plan.config.AC`).

    A checkpointed region keeps its input instead of its activations: the block's input
    (``full``); the MLP's and the attention's inputs are norm outputs, kept already.
    """
    if ac == "full":
        return layer.block_input
    if ac == "selective":
        return layer.norms + layer.attention + layer.scan
    if ac == "attention":
        return layer.norms + layer.scan + layer.mlp
    return layer.full


@dataclass(frozen=True)
class LossActivations:
    held: float  # from the stage's forward to its backward: final norm, logits, log-softmax
    transient: float  # extra while the loss and head run backward (logit gradients)


def loss_activations(workload: Workload, config: ParallelConfig, shapes) -> LossActivations:
    """The last stage's head and loss for one micro-batch, by ``config.loss``."""
    model, e, s = workload.model, workload.element_bytes, shapes
    b, tokens, outside = s.micro_batch, s.tokens, s.tokens_outside_attention
    final_norm = b * ((FP32_BYTES + e) * model.hidden * outside + FP32_BYTES * outside
                      + e * model.hidden * tokens)
    row = FP32_BYTES * b * model.vocab  # one token's fp32 logits over the whole vocabulary
    if config.loss == "full":
        # logits and log-softmax kept; backward adds their two gradients (and, under tp, the
        # local V/tp shard of the logits' gradient)
        shard = row * tokens / config.tp if config.tp > 1 else 0.0
        return LossActivations(held=final_norm + 2 * row * tokens,
                               transient=2 * row * tokens + shard)
    if config.loss == "vocab_parallel":
        local = row * tokens / config.tp
        return LossActivations(held=final_norm + 2 * local, transient=2 * local)
    # one chunk's logits, forward and recomputed backward
    chunk = min(config.loss_chunk_tokens, tokens)
    return LossActivations(held=final_norm, transient=4 * row * chunk)


def rope_tables(workload: Workload, shapes) -> float:
    """cos and sin of every token's RoPE angles, ``[b, s, D/2]`` fp32 each, shared by a stage."""
    return FP32_BYTES * shapes.micro_batch * shapes.tokens * workload.model.head_dim
