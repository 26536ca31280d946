"""The training loss: the exact mean cross-entropy over every token of every dp and sp rank.

Each rank holds ``B / dp`` rows and ``S / (ring * ulysses)`` tokens of each, so a local mean would
weight ranks wrongly as soon as their counts of real (not ``ignore_index``) labels differ. The
global token count is all-reduced over dp × ring × ulysses (tp ranks hold copies, left out).

The returned scalar has two faces:

- its **value** is the global mean, the same on every rank (log it);
- its **gradient** is this rank's share, ``d(local_sum) / global_count``. The shares of all
  dp × ring × ulysses ranks add up to the exact gradient, so gradients must be **summed** over
  that mesh, not averaged: ``usp.parallelize`` sets FSDP2's gradient divide factor to 1 for this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usp.topology import Topology

def global_mean_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, topology: Topology, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy over all labels of all ranks. ``logits [B, S, V], labels [B, S]``.

    See the module docstring: the value is the global mean, the gradient this rank's share of it.
    """
    return global_mean_of_sum(cross_entropy_sum(logits, labels, ignore_index), labels, topology,
                              ignore_index)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = -100) -> torch.Tensor:
    """This rank's sum of per-token cross-entropies. ``logits [B, S, V], labels [B, S]``."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree; "
            "expected logits [B, S, V] and labels [B, S]"
        )
    # [B, S, V] -> [B*S, V]; at least fp32, so the log-softmax of bf16 logits keeps the
    # target's mass
    logits = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                           labels.reshape(-1), ignore_index=ignore_index, reduction="sum")


def global_mean_of_sum(
    local_sum: torch.Tensor, labels: torch.Tensor, topology: Topology, ignore_index: int = -100
) -> torch.Tensor:
    """The global mean from this rank's sum of per-token losses over ``labels`` (any way of
    computing it: ``usp.losses``); value the global mean, gradient this rank's share."""
    # fp64 totals: a float32 count is exact only up to 2**24 tokens
    totals = torch.stack([local_sum.detach().double(), (labels != ignore_index).sum().double()])
    topology.sum_over_data(totals)
    if totals[1] == 0:
        raise ValueError(f"every label of the global batch is ignore_index={ignore_index}")
    return _GlobalMean.apply(local_sum, totals[0], totals[1])


def global_label_count(
    labels: torch.Tensor, topology: Topology, ignore_index: int = -100
) -> torch.Tensor:
    """How many labels of the global batch count (not ``ignore_index``): fp64, on every rank."""
    count = (labels != ignore_index).sum().double().reshape(1)
    topology.sum_over_data(count)
    if count.item() == 0:
        raise ValueError(f"every label of the global batch is ignore_index={ignore_index}")
    return count[0]


class _GlobalMean(torch.autograd.Function):
    """Value ``global_sum / global_count``; gradient ``d(local_sum) / global_count``."""

    @staticmethod
    def forward(ctx, local_sum, global_sum, global_count):
        ctx.global_count = global_count
        return (global_sum / global_count).to(local_sum.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.global_count.to(grad.dtype), None, None
