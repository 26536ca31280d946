"""Memory features of a training step: activation checkpointing by layer kind, the tiled MLP and
activation offload to host memory (the loss without full logits is ``usp.losses``)."""

from usp.memory.checkpointing import (
    CHECKPOINT_KINDS, apply_activation_checkpointing, checkpoint_kinds,
)
from usp.memory.offload import ActivationOffload, check_offload
from usp.memory.tiled_mlp import tile_mlp

__all__ = [
    "CHECKPOINT_KINDS", "ActivationOffload", "apply_activation_checkpointing", "check_offload",
    "checkpoint_kinds", "tile_mlp",
]
