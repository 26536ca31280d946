"""Model definitions: plain single-device modules, parallelised by ``usp.parallelize``."""

from usp.models.llama import CONFIGS, Llama, LlamaConfig, get_config

__all__ = ["CONFIGS", "Llama", "LlamaConfig", "get_config"]
