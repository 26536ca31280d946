"""Model definitions: plain single-device modules, parallelised by ``usp.parallelize``.

The configurations are torch-free (``usp.models.configs``); ``Llama`` is imported when first
used (``usp.lazy``).
"""

from usp.lazy import lazy_exports
from usp.models.configs import CONFIGS, LlamaConfig, get_config

__getattr__, __dir__ = lazy_exports(__name__, {"Llama": "usp.models.llama"})

__all__ = ["CONFIGS", "Llama", "LlamaConfig", "get_config"]
