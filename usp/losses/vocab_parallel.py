"""Vocabulary-parallel cross-entropy: each tp rank holds ``vocab / tp`` columns of the logits.

Under tensor parallelism the output projection is split over the vocabulary (column-wise); usp's
plain plan then gathers the full ``[tokens, vocab]`` logits on every tp rank. This loss keeps
them split: the log-sum-exp is reduced over the tp group (a max, then a sum of exponentials) and
the target's logit comes from the rank whose columns hold it, three all-reduces of one number per
token. The backward is local: ``softmax - one_hot`` on this rank's columns, with the global
normaliser saved from the forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def vocab_parallel_cross_entropy_sum(
    local_logits: torch.Tensor, labels: torch.Tensor, group, vocab_start: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``sum_t CE(logits[t], labels[t])`` with the logits' columns split over ``group``.

    ``local_logits [..., V_local]``: this rank's columns ``[vocab_start, vocab_start +
    V_local)``; ``labels [...]``: global vocabulary ids, the same on every rank of ``group``.
    Returns the same fp32 (or wider) scalar on every rank of ``group``; the gradient flows to
    this rank's columns only.
    """
    if local_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(local_logits.shape)} and labels {tuple(labels.shape)} disagree; "
            "expected logits [..., V_local] and labels [...]"
        )
    # [..., V_local] -> [N, V_local]
    return _VocabParallelCrossEntropy.apply(
        local_logits.reshape(-1, local_logits.shape[-1]), labels.reshape(-1), group, vocab_start,
        ignore_index,
    )


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start, ignore_index):
        values = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [N, V_local]
        local_vocab = values.shape[-1]
        # the max over every rank's columns keeps exp() from overflowing (log-sum-exp shift)
        row_max = values.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = values - row_max[:, None]
        sum_exp = shifted.exp().sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local_label = labels - vocab_start
        valid = labels != ignore_index
        here = valid & (local_label >= 0) & (local_label < local_vocab)
        index = torch.where(here, local_label, torch.zeros_like(local_label))
        target = shifted.gather(1, index[:, None]).squeeze(1) * here  # 0 off this rank's columns
        dist.all_reduce(target, group=group)
        log_normaliser = sum_exp.log()
        losses = (log_normaliser - target) * valid
        ctx.save_for_backward(logits, row_max + log_normaliser, index, here, valid)
        return losses.sum()

    @staticmethod
    def backward(ctx, grad):
        logits, log_sum_exp, index, here, valid = ctx.saved_tensors
        values = logits.to(torch.promote_types(logits.dtype, torch.float32))
        # d/dz_j of (log sum exp z - z_y) = softmax_j - [j == y]; only this rank's columns
        grad_logits = (values - log_sum_exp[:, None]).exp()
        grad_logits[here, index[here]] -= 1.0
        grad_logits *= (valid * grad)[:, None]
        return grad_logits.to(logits.dtype), None, None, None, None
