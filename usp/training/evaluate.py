"""The held-out loss: windows that training never sees, and their exact global-mean loss.

With ``--eval-every N`` the last ``--eval-batches M`` global batches' worth of windows of the token
stream are held out before the training batcher cuts its windows (the stream is split between
two tokens, so no token is a label on both sides). Every N steps, and at the last step, the model
runs forward (no graph) over those M batches, always the same and in the same order, and the
mean cross-entropy over every label of every batch and every rank is logged as ``eval_loss``:
the counts are summed, not the per-batch means, as for the training loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from usp.losses import LossHead
from usp.topology import Topology


class HeldOut:
    """``batches`` global batches ``[global_batch, seq_len + 1]`` cut from ``tokens`` in order."""

    def __init__(self, tokens: torch.Tensor, global_batch: int, seq_len: int, batches: int) -> None:
        self.tokens, self.global_batch, self.seq_len, self.num_batches = (
            tokens, global_batch, seq_len, batches)

    def batches(self) -> Iterator[torch.Tensor]:
        for index in range(self.num_batches):
            rows = [self.tokens[window * self.seq_len:window * self.seq_len + self.seq_len + 1]
                    for window in range(index * self.global_batch, (index + 1) * self.global_batch)]
            yield torch.stack(rows)


def held_out_split(data: Sequence[str] | torch.Tensor, global_batch: int, seq_len: int,
                   batches: int) -> tuple[torch.Tensor, HeldOut]:
    """``(training tokens, held-out batches)``: the stream's last ``batches x global_batch``
    windows of ``seq_len + 1`` tokens are held out; ValueError if training would keep less than
    one global batch of windows."""
    from usp.training.data import document_tokens

    tokens = data.reshape(-1).long() if isinstance(data, torch.Tensor) else document_tokens(data)
    windows = batches * global_batch
    held_tokens = windows * seq_len + 1
    training_windows = (tokens.numel() - held_tokens - 1) // seq_len
    if batches < 1 or training_windows < global_batch:
        raise ValueError(
            f"--eval-batches={batches} holds out {windows} windows of {seq_len + 1} tokens from "
            f"the data's {tokens.numel()} tokens, which leaves {max(training_windows, 0)} "
            f"windows to train on, fewer than --global-batch={global_batch}; hold out fewer "
            "batches or add data"
        )
    cut = tokens.numel() - held_tokens
    return tokens[:cut], HeldOut(tokens[cut:], global_batch, seq_len, batches)


@torch.no_grad()
def held_out_loss(model: nn.Module, micro_batches: Sequence[dict], topology: Topology,
                  head: LossHead, autocast_dtype: torch.dtype | None = None) -> float:
    """The mean cross-entropy over every label of ``micro_batches`` (this rank's parts,
    ``usp.batch.shard_batch``'s) of every dp x ring x ulysses rank; the same on every rank."""
    device = micro_batches[0]["labels"].device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, label count
    for micro in micro_batches:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            output = model(micro["input_ids"], micro["position_ids"], micro.get("documents"),
                           **head.model_kwargs())
            totals[0] += head.local_sum(output, micro["labels"], model, topology).double()
        totals[1] += (micro["labels"] != -100).sum()
    topology.sum_over_data(totals)
    if totals[1] == 0:
        raise ValueError("every label of the held-out batches is ignored: nothing to evaluate")
    return float(totals[0] / totals[1])


def evaluate(run) -> float:
    """``usp train``'s held-out loss: every held-out batch, split as the training batches are."""
    from usp.training.accumulate import rank_batch, split_micro_batches

    micro_batches = []
    for tokens in run.held_out.batches():
        micro_batches += split_micro_batches(rank_batch(run, tokens), run.step.grad_accum)
    return held_out_loss(run.model, micro_batches, run.topology, run.loss_head,
                         run.step.autocast_dtype)
