"""A decoder's parameters and training FLOPs, counted from its shapes: the arithmetic every model
family's entry shares (``usp.models.family``), torch-free; and the bytes a built model's
parameters take on a rank, in the units people write.

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


def parameter_bytes(model) -> int:
    """Bytes of the parameters this rank holds: its shards of DTensors, tied ones once (on the
    meta device too: shapes are enough)."""
    total = 0
    for parameter in model.parameters():  # distinct parameters: a tied one comes once
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel() * local.element_size()
    return total


def count_text(count: int) -> str:
    """``1234567`` -> ``"1.2M"``: a parameter count as people write it."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def bytes_text(size: int) -> str:
    """Bytes in the largest binary unit that keeps a number of at least 1."""
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if size >= scale:
            return f"{size / scale:.1f} {suffix}"
    return f"{size} bytes"
