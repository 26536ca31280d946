"""How the training loss meets the output projection: full logits, chunks, or split vocabulary.

All three give the exact global mean of ``usp.loss`` (value: the mean over every label of every
dp x ring x ulysses rank; gradient: this rank's share, summed by FSDP), and the pipeline's last
stage takes their shares the same way:

- ``full``: the model returns ``[B, S, vocab]`` logits (replicated over tp) and the loss reads
  them;
- ``chunked`` (tp = 1): the model returns its final hidden states ``[B, S, dim]`` and the loss
  applies the output projection ``chunk_tokens`` tokens at a time, recomputed in the backward
  (``usp.losses.chunked``): no full fp32 logits exist;
- ``vocab_parallel`` (tp > 1): the output projection stays split over the vocabulary
  (``[B, S, vocab / tp]`` on each tp rank) and the loss reduces over tp
  (``usp.losses.vocab_parallel``): no replicated logits exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from usp.choices import DEFAULT_CHUNK_TOKENS, LOSSES
from usp.loss import cross_entropy_sum
from usp.losses.chunked import chunked_cross_entropy_sum
from usp.losses.vocab_parallel import vocab_parallel_cross_entropy_sum
from usp.topology import Topology


def check_loss(loss: str, topology: Topology, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
    """Raise ValueError, naming the numbers, unless ``loss`` can run on ``topology``."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; choose one of {LOSSES}")
    tp = topology.size("tp")
    if loss == "vocab_parallel" and tp == 1:
        raise ValueError(
            "loss='vocab_parallel' keeps the output projection split over the tp ranks' "
            "vocabulary, and tp=1 splits nothing; use loss='chunked' to avoid full logits"
        )
    if loss == "chunked" and tp > 1:
        raise ValueError(
            f"loss='chunked' applies the whole output projection on each rank; with tp={tp} it "
            "is split over the vocabulary: use loss='vocab_parallel'"
        )
    if chunk_tokens < 1:
        raise ValueError(f"loss chunk_tokens={chunk_tokens} must be a positive integer")


@dataclass(frozen=True)
class LossHead:
    """One of :data:`LOSSES` (see the module docstring); ``chunk_tokens`` for ``chunked``."""

    kind: str = "full"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def model_kwargs(self) -> dict:
        """Keyword arguments of the model's forward: hidden states instead of logits (chunked)."""
        return {"return_hidden": True} if self.kind == "chunked" else {}

    def output_size(self, vocab_size: int, dim: int, tp: int) -> int:
        """The last dimension of what the model (a pipeline's last stage) returns."""
        return {"full": vocab_size, "chunked": dim, "vocab_parallel": vocab_size // tp}[self.kind]

    def local_sum(self, output: torch.Tensor, labels: torch.Tensor, model: nn.Module,
                  topology: Topology, ignore_index: int = -100) -> torch.Tensor:
        """The sum of this rank's per-token cross-entropies (at least fp32).

        ``output``: what ``model(..., **self.model_kwargs())`` returned, ``[B, S, *]``;
        ``labels [B, S]``; ``model``: the (parallelised) model or the pipeline's last stage.
        """
        if output.shape[:-1] != labels.shape:
            raise ValueError(f"model output {tuple(output.shape)} and labels "
                             f"{tuple(labels.shape)} disagree; expected [B, S, *] and [B, S]")
        if self.kind == "chunked":
            weight = model.output.weight
            if output.shape[-1] != weight.shape[-1]:
                raise ValueError(
                    f"loss='chunked' needs the model's hidden states [B, S, {weight.shape[-1]}], "
                    f"got {tuple(output.shape)}; call the model with LossHead.model_kwargs()"
                )
            return chunked_cross_entropy_sum(output, weight, labels, self.chunk_tokens,
                                             ignore_index)
        if self.kind == "vocab_parallel":
            tp = topology.size("tp")
            if output.shape[-1] * tp != model.config.vocab_size:
                raise ValueError(
                    f"loss='vocab_parallel' needs this rank's {model.config.vocab_size // tp} of "
                    f"{model.config.vocab_size} vocabulary columns, got {output.shape[-1]}; "
                    "parallelize the model with loss='vocab_parallel'"
                )
            return vocab_parallel_cross_entropy_sum(
                output, labels, topology.group("tp"), topology.rank("tp") * output.shape[-1],
                ignore_index,
            )
        return cross_entropy_sum(output, labels, ignore_index)

    def share(self, output: torch.Tensor, labels: torch.Tensor, global_count: torch.Tensor,
              model: nn.Module, topology: Topology) -> torch.Tensor:
        """This part's share of the global mean (a micro-batch's, in a pipeline or under gradient
        accumulation): its sum over ``global_count`` from ``usp.loss.global_label_count``."""
        local_sum = self.local_sum(output, labels, model, topology)
        return local_sum / global_count.to(local_sum.dtype)
