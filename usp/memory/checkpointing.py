"""Activation checkpointing by layer kind: which parts of each block recompute in the backward.

``--ac`` / ``activation_checkpointing`` takes a preset or a comma-separated list of kinds:

| value | recomputes | keeps |
|---|---|---|
| ``none`` | nothing | everything |
| ``full`` = ``block`` | each whole block | each block's input |
| ``selective`` = ``mlp`` | each block's MLP (``3 x ffn_dim`` per token) | the attention's |
| ``attention`` | each block's attention (its all-to-alls and ring run again) | the MLP's |
| ``attention,mlp`` | both, separately | the norms' and the residual stream |

``block`` already contains the other kinds, so it stands alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn
from torch.distributed._composable import checkpoint

CHECKPOINT_KINDS = ("attention", "mlp", "block")
PRESETS = {"none": frozenset(), "full": frozenset({"block"}), "selective": frozenset({"mlp"})}


def checkpoint_kinds(spec: str) -> frozenset[str]:
    """The kinds of ``spec`` (a preset or kinds joined by commas); ValueError for anything else."""
    if spec in PRESETS:
        return PRESETS[spec]
    kinds = frozenset(part.strip() for part in spec.split(","))
    unknown = sorted(kinds - set(CHECKPOINT_KINDS))
    if unknown or not spec.strip():
        raise ValueError(
            f"activation_checkpointing={spec!r}: {unknown or 'empty'} unknown; choose one of "
            f"{sorted(PRESETS)} or kinds of {list(CHECKPOINT_KINDS)} joined by commas "
            "(e.g. 'attention,mlp')"
        )
    if "block" in kinds and len(kinds) > 1:
        raise ValueError(
            f"activation_checkpointing={spec!r}: 'block' recomputes the whole block, attention "
            "and MLP included; give it alone"
        )
    return kinds


def apply_activation_checkpointing(
    blocks: Iterable[nn.Module],
    kinds: frozenset[str],
    attention_of: Callable[[nn.Module], nn.Module] | None,
    mlp_of: Callable[[nn.Module], nn.Module],
) -> None:
    """Checkpoint the parts ``kinds`` name of every block, in place (after TP, before FSDP)."""
    if "attention" in kinds and attention_of is None:
        raise ValueError(
            "activation checkpointing of 'attention' needs the model family's attention module, "
            "which its usp.parallel.ModelPlan does not name; use 'mlp' or 'block'"
        )
    for block in blocks:
        if "block" in kinds:
            checkpoint(block)
            continue
        if "attention" in kinds:
            checkpoint(attention_of(block))
        if "mlp" in kinds:
            checkpoint(mlp_of(block))
