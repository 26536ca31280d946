"""The fp32 rule of docs/testing.md for whole models, shared by the tests that compare a split
transformers model with its eager copy in one process (fp32 against an fp64 reference)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from usp.batch import IGNORE_INDEX


def eager_reference(model, ids, kwargs: dict, labels):
    """One process's ``(logits, loss, {name: grad})`` of ``model`` on the whole batch: the mean
    cross-entropy over the tokens whose labels are not ignored (the global labels of
    ``USPContext.shard``), backward run."""
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def step_references(model, tokens) -> list[dict]:
    """The gradients ``{name: grad}`` of one next-token step of ``model`` (a family model:
    ``model(ids, positions)`` gives logits) on ``tokens`` ``[B, S + 1]`` in one process, for the
    model itself and for an fp64 copy: the ``eager32`` and ``ref64`` of :func:`check_close`."""
    rows, length = tokens.shape[0], tokens.shape[1] - 1
    references = []
    for reference in (model, copy.deepcopy(model).double()):
        logits = reference(tokens[:, :-1], torch.arange(length).expand(rows, -1))
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        references.append({n: p.grad for n, p in reference.named_parameters()})
    return references


def check_close(results) -> None:
    """Each ``(name, got, eager32, ref64)``: |got - ref64| <= 2 |eager32 - ref64| + 1e-6 scale.

    ``scale`` is max|ref64| of the tensor itself, and for gradients the largest reference
    gradient of the whole model: a bias gradient is a sum over every token of terms that mostly
    cancel, so its own maximum understates the size of what was rounded (docs/testing.md).
    Compares after every collective is done, so a failing case cannot desynchronise the ranks.
    """
    grad_scale = max((r.double().abs().max().item() for name, _, _, r in results
                      if name.startswith("grad ")), default=0.0)
    failures = []
    for name, got, eager32, reference64 in results:
        reference = reference64.double()
        own = (eager32.double() - reference).abs().max().item()
        err = (got.double() - reference).abs().max().item()
        scale = grad_scale if name.startswith("grad ") else reference.abs().max().item()
        bound = 2 * own + 1e-6 * scale
        if not err <= bound:
            failures.append(f"{name}: error {err:.3g} > bound {bound:.3g} (eager fp32 {own:.3g})")
    if failures:
        raise AssertionError("; ".join(failures))
