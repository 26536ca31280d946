"""The fp32 rule of docs/testing.md for whole models, shared by the tests that compare a split
transformers model with its eager copy in one process (fp32 against an fp64 reference)."""

from __future__ import annotations


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
