"""Llama shapes: :class:`LlamaConfig` and the presets, torch-free (the command line offers the
preset names without importing torch; ``usp.models.llama.model`` builds the model from them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name}={value!r} must be a positive integer")
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                f"choose dim a multiple of {self.n_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE (rotates pairs)")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs a whole number of query heads per KV head"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFIGS: dict[str, LlamaConfig] = {
    # CPU-sized: seconds per step on one core; vocab 512 covers the 257 byte ids and divides by tp.
    "tiny": LlamaConfig(vocab_size=512, dim=128, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=384),
    "small": LlamaConfig(
        vocab_size=512, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536
    ),
    # Published shapes (Meta Llama 3.2 1B and Llama 3 8B).
    "llama3-1b": LlamaConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        tie_embeddings=True,
    ),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336
    ),
}


def get_config(name: str) -> LlamaConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[name]
