"""Llama's pipeline stage cut: the layers ``usp.pipeline.stage_layer_names`` gives this rank's
stage, the embedding on the first stage, the final norm and output projection on the last.

Layers keep their global names (``layers.5`` wherever it lives), so checkpoints do not depend on
``pp``. A stage without the embedding takes hidden states instead of ids, and one without the norm
and output returns them (``Llama.forward``).
"""

from __future__ import annotations

from torch import nn

from usp.pipeline import stage_layer_names
from usp.topology import Topology


def keep_stage(model: nn.Module, topology: Topology) -> nn.Module:
    """Cut ``model`` down to this rank's pipeline stage, in place; returns it."""
    pp, stage = topology.size("pp"), topology.rank("pp")
    if pp == 1:
        return model
    keep = set(stage_layer_names(len(model.layers), pp, stage))
    for name in list(model.layers):
        if name not in keep:
            del model.layers[name]
    if stage != 0:
        model.tok_embeddings = None
    if stage != pp - 1:
        model.norm = None
        model.output = None
    return model
