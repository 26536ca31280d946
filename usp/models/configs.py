"""The Llama presets under their earlier import path; they live in ``usp.models.llama.presets``
(torch-free, like this module)."""

from usp.models.llama.presets import CONFIGS, LlamaConfig, get_config

__all__ = ["CONFIGS", "LlamaConfig", "get_config"]
