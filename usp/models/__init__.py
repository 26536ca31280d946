"""Model families: one folder each, an entry in the registry (``usp.models.family``), and nothing
outside a family that branches on it.

- ``usp.models.family``: what a family provides (:class:`~usp.models.family.ModelFamily`) and
  the registry that finds the family of a run's settings or of a built model;
- ``usp.models.llama``: usp's own Llama (presets, model, tensor-parallel plan, stage cut);
- ``usp.integrations.hf_family``: Hugging Face transformers causal LMs.

The Llama presets are torch-free; ``Llama`` is imported when first used (``usp.lazy``).
"""

from usp.lazy import lazy_exports
from usp.models.llama.presets import CONFIGS, LlamaConfig, get_config

__getattr__, __dir__ = lazy_exports(__name__, {"Llama": "usp.models.llama.model"})

__all__ = ["CONFIGS", "Llama", "LlamaConfig", "get_config"]
