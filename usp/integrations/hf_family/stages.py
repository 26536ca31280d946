"""The pipeline stage cut of a Hugging Face causal LM (``usp.integrations.hf_family.model``).

The stage's decoder layers keep their place (and so their names: checkpoints do not depend on
pp); the others become pass-throughs without parameters (:class:`OtherStage`). The first stage
keeps the embedding, the last the final norm and the output projection; the stages between take
the hidden states as ``inputs_embeds`` (an architecture that scales its embeddings does so in the
embedding module, on the first).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from usp.pipeline import stage_layer_names
from usp.topology import Topology


def check_stages(config: PretrainedConfig, topology: Topology) -> None:
    """Raise ValueError, naming the numbers, unless ``config`` can be cut into ``pp`` stages."""
    pp, layers = topology.size("pp"), config.num_hidden_layers
    if pp > 1 and layers < pp:
        raise ValueError(f"num_hidden_layers={layers} < pp={pp}: every pipeline stage needs a layer")
    if pp > 1 and getattr(config, "tie_word_embeddings", False):
        raise ValueError(
            "tie_word_embeddings with pp > 1: the embedding (first stage) and the output "
            "projection (last stage) would live on different ranks; untie them or use pp=1"
        )


class OtherStage(nn.Module):
    """A decoder layer that another pipeline stage holds: the hidden states pass through."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def keep_hf_stage(model: nn.Module, topology: Topology) -> nn.Module:
    """Cut ``model`` (an ``HFCausalLM``) to this rank's pipeline stage, in place; returns it."""
    pp, stage = topology.size("pp"), topology.rank("pp")
    base = model.model.base_model
    keep = set(stage_layer_names(len(base.layers), pp, stage))
    for index in range(len(base.layers)):
        if str(index) not in keep:
            base.layers[index] = OtherStage()
    if stage != 0:
        base.embed_tokens = None
    if stage != pp - 1:
        base.norm = nn.Identity()
        model.model.set_output_embeddings(nn.Identity())
    return model
