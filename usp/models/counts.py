"""A decoder's parameters and training FLOPs, counted from its shapes: the arithmetic every model
family's entry shares (``usp.models.family``), torch-free.

Each family says what its shapes are (Llama: three MLP matrices, a config's names; a Hugging Face
config: its own names, two MLP matrices as a lower bound) and counts with these, so the formula
itself is written once.
"""

from __future__ import annotations


def parameter_count(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
                    head_dim: int, ffn: int, mlp_matrices: int, tied: bool) -> int:
    """Parameters of the matrices of a decoder: embeddings (one table if tied), per layer the
    q, k, v, o projections and ``mlp_matrices`` MLP matrices (norms left out)."""
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    return vocab * hidden * (1 if tied else 2) + layers * (attention + mlp_matrices * hidden * ffn)


def training_flops_per_token(matmul_parameters: int, layers: int, attention_width: int,
                             seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a causal decoder at ``seq_len`` tokens.

    ``6 N`` for the ``matmul_parameters`` (every parameter a matmul multiplies: not an untied
    embedding table, which is looked up), plus attention: per layer, QK^T and AV cost
    ``4 S width`` forward FLOPs per token without a mask (``width`` = query heads x head dim),
    three times that with the backward, and half of it under a causal mask:
    ``6 layers width S``.
    """
    return 6.0 * matmul_parameters + 6 * layers * attention_width * seq_len
