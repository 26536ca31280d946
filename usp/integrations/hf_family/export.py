"""A Hugging Face model trained by ``usp train`` written back as its own architecture
(``usp export``, ``usp.training.export``): the checkpoint's names are the transformers model's
under :class:`~usp.integrations.hf_family.model.HFCausalLM`'s ``.model``."""

from __future__ import annotations

import torch

from usp.integrations.hf_family.config import load_hf_config, source
from usp.integrations.hf_family.weights import PREFIX
from usp.models.family import ModelSettings


def hf_config(settings: ModelSettings, *, dtype: torch.dtype, eos_token_id: int | None):
    """The run's transformers config, as it trained (its EOS where the config names none)."""
    flag = "--hf-model" if settings.hf_model else "--hf-config"
    config = load_hf_config(source(settings), flag)
    if getattr(config, "eos_token_id", None) is None and eos_token_id is not None:
        config.eos_token_id = eos_token_id
    config.dtype = dtype
    if not getattr(config, "architectures", None):
        from transformers import AutoModelForCausalLM

        config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return config


def hf_tensors(name: str, tensor: torch.Tensor, config) -> list[tuple[str, torch.Tensor]]:
    """The tensor under the transformers model's own name; a tied output projection is left to
    the embedding."""
    if not name.startswith(PREFIX):
        raise ValueError(f"the checkpoint holds {name!r}, outside the transformers model")
    hf_name = name[len(PREFIX):]
    if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        return []
    return [(hf_name, tensor)]


def generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig.from_model_config(config)
