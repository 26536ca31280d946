"""The Llama family: usp's own decoder, its presets, tensor-parallel plan, pipeline stage cut and
its entry in the model registry (``usp.models.llama.family``).

The presets are torch-free (``usp.models.llama.presets``: the command line offers their names
without importing torch); the model and its parts are imported on first use (``usp.lazy``).
"""

from usp.lazy import lazy_exports
from usp.models.llama.presets import CONFIGS, LlamaConfig, get_config

__getattr__, __dir__ = lazy_exports(__name__, {"Llama": "usp.models.llama.model"})

__all__ = ["CONFIGS", "Llama", "LlamaConfig", "get_config"]
